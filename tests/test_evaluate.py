"""Tests for the 15-subset evaluation: metric conventions, shared-encoding == per-subset inference,
ET post-processing, EvalResult tables / files, and predict_case's NIfTI output.

Fast: constructed masks, tiny untrained LCKDNets on small volumes, a stub model whose
predictions are set exactly, and 32^3 phantoms.
"""
from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from lckd_kit import ALL_PRESENT, SUBSETS, phantom, subset_name
from lckd_kit.data import find_cases, load_case
from lckd_kit.evaluate import EvalResult, evaluate
from lckd_kit.inference import per_subset_reference, predict_case, predict_subsets
from lckd_kit.metrics import HD95_FLAVOUR, image_diagonal, nest_regions, postprocess_et, region_metrics, score_regions
from lckd_kit.model import CONFIGS, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(name: str, **kw):
    torch.manual_seed(0)
    return build_model(replace(CONFIGS[name], **kw)).eval()


def cubes(shift: int, axis: int, n: int = 16, size: int = 4):
    """Truth: a size^3 cube in all three regions; prediction: the same cube shifted along ``axis``."""
    truth = np.zeros((3, n, n, n), bool)
    box = [slice(None)] + [slice(4, 4 + size)] * 3
    truth[tuple(box)] = True
    pred = np.zeros_like(truth)
    box[axis + 1] = slice(4 + shift, 4 + size + shift)
    pred[tuple(box)] = True
    return pred, truth


# ---------------------------------------------------------------------------------- metrics


def test_image_diagonal_is_the_brats_penalty():
    assert image_diagonal((240, 240, 155), 1.0) == pytest.approx(373.12866, abs=1e-4)
    assert image_diagonal((96, 96, 96), 2.0) == pytest.approx(332.55375, abs=1e-4)
    assert image_diagonal((10, 20, 5), (3.0, 1.0, 2.0)) == pytest.approx(np.sqrt(30**2 + 20**2 + 10**2))


def test_empty_region_conventions():
    truth = np.zeros((3, 20, 20, 10), bool)
    truth[1, 5:9, 5:9, 3:6] = True  # TC only
    truth[2] = truth[1]
    pred = np.zeros_like(truth)
    pred[0, 2:4, 2:4, 2:4] = True  # ET predicted, truth has no ET
    pred[2] = truth[2]  # WT perfect; TC predicted empty
    # this grid at (12, 12, 15.5) mm is 240 x 240 x 155 mm: the brats2018 penalty is 373.13
    sp = (12.0, 12.0, 15.5)
    m = region_metrics(pred, truth, spacing=sp)
    assert m["ET"] == pytest.approx({"dice": 0.0, "hd95": 373.12866}, abs=1e-4)  # truth empty, pred not
    assert m["TC"] == pytest.approx({"dice": 0.0, "hd95": 373.12866}, abs=1e-4)  # pred empty, truth not
    assert m["WT"] == pytest.approx({"dice": 1.0, "hd95": 0.0})
    # the penalty follows the grid: 96^3 at 2 mm -> 332.55
    t96 = np.zeros((3, 96, 96, 96), bool)
    t96[:, 40:44, 40:44, 40:44] = True
    m96 = region_metrics(np.zeros_like(t96), t96, spacing=2.0)
    assert m96["WT"]["hd95"] == pytest.approx(332.55375, abs=1e-4) and m96["WT"]["dice"] == 0.0
    # explicit penalty, other conventions
    assert region_metrics(pred, truth, spacing=sp, penalty=100.0)["TC"]["hd95"] == 100.0
    assert region_metrics(pred, truth, spacing=sp, convention="brats2023_legacy")["ET"]["hd95"] == 374.0
    both_empty = np.zeros_like(truth)
    legacy = region_metrics(both_empty, both_empty, convention="brats2023_legacy")
    assert legacy["ET"] == {"dice": 1.0, "hd95": 0.0}
    assert region_metrics(both_empty, both_empty)["WT"] == {"dice": 1.0, "hd95": 0.0}
    new = region_metrics(both_empty, both_empty, convention="brats_eval_0_0_10")
    assert all(np.isnan(v["dice"]) and np.isnan(v["hd95"]) for v in new.values())
    assert region_metrics(pred, truth, convention="brats_eval_0_0_10")["TC"] == {"dice": 0.0, "hd95": 373.0}
    with pytest.raises(ValueError, match="convention"):
        region_metrics(pred, truth, convention="brats2099")


