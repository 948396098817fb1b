"""The distillation sweep: runs pair up by seed and case, the analysis says what the intervals say,
and the committed results are complete and readable."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lckd_kit import stats, sweep

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster on a shared machine


#: the smallest sweep with every kind of run: 2 cue settings x 1 seed x (LCKD, no-KD) + LCKD at KD weight 1
TOY = dict(cues=(0.0, 1.0), seeds=(0,), kd_weights=(1.0,), config="tiny", n_cases=4, n_test=2, grid=32, progress=False)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "sweep.json"
    sweep.run_sweep(out, **TOY)
    return out


def test_runs_pair_up_and_a_rerun_skips_finished_ones(toy):
    res = sweep.load_sweep(toy)
    keys = sorted((r["cues"], r["seed"], r["kind"], r["kd_weight"]) for r in res["runs"])
    assert len(keys) == 2 * 2 + 1 and len(set(keys)) == len(keys)  # LCKD + no-KD per (cues, seed) + KD 1.0
    assert {r["kind"] for r in res["runs"]} == {"lckd", "nokd"}
    for r in res["runs"]:
        assert np.asarray(r["dice"], dtype=float).shape == (2, 15, 3)
        assert len(r["features"]["fill_error"]) == 4
    assert len({tuple(r["cases"]) for r in res["runs"] if r["cues"] == 1.0}) == 1  # the same held-out cases
    before = toy.stat().st_mtime_ns
    sweep.run_sweep(toy, **TOY)
    assert json.loads(toy.read_text())["runs"] == res["runs"]  # nothing retrained
    assert toy.stat().st_mtime_ns >= before


def test_gain_is_the_paired_difference_and_the_sentence_follows_the_interval(toy):
    res = sweep.load_sweep(toy)
    rows = sweep.gains(res)
    assert {(r["cues"], r["outcome"]) for r in rows} == {(c, o) for c in (0.0, 1.0) for o in sweep.OUTCOMES}
    for r in rows:
        seeds, a, b = sweep.paired(res, r["cues"])
        group, regions = sweep.OUTCOMES[r["outcome"]]
        by_hand = np.nanmean(stats.group_means(a, group, regions) - stats.group_means(b, group, regions))
        assert r["comparison"].diff == pytest.approx(by_hand)
        c = r["comparison"]
        assert c.low <= c.diff <= c.high
        assert ("excludes zero" in r["sentence"]) == c.excludes_zero


def test_kd_weight_table_and_report(toy):
    res = sweep.load_sweep(toy)
    table = sweep.kd_weight_table(res, cues=1.0)
    assert [row["kd_weight"] for row in table] == [0.0, 0.1, 1.0]
    md = sweep.report_markdown(res)
    assert md.count("| 0 | ") >= 2 and md.count("| 1 | ") >= 2 and "python -m lckd_kit.sweep" in md
    fig = sweep.plot_gains(res)
    assert len(fig.axes) == len(sweep.OUTCOMES)


def test_committed_results_cover_the_design():
    res = sweep.load_sweep()  # the file that ships with the kit and that notebook 05 reads
    cues = sorted({r["cues"] for r in res["runs"]})
    assert len(cues) >= 3 and 0.0 in cues and 1.0 in cues
    for c in cues:
        seeds, a, b = sweep.paired(res, c)
        assert len(seeds) >= 3 and a.shape == b.shape and a.shape[1] >= 6
    assert {r["kd_weight"] for r in res["runs"] if r["kind"] == "lckd"} >= {0.1, 1.0}
    assert res["command"].startswith("python -m lckd_kit.sweep")


def test_the_page_states_what_the_committed_results_say():
    # every number on docs/when_distillation_helps.md is generated from the committed results
    page = (Path(__file__).resolve().parents[1] / "docs" / "when_distillation_helps.md").read_text()
    assert sweep.report_markdown(sweep.load_sweep()) in page
