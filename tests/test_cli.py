"""The CLI's process tuning: freed memory kept for reuse (glibc), only when run as a program."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from lckd_kit import cli, runtime

FAULTS_PER_STEP = textwrap.dedent("""
    import resource, sys
    import torch
    from lckd_kit.runtime import retain_freed_memory
    print(retain_freed_memory() if sys.argv[1] == "on" else "default")
    torch.set_num_threads(1)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 16, 3, padding=1), torch.nn.GroupNorm(16, 16), torch.nn.ReLU(),
                              torch.nn.Conv3d(16, 16, 3, padding=1), torch.nn.GroupNorm(16, 16))
    x = torch.randn(2, 1, 64, 64, 64)  # 8 MB input, 34 MB activations: above glibc's mmap threshold
    step = lambda: net(x).square().mean().backward()
    faults = []
    for _ in range(8):  # the median of the last 5: the retained heap may still grow in a step or two
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sorted(faults[3:])[2])
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_retained_memory_removes_the_page_faults_of_a_training_step():
    def faults(mode):
        env = {k: v for k, v in os.environ.items() if not runtime.user_tuned_malloc({k: v})}
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True,
                             check=True, env=env).stdout.split()
        return out[0], int(out[1])
    applied, retained = faults("on")
    if applied != "True":
        pytest.skip("not glibc")
    _, default = faults("off")
    # every fresh 4 KiB page of every large activation faults by default: tens of thousands a step
    assert default > 20_000
    assert retained < default / 20


def test_main_tunes_the_process_only_when_run_as_a_program(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: calls.append(True) or True)
    args = ["samples", "--out", str(tmp_path / "s"), "--n", "1", "--grid", "32"]
    assert cli.main(args) == 0 and calls == []  # called from Python (tests, notebooks): untouched
    assert cli.main(args, tune_process=True) == 0 and calls == [True]
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")  # the user's own setting wins
    assert cli.main(args, tune_process=True) == 0 and calls == [True]
    assert runtime.user_tuned_malloc({"MALLOC_ARENA_MAX": "2"}) and not runtime.user_tuned_malloc({"HOME": "/"})


# ---------------------------------------------------------------------------------- flags and names


def test_option_names_match_the_package():
    """The CLI names configurations and conventions itself, to refuse a wrong one before torch loads."""
    from lckd_kit.labels import CONVENTIONS
    from lckd_kit.train import TRAIN_CONFIGS

    assert sorted(cli.TRAIN_CONFIG_NAMES) == sorted(TRAIN_CONFIGS)
    assert sorted(cli.CONVENTION_NAMES) == sorted(CONVENTIONS)


def test_train_flags_reach_the_train_config(monkeypatch, tmp_path, capsys):
    import lckd_kit.train as train_module

    seen = []

    def fake_train(config, data, out_dir=None, device=None, resume=False):
        seen.append(config)
        return train_module.TrainResult(model=None, history=[], teachers=(True, False, False, False), elections=[],
                                        out_dir=out_dir, config=config, step=config.total_steps)

    monkeypatch.setattr(train_module, "train", fake_train)
    names = tmp_path / "val.txt"
    names.write_text("# validation\nBraTS_a\n\nBraTS_b\n")
    base = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--config", "paper", "--threads", "1"]
    assert cli.main(base + ["--holdout-val", "--election-score", "hard", "--normalization", "zscore", "--augment",
                            "scanner", "--amp", "bf16", "--cache-mb", "512", "--val-cases", str(names)]) == 0
    c = seen[-1]
    assert (c.validation, c.elect_metric, c.elect_average) == ("holdout", "hard", "probs")
    assert (c.normalization, c.augment, c.amp, c.cache_mb) == ("zscore", "scanner", "bf16", 512.0)
    assert c.val_cases == ("BraTS_a", "BraTS_b")
    assert cli.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--config", "small2d",
                     "--election-score", "reference", "--threads", "1"]) == 0
    c = seen[-1]
    assert (c.validation, c.elect_metric, c.elect_average, c.amp) == ("holdout", "soft", "logits", "off")
    assert cli.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--config", "paper",
                     "--threads", "1"]) == 0
    c = seen[-1]  # without the flags: the config's own values (the reference's)
    assert (c.validation, c.elect_metric, c.normalization, c.augment) == ("within", "soft", "clip_zscore", "reference")
    assert "finished" in capsys.readouterr().out