def test_known_overlaps_and_physical_hd95():
    # 4^3 cubes shifted by 1 voxel: overlap 3/4 -> Dice 0.75; by 2 voxels -> 0.5
    pred, truth = cubes(1, axis=0)
    m = region_metrics(pred, truth, spacing=1.0)
    assert m["ET"]["dice"] == pytest.approx(0.75) and m["ET"]["hd95"] == pytest.approx(1.0)
    # the same shift along an axis with 3 mm voxels is 3 mm; along a 1 mm axis it stays 1 mm
    assert region_metrics(pred, truth, spacing=(3.0, 1.0, 1.0))["TC"]["hd95"] == pytest.approx(3.0)
    pred_y, _ = cubes(1, axis=1)
    assert region_metrics(pred_y, truth, spacing=(3.0, 1.0, 1.0))["TC"]["hd95"] == pytest.approx(1.0)
    pred2, _ = cubes(2, axis=0)
    m2 = region_metrics(pred2, truth, spacing=2.0)
    assert m2["WT"]["dice"] == pytest.approx(0.5) and m2["WT"]["hd95"] == pytest.approx(4.0)
    # batched scoring gives the same numbers, one row per prediction
    dice, hd = score_regions(np.stack([pred, pred2]), truth, spacing=2.0)
    assert dice.shape == hd.shape == (2, 3)
    np.testing.assert_allclose(dice[:, 0], [0.75, 0.5], atol=1e-6)
    np.testing.assert_allclose(hd[:, 0], [2.0, 4.0], atol=1e-6)
    # hd95=False: Dice only
    d_only, hd_only = score_regions(np.stack([pred, pred2]), truth, spacing=2.0, hd95=False)
    np.testing.assert_array_equal(d_only, dice)
    assert np.isnan(hd_only).all()
    assert "max of the two directed" in HD95_FLAVOUR


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI-internal deprecation notice
def test_hd95_equals_monai_on_the_whole_volume():
    """score_regions crops to the masks' box before calling MONAI: same numbers, also at the border."""
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(0)
    truth = np.zeros((3, 20, 16, 12), bool)
    truth[0, 0:6, 3:9, 0:5] = True  # touches the image border
    truth[1, 5:15, 2:14, 3:11] = True
    truth[2] = rng.uniform(size=truth[2].shape) > 0.97  # scattered specks
    pred = np.roll(truth, 2, axis=1) | (rng.uniform(size=truth.shape) > 0.995)
    sp = (1.0, 2.0, 3.0)
    _, hd = score_regions(pred, truth, spacing=sp)
    ref = compute_hausdorff_distance(torch.as_tensor(pred)[None], torch.as_tensor(truth)[None], include_background=True,
                                     percentile=95, spacing=sp)[0].numpy()
    np.testing.assert_allclose(hd[0], ref, rtol=1e-6)


def test_nesting_and_et_postprocessing():
    r = torch.zeros(3, 10, 10, 10, dtype=torch.bool)
    r[0, 1:3, 1:3, 1:3] = True  # ET outside TC / WT
    nested = nest_regions(r)
    assert nested[1].sum() == 8 and nested[2].sum() == 8
    # 62 voxels of 2 mm = 496 mm^3 < 500 -> relabelled necrosis; 63 voxels = 504 mm^3 -> kept
    for n_et, removed in ((62, True), (63, False)):
        x = torch.zeros(3, 8, 8, 8, dtype=torch.bool)
        x.view(3, -1)[0, :n_et] = True
        x = nest_regions(x)
        out = postprocess_et(x, spacing=2.0, et_min_voxels=500)
        assert out[0].sum() == (0 if removed else n_et)
        assert torch.equal(out[1], x[1]) and torch.equal(out[2], x[2])  # kept in TC and WT
    # at 1 mm the threshold is 500 voxels
    x = torch.zeros(2, 3, 10, 10, 10, dtype=torch.bool)
    x[0, :, :5] = True  # 500 ET voxels: kept
    x[1, :, :4] = True  # 400: removed
    out = postprocess_et(x, spacing=1.0)
    assert out[0, 0].sum() == 500 and out[1, 0].sum() == 0 and out[1, 1].sum() == 400


