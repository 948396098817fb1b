"""Tests of lckd_kit.calibration: the published tables and the comparison of 15-subset Dice tables.

Pure functions on constructed tables; :func:`calibration.calibrate` trains a model for minutes
and is exercised by ``benchmarks/calibration.py``, not here.
"""
from __future__ import annotations

import numpy as np
import pytest

from lckd_kit import MODALITIES, REGIONS, SUBSETS, calibration


def _mask(*mods: str) -> tuple[bool, ...]:
    return tuple(m in mods for m in MODALITIES)


def test_published_tables_in_kit_order():
    assert calibration.published_methods() == ["RFNet", "mmFormer"]
    mm = calibration.published_table("mmFormer")
    rf = calibration.published_table("RFNet")
    assert mm.shape == rf.shape == (15, 3)
    assert np.all((mm > 0.3) & (mm < 0.95))
    et, tc, wt = (REGIONS.index(r) for r in ("ET", "TC", "WT"))
    # spot checks against the published percentages (mmFormer, BraTS 2018)
    assert mm[SUBSETS.index(_mask("t1ce")), et] == pytest.approx(0.7602)
    assert mm[SUBSETS.index(_mask("t1")), wt] == pytest.approx(0.7701)
    assert mm[SUBSETS.index(_mask("flair", "t1", "t1ce", "t2")), tc] == pytest.approx(0.8236)
    assert rf[SUBSETS.index(_mask("flair", "t2")), et] == pytest.approx(0.4377)
    # what real scans show: T1ce is the best single modality for ET and TC, FLAIR for WT
    singles = [SUBSETS.index(_mask(m)) for m in MODALITIES]
    for table in (mm, rf):
        assert MODALITIES[int(np.argmax(table[singles, et]))] == "t1ce"
        assert MODALITIES[int(np.argmax(table[singles, tc]))] == "t1ce"
        assert MODALITIES[int(np.argmax(table[singles, wt]))] == "flair"
    with pytest.raises(ValueError, match="no published table"):
        calibration.published_table("UNet")


def test_summary_rows_of_the_published_table():
    s = calibration.summary(calibration.published_table("mmFormer"))
    assert list(s) == list(calibration.SUMMARY_ROWS)
    no_t1ce = [(0, 0, 0, 1), (0, 1, 0, 0), (1, 0, 0, 0), (1, 1, 0, 0), (0, 1, 0, 1), (1, 0, 0, 1), (1, 1, 0, 1)]
    et_pct = dict(zip(no_t1ce, [40.32, 32.74, 35.62, 39.36, 42.45, 43.46, 44.0]))
    assert s["ET without T1ce (mean of 7 subsets)"] == pytest.approx(np.mean(list(et_pct.values())) / 100)
    assert s["TC without T1ce (mean of 7 subsets)"] == pytest.approx(
        np.mean([68.04, 64.61, 64.53, 70.77, 70.42, 70.44, 72.01]) / 100)
    assert s["WT from T1 alone"] == pytest.approx(0.7701)
    assert s["WT from T1ce alone"] == pytest.approx(0.7711)
    assert s["WT from FLAIR alone"] == pytest.approx(0.8717)


def test_compare_identity_permutation_and_shift():
    ref = calibration.published_table("mmFormer")
    same = calibration.compare(ref)
    assert same.spearman == pytest.approx(1.0) and same.mae == 0.0
    np.testing.assert_array_equal(same.difference, 0)
    assert same.summary == same.reference_summary

    # a uniform shift keeps the ranks (Spearman 1) and moves every cell by the shift
    shifted = calibration.compare(ref - 0.05)
    assert shifted.spearman == pytest.approx(1.0) and shifted.mae == pytest.approx(0.05)

    # the same 45 numbers in another order: same values, other ranks
    rng = np.random.default_rng(0)
    perm = rng.permutation(45)
    scrambled = calibration.compare(ref.ravel()[perm].reshape(15, 3))
    assert scrambled.spearman < 0.5 and scrambled.mae > 0.1

    # regions swapped (a table in the CSV's region order by mistake) is far from the reference
    swapped = calibration.compare(ref[:, ::-1])
    assert swapped.spearman < 0.3

    # RFNet and mmFormer agree closely with each other
    other = calibration.compare(calibration.published_table("RFNet"), "mmFormer")
    assert other.spearman > 0.95 and other.mae < 0.02
    with pytest.raises(ValueError, match=r"\(15, 3\)"):
        calibration.compare(np.zeros((4, 3)))