def test_samples_passes_geometry_and_cues_on(monkeypatch, tmp_path, capsys):
    import lckd_kit.phantom as phantom_module

    calls = []

    def fake_generate(out_dir, n, seed=0, grid=96, difficulty="standard", label_style="brats2018",
                      geometry="mni", cues=1.0):
        calls.append(dict(geometry=geometry, cues=cues))
        return []

    monkeypatch.setattr(phantom_module, "generate", fake_generate)
    args = ["samples", "--out", str(tmp_path / "s"), "--threads", "1"]
    assert cli.main(args + ["--geometry", "brats", "--cues", "0.5"]) == 0
    assert cli.main(args) == 0
    assert calls == [dict(geometry="brats", cues=0.5), dict(geometry="mni", cues=1.0)]  # defaults: the generator's


# ---------------------------------------------------------------------------------- threads


def test_free_cores_counts_the_idle_share_of_each_core(monkeypatch):
    from lckd_kit import runtime

    snapshots = iter([{0: (1000, 5000), 1: (1000, 5000)}, {0: (1002, 5100), 1: (1098, 5100)}])
    monkeypatch.setattr(runtime, "_cpu_times", lambda path="/proc/stat": next(snapshots))
    monkeypatch.setattr(runtime, "allowed_cores", lambda: [0, 1])
    assert runtime.free_cores(interval=0) == 1  # core 0 busy (2 % idle), core 1 free (98 %)
    monkeypatch.setattr(runtime, "_cpu_times", lambda path="/proc/stat": {})
    assert runtime.free_cores(interval=0) == 2  # cannot tell: every allowed core counts


def test_set_threads(monkeypatch):
    import torch

    from lckd_kit import runtime

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        monkeypatch.setattr(runtime, "free_cores", lambda interval=0.3: 1)
        monkeypatch.setattr(runtime, "allowed_cores", lambda: [0, 1])
        assert runtime.set_threads("auto") == (1, "1 torch thread: 1 of 2 cores free (--threads N to choose)")
        assert torch.get_num_threads() == 1
        assert runtime.set_threads("2")[0] == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: the free cores are shared by the ranks
        monkeypatch.setattr(runtime, "free_cores", lambda interval=0.3: 4)
        monkeypatch.setattr(runtime, "allowed_cores", lambda: list(range(8)))
        assert runtime.set_threads("auto")[0] == 2
        for bad in ("0", "-1", "1.5", "many"):
            with pytest.raises(ValueError, match="threads"):
                runtime.set_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_every_command_says_how_many_threads_it_uses(tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    assert cli.main(["samples", "--out", str(tmp_path / "s"), "--n", "1", "--grid", "32", "--threads", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "lckd-kit samples: 2 torch threads (--threads 2)"
    assert torch.get_num_threads() == before  # a Python caller keeps its own setting


def test_samples_geometry_with_the_real_generator(tmp_path, capsys):
    """--geometry reaches phantom.generate once it takes one; until then the CLI says so in one line."""
    import inspect

    from lckd_kit.phantom import generate

    rc = cli.main(["samples", "--out", str(tmp_path / "s"), "--n", "1", "--grid", "32", "--geometry", "mni",
                   "--threads", "1"])
    err = capsys.readouterr().err
    if "geometry" in inspect.signature(generate).parameters:
        assert rc == 0 and len(list((tmp_path / "s").iterdir())) >= 1, err
    else:
        assert rc == 2 and err.startswith("lckd-kit samples: error: --geometry:") and err.count("\n") == 1


def test_runtime_device_and_duration_helpers():
    import torch

    from lckd_kit.runtime import format_seconds, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert (format_seconds(42.4), format_seconds(89), format_seconds(90), format_seconds(210)) == \
        ("42 s", "89 s", "1.5 min", "3.5 min")