# ---------------------------------------------------------------------------------- shared encoding


@pytest.mark.parametrize("name,image_shape,roi", [
    ("small2d", (4, 40, 32, 8), (32, 32, 8)),  # 2-D: slices folded into the batch, overlap along X
    ("small", (4, 48, 16, 16), (32, 16, 16)),  # 3-D: two overlapping windows along X
])
def test_shared_encoding_equals_per_subset_inference(name, image_shape, roi):
    model_roi = roi[:2] if name == "small2d" else roi
    model = tiny_model(name, roi_size=model_roi)
    g = torch.Generator().manual_seed(3)
    image = torch.randn(image_shape, generator=g)
    fast = predict_subsets(model, image, SUBSETS, roi_size=roi)  # a small model: one batched decode
    slow = per_subset_reference(model, image, SUBSETS, roi_size=roi)
    assert fast.shape == slow.shape == (15, 3, *image_shape[1:])
    # a decoder batch of 15x changes the conv kernels' summation order: float32 rounding, ~2e-5
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)
    for k in (1, 4):  # one decoder call per subset; uneven chunks of 4
        torch.testing.assert_close(predict_subsets(model, image, SUBSETS, roi_size=roi, decode_batch=k), fast,
                                   atol=1e-4, rtol=0)

    # the evaluation's Dice / HD95 rows equal those of the slow path's masks
    label = np.zeros((3, *image_shape[1:]), np.uint8)
    label[:, 10:30, 4:12, 2:7] = 1
    label[0, 14:20] = 0
    case = {"name": "c0", "image": image.numpy(), "label": label, "spacing": (2.0, 2.0, 2.0), "normalized": True}
    res = evaluate(model, [case], roi_size=roi)
    ambiguous = (slow - 0.5).abs() < 1e-4  # threshold flips within float noise are not a difference
    assert torch.equal((fast > 0.5) | ambiguous, (slow > 0.5) | ambiguous)
    dice, hd = score_regions(nest_regions(slow > 0.5), label, spacing=2.0)
    if not ambiguous.any():
        np.testing.assert_array_equal(res.per_case("dice")[0], dice)
        np.testing.assert_array_equal(res.per_case("hd95")[0], hd)
    else:  # pragma: no cover - depends on the platform's float rounding
        np.testing.assert_allclose(res.per_case("dice")[0], dice, atol=1e-3)


# ---------------------------------------------------------------------------------- evaluate / EvalResult


class RegionStub(torch.nn.Module):
    """A stub segmenter: channels 0-2 of the image ARE its ET/TC/WT prediction, whatever the subset."""

    def __init__(self, roi=(16, 16, 16)):
        super().__init__()
        self.config = SimpleNamespace(spatial_dims=3, roi_size=roi, size_divisor=(1, 1, 1), name="stub")
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def encode(self, x):
        return x

    def decode(self, enc, available):
        return 20 * (enc[:, :3] - 0.5)


def stub_case(name: str, truth_et: bool, n_pred_et: int = 0) -> dict:
    """16^3 at 2 mm: a TC/WT block (predicted perfectly). With ``truth_et`` the truth has 256 ET
    voxels, predicted exactly; otherwise no ET, and the prediction puts ``n_pred_et`` ET voxels in TC."""
    label = np.zeros((3, 16, 16, 16), np.uint8)
    label[1:, 4:12, 4:12, 4:12] = 1
    image = np.zeros((4, 16, 16, 16), np.float32)
    if truth_et:
        label[0, 4:12, 4:12, 4:8] = 1
        image[0] = label[0]
    else:
        image[0].reshape(-1)[np.flatnonzero(label[1].reshape(-1))[:n_pred_et]] = 1.0
    image[1:3] = label[1:]
    return {"name": name, "image": image, "label": label, "spacing": (2.0, 2.0, 2.0), "normalized": True}