def test_within_region_spearman_separates_modalities_from_region_order():
    ref = calibration.published_table("mmFormer")
    same = calibration.compare(ref)
    assert same.spearman_within == pytest.approx(1.0)
    # the regions' order alone: WT above TC above ET is most of the 45-cell rank correlation
    assert 0.7 < same.spearman_regions_only < 0.8
    assert calibration.compare(ref - 0.05).spearman_regions_only == same.spearman_regions_only  # the reference's
    # each region's 15 values shuffled among the subsets: the regions are right, the modalities wrong
    rng = np.random.default_rng(0)
    shuffled = calibration.compare(np.stack([ref[rng.permutation(15), r] for r in range(3)], axis=1))
    assert shuffled.spearman > 0.6 and shuffled.spearman_within < 0.2
    # RFNet orders the subsets of each region like mmFormer
    assert calibration.compare(calibration.published_table("RFNet")).spearman_within > 0.95


def test_markdown_side_by_side():
    ref = calibration.published_table("mmFormer")
    table = np.clip(ref + 0.01, 0, 1)
    cmp = calibration.compare(table, name="phantom")
    md = cmp.markdown(extra={"RFNet": calibration.published_table("RFNet")})
    lines = md.splitlines()
    assert lines[0] == "| subset | region | mmFormer (BraTS 2018) | RFNet | phantom | phantom - mmFormer (BraTS 2018) |"
    assert len([ln for ln in lines if ln.startswith("| flair") or ln.startswith("| t1") or ln.startswith("| t2")]) == 45
    assert "| t1ce | ET | 0.760 | 0.694 | 0.770 | +0.010 |" in lines
    assert any(ln.startswith("Spearman over the 45 cells: 1.000; mean absolute difference: 0.010") for ln in lines)
    assert any(ln.startswith("(For scale: within a region, over its 15 subsets, mean of ET, TC, WT: 1.000; "
                             "a table that knows only each cell's region: 0.775") for ln in lines)
    assert "| WT from T1 alone | 0.770 | 0.747 | 0.780 |" in lines
    d = cmp.to_dict()
    assert d["spearman"] == pytest.approx(1.0) and d["spearman_within"] == pytest.approx(1.0) and len(d["table"]) == 15


def test_calibration_measures_phantoms_with_the_shipped_recipe():
    # the calibration's claim ("a model trained like the shipped one learns this table") holds only
    # while both use the same schedule and augmentation
    from lckd_kit.experiment import SHIPPED_TRAIN_OVERRIDES

    assert calibration.RECIPES[3000] == SHIPPED_TRAIN_OVERRIDES
    assert SHIPPED_TRAIN_OVERRIDES["augment"] == "scanner"
    assert calibration.RECIPES[600]["stage1_steps"] + calibration.RECIPES[600]["stage2_steps"] == 600


def test_demo_recipe_stretches_the_demo_schedule_only_in_steps():
    # the steps table of docs/phantoms.md changes the demo's recipe in its length and nothing else
    assert calibration.demo_recipe(600) == calibration.RECIPES[600]
    longer = calibration.demo_recipe(1200)
    assert (longer["stage1_steps"], longer["stage2_steps"]) == (600, 600)
    assert {k: v for k, v in longer.items() if not k.endswith("_steps")} == \
        {k: v for k, v in calibration.RECIPES[600].items() if not k.endswith("_steps")}
    for bad in (0, 901):
        with pytest.raises(ValueError, match="even"):
            calibration.demo_recipe(bad)


def test_calibrate_trains_evaluates_and_reports_elections():
    # a toy run through the whole path: train on phantoms, score the held-out set, compare, elect
    res = calibration.calibrate(cues=1.0, n_train=4, n_test=2, grid=32, progress=False,
                                train_overrides=dict(stage1_steps=4, stage2_steps=4, elect_every=4, batch_size=1))
    assert res.table.shape == (15, 3) and np.isfinite(res.table).all() and ((0 <= res.table) & (res.table <= 1)).all()
    assert res.per_case.shape == (2, 15, 3) and len(res.cases) == 2
    assert res.comparison.spearman == pytest.approx(calibration.compare(res.table).spearman)
    assert res.params["steps"] == 8 and res.params["cues"] == 1.0 and res.wall_s > 0
    assert res.elections and set(res.final_winners) == {"ET", "TC", "WT"}
    assert all(m in ("flair", "t1", "t1ce", "t2") for m in res.final_winners.values())
    again = calibration.calibrate_model(res.model, cues=1.0, n_test=2, grid=32, progress=False,
                                        elections=res.elections)
    assert np.allclose(again.table, res.table) and again.final_winners == res.final_winners
