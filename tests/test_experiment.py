"""Tests for the experiment (LCKD vs no-KD report), the shipped-checkpoint recipe, workshop_prep
and the ``lckd-kit evaluate`` command -- all on the seconds-long "tiny" config and 32^3 phantoms
(6 mm voxels) in a temporary cache, never the real phantom cache.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lckd_kit import SUBSETS, cli, experiment, stats
from lckd_kit.checkpoint import load_checkpoint, load_model
from lckd_kit.evaluate import EvalResult
from lckd_kit.experiment import rerun_command, run_experiment, train_shipped_checkpoint
from lckd_kit.report import what_the_numbers_show

TINY = dict(config="tiny", grid=32, n_cases=4, n_test=2, device="cpu", progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("phantom_cache")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, cache):
    """A tiny 'shipped' checkpoint made by the documented recipe (8 steps)."""
    out = tmp_path_factory.mktemp("checkpoints") / "lckd_tiny.pt"
    return train_shipped_checkpoint(out=out, config="tiny", grid=32, n_cases=4, n_test=2, device="cpu",
                                    progress=False, cache_dir=cache)


def subset_rows(md: str) -> list[str]:
    return [ln for ln in md.splitlines() if re.match(r"^\| [●○] \|", ln)]


# ---------------------------------------------------------------------------------- the experiment


def test_run_experiment_writes_the_report(tmp_path, cache):
    t0 = time.perf_counter()
    report = run_experiment(out_dir=tmp_path / "demo", cache_dir=cache, **TINY)
    elapsed = time.perf_counter() - t0
    assert report == tmp_path / "demo" / "report.md"
    md = report.read_text()
    html = (tmp_path / "demo" / "report.html").read_text()
    # sections, and the two models' 15-row tables (+ the difference table)
    for heading in ("## Setup", "## What the numbers show", "## Dice on the held-out cases",
                    "## Teacher election and training", "## Example"):
        assert heading in md
    assert len(subset_rows(md)) == 3 * 15
    assert md.count("**Mean**") == 3
    figs = tmp_path / "demo" / "figures"
    for name in ("heatmap_lckd.png", "heatmap_nokd.png", "heatmap_diff.png", "election.png", "teacher_timeline.png",
                 "loss_curves.png", "example_lckd_all.png", "example_lckd_no_t1ce.png", "example_nokd_all.png",
                 "example_nokd_no_t1ce.png"):
        assert (figs / name).read_bytes()[:4] == b"\x89PNG", name
        assert f"figures/{name}" in md
    # the HTML is self-contained: every image embedded, no file references
    assert html.count("data:image/png;base64,") == 10 and 'src="figures/' not in html
    assert "<table>" in html and "What the numbers show" in html
    # the summary quotes the numbers of the evaluations
    lckd = EvalResult.from_json(tmp_path / "demo" / "runs" / "lckd_seed0" / "eval" / "results.json")
    base = EvalResult.from_json(tmp_path / "demo" / "runs" / "nokd_seed0" / "eval" / "results.json")
    assert lckd.dice_table().shape == base.dice_table().shape == (15, 3)
    overall = f"{np.nanmean(lckd.per_case()):.3f}"
    assert f"LCKD reaches Dice {overall}" in md
    # held-out cases are never training / validation cases
    split = json.loads((tmp_path / "demo" / "runs" / "lckd_seed0" / "config.json").read_text())["split"]
    assert set(lckd.cases).isdisjoint(split["train"] + split["val"])
    assert all(c.startswith("PhantomTest_") for c in lckd.cases)
    assert "threads" in md and "Wall time" in md  # the machine and timing lines
    # ~35 s on 2 idle cores; not asserted (shared CI machines), only reported on failure of the above
    print(f"tiny experiment: {elapsed:.0f} s")


def test_summary_is_generated_from_the_numbers():
    """Constructed scores: LCKD better only where T1ce is missing; with 3 seeds the sign flips."""
    no_t1ce = np.array([not m[2] for m in SUBSETS])
    base = np.full((1, 4, 15, 3), 0.6)
    lckd = base.copy()
    lckd[:, :, no_t1ce] += 0.1
    text = " ".join(what_the_numbers_show(lckd, base))
    assert "ET and TC score 0.700 (LCKD) vs 0.600 (no-KD)" in text
    assert f"WT scores {0.6 + 0.1 * 3 / 7:.3f} (LCKD) vs 0.600 (no-KD)" in text  # 3 of the 7 no-FLAIR subsets lack T1ce
    # the same +0.1 in every case: the interval is that point, and it excludes zero; one seed is said
    assert "Core (ET, TC) without T1ce: LCKD − no-KD = +0.100, 95 % interval [+0.100, +0.100]" in text
    assert "the interval excludes zero, so on these phantoms LCKD scores higher" in text
    assert "one seed says nothing about seed-to-seed variation" in text
    assert "significant" not in text
    assert stats.compare(lckd, base, "full").diff == pytest.approx(0.0)  # all four modalities: no difference

    # three seeds whose differences disagree in sign -> the interval includes zero
    lckd3 = np.concatenate([lckd, base + 0.0, base - 0.05])
    base3 = np.concatenate([base] * 3)
    c = stats.compare(lckd3, base3, "all")
    assert c.n_seeds == 3 and c.low < 0 < c.high and c.seed_diffs == pytest.approx([0.1 * 7 / 15, 0.0, -0.05])
    text3 = " ".join(what_the_numbers_show(lckd3, base3))
    assert "per seed +0.047, +0.000, -0.050" in text3 and "not evidence of a difference" in text3
    # a single-model summary (quick mode) has no comparison
    single = " ".join(what_the_numbers_show(lckd, None))
    assert "vs" not in single and "Without T1ce" in single and "interval" in single


def test_quick_without_checkpoint_says_how_to_make_it(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="train_shipped_checkpoint"):
        run_experiment(out_dir=tmp_path / "q", quick=True, checkpoint=tmp_path / "missing.pt", cache_dir=cache, **TINY)


# ---------------------------------------------------------------------------------- shipped checkpoint


def test_shipped_checkpoint_is_slim_loadable_and_documented(shipped):
    assert shipped.is_file() and shipped.stat().st_size < 5e6
    ckpt = load_checkpoint(shipped)  # weights_only=True
    assert "optimizer" not in ckpt and ckpt["step"] == 8
    assert {"model", "config", "teachers", "elections", "history", "made_by"} <= set(ckpt)
    model, _ = load_model(shipped)
    assert model.config.name == "small2d" and not model.training
    readme = (shipped.parent / "README.md").read_text()
    assert "train_shipped_checkpoint(" in readme and "config='tiny'" in readme
    assert len(subset_rows(readme)) == 15 and "All four modalities" in readme
    ev = EvalResult.from_json(shipped.with_name("lckd_tiny_eval.json"))
    assert ev.dice_table().shape == (15, 3) and len(ev.cases) == 2
    assert not list(shipped.parent.glob(".*tmp*"))  # atomic write left nothing behind


def test_quick_experiment_evaluates_the_checkpoint(tmp_path, cache, shipped):
    report = run_experiment(out_dir=tmp_path / "q", quick=True, checkpoint=shipped, cache_dir=cache, **TINY)
    md = report.read_text()
    assert "Quick mode" in md and len(subset_rows(md)) == 15
    assert "no-KD" not in md.split("## What the numbers show")[1].split("##")[0]
    assert (tmp_path / "q" / "report.html").is_file() and (tmp_path / "q" / "eval" / "results.json").is_file()


def test_workshop_prep_lines(monkeypatch, cache, shipped, tmp_path):
    monkeypatch.setattr(experiment, "DEMO_N_CASES", 2)
    monkeypatch.setattr(experiment, "DEMO_N_TEST", 1)
    monkeypatch.setattr(experiment, "DEMO_GRID", 32)
    lines = list(experiment.workshop_prep(checkpoint=shipped, cache_dir=cache))
    assert lines[0].startswith("lckd-kit workshop-prep") and lines[-1].startswith("done in")
    assert any("shipped checkpoint" in ln and "loads" in ln for ln in lines)
    missing = list(experiment.workshop_prep(checkpoint=tmp_path / "none.pt", cache_dir=cache))
    assert any("MISSING" in ln and "train_shipped_checkpoint" in ln for ln in missing)


# ---------------------------------------------------------------------------------- CLI


def test_cli_evaluate_with_a_checkpoint(tmp_path, cache, shipped, capsys):
    data = experiment.heldout_phantoms(2, grid=32, cache_dir=cache, progress=False)
    out = tmp_path / "eval"
    rc = cli.main(["evaluate", "--data", str(data), "--checkpoint", str(shipped), "--out", str(out),
                   "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert len(subset_rows(printed)) == 15
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.png", "results.csv", "results.json", "table.md"]
    res = EvalResult.from_json(out / "results.json")
    assert res.dice_table().shape == (15, 3) and res.hd95_table().shape == (15, 3)
    assert len(res.rows) == 2 * 15 * 3 and res.convention == "brats2018"


def test_report_command_reruns_the_same_experiment():
    from lckd_kit.experiment import SHIPPED_TRAIN_OVERRIDES

    out = Path("outputs/demo")
    assert rerun_command(out, "small2d", [0], 24, 6, 96, None) == "lckd-kit experiment --out outputs/demo"
    assert rerun_command(out, "small", [0, 1], 12, 6, 96, {}) == \
        "lckd-kit experiment --out outputs/demo --seeds 0 1 --config small --n-cases 12"
    # what the CLI cannot express (a longer schedule, another grid) is given as the Python call
    py = rerun_command(out, "small2d", [0, 1, 2], 24, 6, 96, SHIPPED_TRAIN_OVERRIDES)
    assert py.startswith('python -c "from lckd_kit.experiment import run_experiment; run_experiment(')
    assert "'stage1_steps': 1500" in py and "seeds=(0, 1, 2)" in py
    assert "grid=32" in rerun_command(out, "small2d", [0], 24, 6, 32, None)


def test_retraining_keeps_the_hand_measured_real_scan_section(tmp_path, cache):
    out = tmp_path / "lckd_tiny.pt"
    (tmp_path / "README.md").write_text("# old\n\nold table\n\n## On a real scan\n\n| a | b |\n|--|--|\n| 1 | 2 |\n")
    kw = dict(config="tiny", grid=32, n_cases=4, n_test=2, device="cpu", progress=False, cache_dir=cache)
    for _ in range(2):
        train_shipped_checkpoint(out=out, **kw)
    text = (tmp_path / "README.md").read_text()
    assert "old table" not in text and text.startswith("# Shipped checkpoint")
    assert text.count("## On a real scan") == 1 and text.count("Measured on earlier weights") == 1
    assert text.rstrip().endswith("| 1 | 2 |")