def test_postprocessed_rows_are_reported_separately():
    # case a: no ET in truth, 10 predicted ET voxels (80 mm^3 < 500) -> the rule removes them
    # case b: ET in truth (256 voxels), predicted exactly (2048 mm^3) -> untouched
    cases = [stub_case("a", truth_et=False, n_pred_et=10), stub_case("b", truth_et=True)]
    res = evaluate(RegionStub(), cases, postprocess=True)
    assert len(res.rows) == 2 * 15 * 3 * 2
    raw = [r for r in res.rows if not r["postprocessed"]]
    post = [r for r in res.rows if r["postprocessed"]]
    assert len(raw) == len(post) == 2 * 15 * 3
    assert all(r["convention"] == "brats2018" for r in res.rows)
    et = {(r["case"], r["postprocessed"]): (r["dice"], r["hd95"]) for r in res.rows
          if r["region"] == "ET" and r["subset"] == "flair"}
    assert et[("a", False)] == pytest.approx((0.0, image_diagonal((16, 16, 16), 2.0)))
    assert et[("a", True)] == (1.0, 0.0)  # both empty after the rule
    assert et[("b", False)][0] == pytest.approx(1.0) and et[("b", True)][0] == pytest.approx(1.0)
    raw_t, post_t = res.dice_table(), res.dice_table(postprocessed=True)
    assert raw_t.shape == post_t.shape == (15, 3)
    np.testing.assert_allclose(raw_t[:, 0], 0.5)  # mean of 0 and 1
    np.testing.assert_allclose(post_t[:, 0], 1.0)
    np.testing.assert_allclose(raw_t[:, 1:], 1.0)  # the moved ET voxels were inside TC already
    assert res.meta["postprocess"] and res.meta["et_min_mm3"] == 500
    assert res.meta["penalty_mm"] == pytest.approx(image_diagonal((16, 16, 16), 2.0), abs=1e-3)
    # no post-processing asked: no such rows, and asking for their table says so
    plain = evaluate(RegionStub(), cases)
    assert not plain.has_postprocessed and len(plain.rows) == 2 * 15 * 3
    with pytest.raises(ValueError, match="post-processed"):
        plain.dice_table(postprocessed=True)


