"""The CLI's process tuning: freed memory kept for reuse (glibc), only when run as a program."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from lckd_kit import cli

FAULTS_PER_STEP = textwrap.dedent("""
    import resource, sys
    import torch
    from lckd_kit.cli import retain_freed_memory
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
        env = {k: v for k, v in os.environ.items() if not cli.user_tuned_malloc({k: v})}
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
    assert cli.user_tuned_malloc({"MALLOC_ARENA_MAX": "2"}) and not cli.user_tuned_malloc({"HOME": "/"})
