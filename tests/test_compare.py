"""Tests for the side-by-side comparison of missing-modality methods (lckd_kit.compare): the report,
results.json and what a notebook does with it, resuming, the rerun command and the CLI.

The comparison runs on the seconds-long "tiny" schedule, 32^3 phantoms (4 training, 2 held-out)
in a temporary cache; figures and statistics are also checked on made-up scores.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from lckd_kit import REGIONS, SUBSETS, calibration, cli, compare as cmp, compare_report as cmp_report, stats
from lckd_kit.evaluate import EvalResult
from lckd_kit.train import TRAIN_CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(config="tiny", grid=32, n_cases=4, n_test=2, device="cpu", progress=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("phantom_cache")


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("compare")
    t0 = time.perf_counter()
    report = cmp.compare(methods=("lckd", "hemis"), seeds=(0,), out_dir=out, cache_dir=cache, **TINY)
    return out, report, time.perf_counter() - t0


def fake_results(methods=("lckd", "nokd", "hemis", "regionfusion"), n_seeds=2, n_cases=5, seed=0) -> cmp.CompareResults:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.3, 0.9, size=(n_seeds, n_cases, 15, 3))
    dice = {m: np.clip(base + 0.05 * i + rng.normal(0, 0.01, base.shape), 0, 1) for i, m in enumerate(methods)}
    return cmp.CompareResults(list(methods), list(range(n_seeds)), [f"c{i}" for i in range(n_cases)], dice,
                              np.zeros((n_cases, 3), bool), {"params": {m: 1000 for m in methods}})


# ---------------------------------------------------------------------------------- the comparison


def test_compare_writes_report_and_results(run):
    out, report, elapsed = run
    assert report == out / "report.md"
    md, html = report.read_text(), (out / "report.html").read_text()
    for heading in ("## Setup", "## What the numbers show", "## Summary", "## Paired differences against LCKD",
                    "## Ranking on phantoms and on real scans", "## Dice on the held-out cases, 15 modality subsets"):
        assert heading in md
    # one paper-style 15-row table per method
    assert len([ln for ln in md.splitlines() if re.match(r"^\| [●○] \|", ln)]) == 2 * 15
    figs = ["summary_bars.png", "differences.png", "heatmap_lckd.png", "heatmap_hemis.png"]
    for name in figs:
        assert (out / "figures" / name).read_bytes()[:4] == b"\x89PNG" and f"figures/{name}" in md
    assert html.count("data:image/png;base64,") == len(figs)
    assert "significant" not in md.lower()
    # the runs: the same schedule, each method's own model, checkpoints and evaluations
    for m, model in (("lckd", "small2d"), ("hemis", "hemis_small2d")):
        stored = json.loads((out / "runs" / f"{m}_seed0" / "config.json").read_text())
        assert stored["model"] == model and stored["stage1_steps"] == stored["stage2_steps"] == 4
        assert (out / "runs" / f"{m}_seed0" / "final.pt").is_file()
    assert elapsed < 120


def test_results_json_holds_every_case_and_loads_fast(run):
    out, report, _ = run
    raw = json.loads((out / "results.json").read_text())
    assert raw["format"] == cmp.RESULTS_FORMAT and raw["methods"] == ["lckd", "hemis"] and raw["seeds"] == [0]
    assert len(raw["dice"]["hemis"]["0"]) == 2 and np.array(raw["dice"]["hemis"]["0"], float).shape == (2, 15, 3)
    assert raw["train_configs"]["hemis"]["model"] == "hemis_small2d" and raw["command"].startswith("python -c")
    assert raw["params"]["hemis"] == 496_691 and raw["config"]["schedule"] == "tiny"
    t0 = time.perf_counter()
    res = cmp.load_results(out)
    assert time.perf_counter() - t0 < 1.0
    assert res.methods == ["lckd", "hemis"] and res.seeds == [0] and len(res.cases) == 2
    for m in res.methods:  # the very scores of each run's own evaluation
        ev = EvalResult.from_json(out / "runs" / f"{m}_seed0" / "eval" / "results.json")
        assert res.dice[m].shape == (1, 2, 15, 3)
        assert np.allclose(res.dice[m][0], ev.per_case("dice"), atol=1e-6, equal_nan=True)
        assert np.allclose(res.table(m), ev.dice_table(), atol=1e-6, equal_nan=True)
    # the report quotes these numbers
    md = report.read_text()
    c = res.summary("hemis", "mean")
    assert f"| HeMIS | 496,691 | {stats.num(c.a)} [{stats.num(c.low)}, {stats.num(c.high)}]" in md
    d = res.difference("hemis", "mean")
    assert np.isclose(d.diff, np.nanmean(res.dice["hemis"].mean((2, 3)) - res.dice["lckd"].mean((2, 3))), atol=1e-9)
    assert stats.describe(d, "Mean Dice over the 15 subsets", ("HeMIS", "LCKD")) in md


def test_resume_reuses_finished_runs(run, cache, monkeypatch):
    out, _, _ = run
    before = json.loads((out / "results.json").read_text())["dice"]

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("lckd_kit.train.train", no_training)
    cmp.compare(methods=("lckd", "hemis"), seeds=(0,), out_dir=out, cache_dir=cache, resume=True, **TINY)
    assert json.loads((out / "results.json").read_text())["dice"] == before
    # another schedule is another run: not reused
    with pytest.raises(AssertionError, match="trained again"):
        cmp.compare(methods=("lckd",), seeds=(0,), out_dir=out, cache_dir=cache, resume=True,
                    train_overrides=dict(stage1_steps=2, stage2_steps=2), **TINY)


def test_partial_results_keep_the_seeds_every_method_finished(tmp_path):
    res = fake_results(n_seeds=2)
    d = res.to_dict()
    d["seeds"] = [0, 1, 2]
    d["dice"]["lckd"]["2"] = d["dice"]["lckd"]["0"]  # seed 2 finished for LCKD only
    (tmp_path / "results.json").write_text(json.dumps(d))
    back = cmp.load_results(tmp_path / "results.json")
    assert back.seeds == [0, 1] and back.dice["lckd"].shape == (2, 5, 15, 3)
    assert np.allclose(back.dice["hemis"], res.dice["hemis"], atol=1e-6)
    with pytest.raises(ValueError, match="not a comparison"):
        (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
        cmp.load_results(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------- numbers and figures


def test_summaries_and_differences_follow_stats():
    res = fake_results()
    table = res.summary_table()
    assert list(table) == res.methods and list(table["hemis"]) == list(cmp.SUMMARIES)
    mean, lo, hi = table["hemis"]["core_no_t1ce"]
    ref = stats.compare(res.dice["hemis"], None, "no_t1ce", ("ET", "TC"))
    assert (mean, lo, hi) == (ref.a, ref.low, ref.high) and lo < mean < hi
    diffs = res.difference_table()
    assert "lckd" not in diffs and list(diffs) == ["nokd", "hemis", "regionfusion"]
    d, lo, hi = diffs["regionfusion"]["mean"]
    assert np.isclose(d, 0.15, atol=0.01) and lo > 0  # made 0.05 per position better than LCKD
    assert [m for m, _ in res.ranking()] == ["regionfusion", "hemis", "nokd", "lckd"]
    assert res.seed_std("hemis").shape == (15, 3)
    assert fake_results(n_seeds=1).seed_std("hemis") is None


def test_region_fusion_is_set_against_the_published_rfnet_table():
    res = fake_results()
    pub = res.published_comparison("regionfusion")
    expected = calibration.compare(res.table("regionfusion"), "RFNet")
    assert np.isclose(pub.spearman, expected.spearman) and np.isclose(pub.mae, expected.mae)
    assert np.allclose(pub.reference, calibration.published_table("RFNet"))
    assert res.published_comparison("hemis") is None  # no published HeMIS table is bundled
    md = cmp_report.ranking_table(res)
    assert re.search(r"\| region fusion \| [0-9.]+ \| RFNet \| 0\.731 \| 2 \|", md)
    assert "| mmFormer |" in md


def test_figure_helpers():
    res = fake_results()
    fig = res.summary_figure()
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.patches) == len(res.methods) * len(cmp.SUMMARIES)  # one bar per method and summary
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    means = sorted(round(v[0], 6) for m in res.methods for v in res.summary_table()[m].values())
    assert heights == means
    fig = res.difference_figure()
    assert len(fig.axes) == len(cmp.SUMMARIES)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["no-KD", "HeMIS", "region fusion"]
    fig = res.heatmap("hemis")
    assert isinstance(fig, Figure)


def test_what_the_numbers_show_never_overclaims():
    res = fake_results(methods=("lckd", "nokd"), n_seeds=1, n_cases=3)
    res.dice["nokd"] = res.dice["lckd"] + np.random.default_rng(1).normal(0, 0.02, res.dice["lckd"].shape)
    text = " ".join(cmp_report.what_the_numbers_show(res))
    assert "significant" not in text.lower()
    assert "one seed says nothing about seed-to-seed variation" in text


# ---------------------------------------------------------------------------------- configs, command, CLI


@pytest.mark.parametrize("method,model,no_kd", [("lckd", "small2d", False), ("nokd", "small2d", True),
                                                ("dropout", "dropout_small2d", False),
                                                ("regionfusion", "regionfusion_small2d", False)])
def test_method_train_config_changes_only_the_model(method, model, no_kd):
    cfg = cmp.method_train_config(method, "small2d", seed=3, train_overrides=dict(stage1_steps=60, stage2_steps=60))
    assert cfg.model == model and cfg.no_kd == no_kd and cfg.seed == 3 and cfg.total_steps == 120
    base = TRAIN_CONFIGS["small2d"]
    for f in ("batch_size", "roi_size", "crops_per_case", "lr", "optimizer", "elect_every", "stage2_sampling"):
        assert getattr(cfg, f) == getattr(base, f)
    three_d = cmp.method_train_config(method, "small")
    assert three_d.model == model.replace("small2d", "small") and three_d.roi_size == (64, 64, 64)


def test_bad_methods_and_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        cmp.compare(methods=("lckd", "unet"), out_dir=tmp_path, **TINY)
    with pytest.raises(ValueError, match="LCKD size"):
        cmp.method_train_config("hemis", "hemis_small2d")


def test_rerun_command():
    out = Path("outputs/compare")
    line = cmp.rerun_command(out, list(cmp.DEFAULT_METHODS), [0, 1, 2], "small2d", 24, 6, 96, None)
    assert line == "lckd-kit compare --methods lckd,nokd,dropout,hemis,regionfusion --seeds 0 1 2 --out outputs/compare"
    short = cmp.rerun_command(out, ["lckd", "hemis"], [0], "small2d", 24, 6, 96, dict(stage1_steps=60, stage2_steps=60))
    assert short.endswith("--seeds 0 --out outputs/compare --stage-steps 60 60")
    assert cmp.rerun_command(out, ["lckd"], [0], "tiny", 4, 2, 32, None).startswith("python -c")


def test_cli_arguments_reach_compare(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return tmp_path / "report.md"

    monkeypatch.setattr(cmp, "compare", fake)
    parser = argparse.ArgumentParser()
    cmp.add_arguments(parser)
    args = parser.parse_args(["--methods", "lckd, hemis", "--seeds", "0", "1", "--out", str(tmp_path),
                              "--stage-steps", "60", "60"])
    assert cmp.run(args) == 0
    assert seen["methods"] == ["lckd", "hemis"] and seen["seeds"] == [0, 1] and seen["config"] == "small2d"
    assert seen["train_overrides"] == dict(stage1_steps=60, stage2_steps=60) and seen["resume"] is False
    assert "report:" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a typo fails at parse time, before anything is trained
        parser.parse_args(["--methods", "lckd,unet"])
    assert "unknown method(s) ['unet']" in capsys.readouterr().err
    # the lckd-kit sub-command
    seen.clear()
    assert cli.main(["compare", "--methods", "lckd,nokd,dropout,hemis,regionfusion", "--seeds", "0", "1", "2",
                     "--out", str(tmp_path / "cmp"), "--threads", "1"], tune_process=False) == 0
    assert seen["methods"] == list(cmp.DEFAULT_METHODS) and seen["seeds"] == [0, 1, 2]
    assert seen["train_overrides"] is None and seen["out_dir"] == str(tmp_path / "cmp")


def test_export_models_writes_slim_loadable_checkpoints(run, tmp_path):
    import torch

    from lckd_kit.checkpoint import load_checkpoint, load_model

    out = run[0]
    written = cmp.export_models(out, tmp_path, seed=0, methods=("lckd", "hemis"))
    assert [p.name for p in written] == ["compare_lckd.pt", "compare_hemis.pt"]
    for path, kind in zip(written, ("LCKDNet", "HeMISNet")):
        ckpt = load_checkpoint(path)
        assert "optimizer" not in ckpt and ckpt["made_by"]["seed"] == 0
        model, _ = load_model(path)
        assert type(model).__name__ == kind
        full, _ = load_model(out / "runs" / f"{path.stem.split('_', 1)[1]}_seed0" / "final.pt")
        for (k, a), (_, b) in zip(model.state_dict().items(), full.state_dict().items()):
            assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="dropout"):
        cmp.export_models(out, tmp_path, seed=0, methods=("dropout",))


def test_the_methods_page_states_what_the_committed_comparison_says():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    res = cmp.load_results()
    assert cmp_report.summary_markdown(res) in page and cmp_report.differences_markdown(res) in page
    assert cmp_report.ranking_table(res) in page
    assert all(line in page for line in cmp_report.what_the_numbers_show(res))
    assert len(res.seeds) >= 3 and res.methods == list(cmp.DEFAULT_METHODS)