def test_eval_result_tables_markdown_files_and_round_trip(tmp_path):
    cases = [stub_case("a", truth_et=False, n_pred_et=10), stub_case("b", truth_et=True)]
    res = evaluate(RegionStub(), cases, convention="brats_eval_0_0_10", postprocess=True)
    assert res.subsets == list(SUBSETS) and res.cases == ["a", "b"]
    assert res.per_case().shape == (2, 15, 3)
    # brats_eval_0_0_10: case a's post-processed ET is both-empty -> NaN, excluded from the mean
    post = res.per_case("dice", postprocessed=True)
    assert np.isnan(post[0, :, 0]).all() and res.dice_table(True)[:, 0] == pytest.approx(np.ones(15))
    assert res.hd95_table().shape == (15, 3)

    md = res.markdown(title="stub")
    rows = [ln for ln in md.splitlines() if ln.startswith("| ●") or ln.startswith("| ○")]
    assert len(rows) == 2 * 15  # raw and post-processed tables
    assert "| ● | ● | ● | ● |" in md and "**Mean**" in md and "brats_eval_0_0_10" in md

    files = res.save(tmp_path / "eval")
    assert sorted(f.name for f in files) == ["heatmap.png", "results.csv", "results.json", "table.md"]
    assert all(f.is_file() and f.stat().st_size > 0 for f in files)
    assert (tmp_path / "eval" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    json.loads((tmp_path / "eval" / "results.json").read_text())  # strict JSON (NaN -> null)
    assert len((tmp_path / "eval" / "results.csv").read_text().splitlines()) == len(res.rows) + 1
    back = EvalResult.from_json(tmp_path / "eval" / "results.json")
    assert back.convention == "brats_eval_0_0_10" and len(back.rows) == len(res.rows)
    np.testing.assert_array_equal(back.dice_table(True), res.dice_table(True))
    np.testing.assert_array_equal(back.hd95_table(), res.hd95_table())
    fig = res.heatmap("stub")
    assert len(fig.axes) >= 2

    # a partial evaluation still tabulates (named rows) and saves without a heatmap
    part = evaluate(RegionStub(), cases, subsets=["t1ce", ALL_PRESENT])
    assert part.dice_table().shape == (2, 3) and "| t1ce |" in part.markdown()
    assert "heatmap.png" not in [f.name for f in part.save(tmp_path / "part")]


def test_evaluate_restores_mode_and_rejects_bad_input():
    model = tiny_model("small2d", roi_size=(32, 16)).train()
    case = {"name": "x", "image": np.random.default_rng(0).normal(size=(4, 32, 16, 8)).astype(np.float32),
            "label": np.zeros((3, 32, 16, 8), np.uint8), "spacing": (1.0, 1.0, 1.0)}
    res = evaluate(model, [case], subsets=[ALL_PRESENT], roi_size=(32, 16, 8))
    assert model.training
    assert res.meta["model"] == "small2d" and res.meta["convention"] == "brats2018"
    with pytest.raises(ValueError, match="no cases"):
        evaluate(model, [])
    with pytest.raises(ValueError, match="label"):
        evaluate(model, [{**case, "label": None}])
    with pytest.raises(ValueError, match="convention"):
        evaluate(model, [case], convention="nope")


# ---------------------------------------------------------------------------------- predict_case


def _write_phantom(tmp_path, name="PhantomBraTS_000", label_style="brats2018", flip_x=False):
    case = phantom.make_case(3, grid=32, label_style=label_style)
    if flip_x:  # an LPS-like file: x stored the other way round
        case = dict(case)
        case["image"] = case["image"][:, ::-1].copy()
        case["label"] = case["label"][::-1].copy()
        aff = np.array(case["affine"], dtype=np.float64)
        aff[:, 3] = aff @ np.array([31, 0, 0, 1.0])
        aff[:, 0] *= -1
        case["affine"] = aff
    phantom.write_case(case, tmp_path / "data", name, label_style=label_style)
    (found,) = find_cases(tmp_path / "data" / name)
    return found


@pytest.mark.parametrize("label_style,values,flip_x", [
    ("brats2018", {0, 1, 2, 4}, False),
    ("brats2023", {0, 1, 2, 3}, False),
    ("brats2018", {0, 1, 2, 4}, True),
])
def test_predict_case_writes_nifti_in_the_case_geometry_and_convention(tmp_path, label_style, values, flip_x):
    case = _write_phantom(tmp_path, label_style=label_style, flip_x=flip_x)
    model = tiny_model("small2d", roi_size=(32, 32))
    out = predict_case(model, case, "flair+t1ce", out_path=tmp_path / "pred.nii.gz", roi_size=(32, 32, 16))
    assert out == tmp_path / "pred.nii.gz" and out.is_file()
    seg = nib.load(str(case.label_file))
    pred = nib.load(str(out))
    assert pred.shape == seg.shape
    np.testing.assert_allclose(pred.affine, seg.affine)
    labels = np.asarray(pred.dataobj)
    assert set(np.unique(labels).tolist()) <= values
    # the file holds the (RAS) regions returned without out_path, written back in the file's orientation
    regions = predict_case(model, case, "flair+t1ce", roi_size=(32, 32, 16))
    assert regions.shape == (3, 32, 32, 32) and regions.dtype == np.uint8
    assert (regions[0] <= regions[1]).all() and (regions[1] <= regions[2]).all()  # nested
    loaded = load_case(case)
    from lckd_kit.labels import labels_to_regions
    back = labels_to_regions(labels[::-1] if flip_x else labels, loaded["convention"])
    np.testing.assert_array_equal(back, regions)
    # a folder as out_path: named after the case and the subset
    named = predict_case(model, loaded, "t2", out_path=tmp_path, roi_size=(32, 32, 16))
    assert named == tmp_path / f"{case.name}_{subset_name((False, False, False, True))}.nii.gz"
