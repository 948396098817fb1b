"""Tests of lckd_kit.widgets: the explorer core, its render function and the widget wrappers.

No browser: the widgets are driven by setting ``.value`` on their controls, and the outcome is read
from the numbers (probabilities, Dice) and from the PNG bytes in the ``ipywidgets.Image``.
Tiny randomly initialised models and a 32³ phantom keep the file fast on a CPU.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import dataclasses

import numpy as np
import pytest
import torch

from lckd_kit import ALL_PRESENT, REGIONS, SUBSETS, phantom
from lckd_kit.evaluate import evaluate
from lckd_kit.inference import blended_encoding, predict_subsets
from lckd_kit.labels import labels_to_regions
from lckd_kit.model import CONFIGS, build_model
from lckd_kit.transforms import normalize_image
from lckd_kit.widgets import WARNING_TEXT, Explorer, ExplorerState, SliceViewer, explorer, render_view

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def raw_case():
    return phantom.make_case(0, grid=32)


@pytest.fixture(scope="module")
def case(raw_case):
    """(image (4, 32, 32, 32) normalised, regions (3, 32, 32, 32), spacing)."""
    image = normalize_image(raw_case["image"].astype(np.float32))
    return image, labels_to_regions(raw_case["label"], "brats2018"), tuple(raw_case["spacing"])


@pytest.fixture(scope="module")
def cropped(case):
    """A NON-CUBIC 32×28×20 crop (not a multiple of the model's stride 16 along Y and Z)."""
    image, label, spacing = case
    sl = (slice(None), slice(None), slice(2, 30), slice(6, 26))
    return image[sl], label[sl], spacing


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(dataclasses.replace(CONFIGS["small"], roi_size=(32, 32, 32))).eval()


@pytest.fixture
def state(case, model):
    return ExplorerState(model, *case, name="phantom-0", normalized=True)


@pytest.fixture
def count_calls(model):
    """Count model.encode calls and the subsets decoded (``decode`` one, ``decode_many`` one per mask);
    instance attributes shadow the methods."""
    calls = {"decode": 0, "encode": 0}
    names = ("decode", "decode_many", "encode")
    orig = {k: getattr(model, k) for k in names}

    def wrap(name):
        def f(*args, **kwargs):
            if name == "decode_many":
                calls["decode"] += len(args[1] if len(args) > 1 else kwargs["masks"])
            else:
                calls[name] += 1
            return orig[name](*args, **kwargs)
        return f

    for k in names:
        object.__setattr__(model, k, wrap(k))
    yield calls
    for k in names:
        del model.__dict__[k]


def _visible(widget) -> bool:
    return widget.layout.display != "none"


# ----------------------------------------------------------------------------------------------
# the core: the evaluation's inference, all 15 subsets in one pass, cached


def test_one_pass_predicts_all_15_subsets_and_caches_them(state, count_calls):
    p1 = state.probabilities("flair+t1ce")
    assert p1.shape == (3, 32, 32, 32) and p1.dtype == np.float32
    assert 0.0 <= p1.min() and p1.max() <= 1.0
    assert state.predict_calls == 1 and count_calls["decode"] == 15  # one window, 15 subsets decoded
    # the same subset again, spelled differently, and every other subset: from the cache
    assert state.probabilities((True, False, True, False)) is p1
    for subset in SUBSETS:
        state.dice(subset)
    assert state.predict_calls == 1 and count_calls["decode"] == 15 and count_calls["encode"] == 1


@pytest.mark.parametrize("subset", ["flair", "t1+t2", "flair+t1ce+t2", ALL_PRESENT])
def test_probabilities_are_predict_subsets_on_a_non_cubic_volume(cropped, model, subset):
    st = ExplorerState(model, *cropped, normalized=True)
    ref = predict_subsets(model, cropped[0], [subset])[0].numpy()  # the same defaults as evaluate()
    got = st.probabilities(subset)
    assert got.shape == (3, 32, 28, 20)
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("name", ["small", "small2d"])
def test_explorer_dice_equals_the_evaluation_for_every_subset(cropped, model, name):
    """The explorer tells the evaluation's story: the same window, inference and thresholds."""
    torch.manual_seed(1)
    net = model if name == "small" else build_model(dataclasses.replace(CONFIGS["small2d"], roi_size=(32, 16))).eval()
    image, label, spacing = cropped
    st = ExplorerState(net, image, label, spacing, normalized=True)
    case = {"name": "c", "image": image, "label": label, "spacing": spacing, "normalized": True}
    ev = evaluate(net, [case], hd95=False).per_case("dice")[0]  # (15, 3)
    np.testing.assert_array_equal(st.all_subset_dice(), ev)


def test_no_modality_raises_value_error(state):  # NoModalityError is a ValueError
    with pytest.raises(ValueError, match="no modality selected"):
        state.probabilities((False, False, False, False))
    with pytest.raises(ValueError, match="no modality selected"):
        render_view(state, (False,) * 4)


def test_dice_and_all_subset_dice(state):
    d = state.dice(ALL_PRESENT)
    assert set(d) == set(REGIONS) and all(0.0 <= v <= 1.0 for v in d.values())
    table = state.all_subset_dice()
    assert table.shape == (15, 3) and np.all((table >= 0) & (table <= 1))
    assert state.all_subset_dice() is table and state.predict_calls == 1  # cached
    row = SUBSETS.index(ALL_PRESENT)
    np.testing.assert_allclose(table[row], [d[r] for r in REGIONS])
    # a hand-made Dice of one subset and region: WT of the nested prediction (WT |= TC |= ET)
    pred = (state.probabilities("t1") > 0.5).any(0)
    t = state.label[2].astype(bool)
    wt = 2 * (pred & t).sum() / (pred.sum() + t.sum())
    assert table[SUBSETS.index((False, True, False, False)), 2] == pytest.approx(wt)


def test_unlabelled_case(case, model):
    st = ExplorerState(model, case[0], None, normalized=True)
    assert st.dice("flair") is None
    with pytest.raises(ValueError, match="no ground truth"):
        st.all_subset_dice()
    ex = Explorer(st)
    assert "no ground truth" in ex.dice_label.value
    assert ex.heatmap_button.disabled and ex.show_truth.disabled and ex.last_error is None


# ----------------------------------------------------------------------------------------------
# the feature blend


def test_blend_all_ones_is_the_plain_prediction(case, model, state, count_calls):
    x = torch.from_numpy(case[0])[None]
    with torch.no_grad():
        enc = model.encode(x)
        for mask in (ALL_PRESENT, (True, False, True, False), (False, False, False, True)):
            plain = model.decode(enc, mask)
            blended = model.decode(blended_encoding(enc, mask, (1.0, 1.0, 1.0, 1.0)), ALL_PRESENT)
            torch.testing.assert_close(blended, plain, rtol=0, atol=1e-6)
    # through the state: an all-ones blend is the cached plain prediction, no extra pass
    p = state.probabilities("flair+t1")
    assert state.probabilities("flair+t1", blend=(1, 1, 1, 1)) is p
    assert state.predict_calls == 1
    # a real blend is one more pass, cached
    b = state.probabilities("flair+t1", blend=(0.5, 1, 1, 1))
    assert state.probabilities("flair+t1", blend=(0.5, 1, 1, 1)) is b and state.predict_calls == 2


def test_blend_zero_puts_the_fill_in_the_bottleneck_and_keeps_own_skips(case, model):
    """w_m = 0: modality m's bottleneck slot = the fill (mean of the SELECTED modalities' features,
    m included); its skip features stay its own (not the zero-input response). Deselected slots are
    the fill and the zero response, as in the model."""
    mask, blend = (True, True, True, False), (0.0, 1.0, 0.5, 1.0)
    seen = {}
    hook = model.decoder.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0], skips=args[1]))
    try:
        with torch.no_grad():
            enc = model.encode(torch.from_numpy(case[0])[None])
            model.decode(blended_encoding(enc, mask, blend), ALL_PRESENT)
    finally:
        hook.remove()
    f = enc.bottleneck  # (1, 4, C, *b)
    fused = seen["x"].unflatten(1, (4, f.shape[2]))
    fill = f[:, :3].mean(1)
    torch.testing.assert_close(fused[:, 0], fill)  # w = 0: the fill
    torch.testing.assert_close(fused[:, 1], f[:, 1])  # w = 1: its own feature
    torch.testing.assert_close(fused[:, 2], 0.5 * f[:, 2] + 0.5 * fill)
    torch.testing.assert_close(fused[:, 3], fill)  # deselected: mean-filled, as the model does
    for s, own, zero in zip(seen["skips"], enc.skips, enc.zero_skips):
        s = s.unflatten(1, (4, own.shape[2]))
        torch.testing.assert_close(s[:, 0], own[:, 0])  # blended to 0, skips still its own
        torch.testing.assert_close(s[:, 3], zero.expand_as(s[:, 3]))  # deselected: zero response


def test_blend_effects_on_the_prediction(state):
    # one selected modality: the fill IS its feature, so every blend is the plain prediction
    np.testing.assert_allclose(state.probabilities("t1ce", blend=(0.3, 0.0, 0.0, 0.7)),
                               state.probabilities("t1ce"), atol=1e-5)
    # FLAIR blended to 0 is neither the plain prediction nor FLAIR removed
    plain = state.probabilities(ALL_PRESENT)
    zero = state.probabilities(ALL_PRESENT, blend=(0.0, 1.0, 1.0, 1.0))
    removed = state.probabilities("t1+t1ce+t2")
    assert np.abs(zero - plain).max() > 1e-4 and np.abs(zero - removed).max() > 1e-4
    with pytest.raises(ValueError, match="0, 1"):
        state.probabilities(ALL_PRESENT, blend=(1.5, 1, 1, 1))


# ----------------------------------------------------------------------------------------------
# the render function and the widgets


def test_render_view_structure(state):
    fig = render_view(state, (True, False, True, False), "coronal", 10, blend=(0.5, 1, 1, 1))
    axes = fig.axes
    assert len(axes) == 5  # main panel + 2×2 thumbnails
    title = fig._suptitle.get_text()
    assert "FLAIR + T1ce" in title and "coronal slice 10" in title and "Dice" in title
    assert "not a physical quantity" in title
    assert "missing" in axes[2].get_title() and "missing" in axes[4].get_title()  # T1, T2
    assert len(axes[2].lines) == 2 and len(axes[1].lines) == 0  # the cross on a missing modality
    assert "blend 0.50" in axes[1].get_title()
    # FLAIR missing: the main panel falls back to the first selected modality
    assert render_view(state, "t1ce+t2").axes[0].get_title() == "T1ce"


def test_explorer_toggles_change_image_and_dice(state):
    ex = Explorer(state)
    assert [t.description for t in ex.toggles] == ["FLAIR", "T1", "T1ce", "T2"]
    assert all(t.value for t in ex.toggles) and not _visible(ex.warning)
    png0, html0 = ex.image.value, ex.dice_label.value
    assert png0[:8] == b"\x89PNG\r\n\x1a\n"
    ex.toggles[0].value = False  # drop FLAIR
    assert ex.last_error is None
    assert ex.image.value != png0 and ex.dice_label.value != html0
    d = state.dice((False, True, True, True))
    assert d != state.dice(ALL_PRESENT)
    for r in REGIONS:
        assert f"{r} {d[r]:.3f}" in ex.dice_label.value
    assert ex.blend_sliders[0].disabled and not ex.blend_sliders[1].disabled
    # a blend slider changes the render too
    png1 = ex.image.value
    ex.blend_sliders[2].value = 0.0
    assert ex.blend == (1.0, 1.0, 0.0, 1.0) and ex.image.value != png1 and ex.last_error is None
    ex.reset_blend()
    assert ex.blend is None and ex.image.value == png1


def test_explorer_no_modality_shows_warning_and_keeps_image(state):
    ex = Explorer(state)
    for t in ex.toggles[:3]:
        t.value = False
    png = ex.image.value  # T2 only
    ex.toggles[3].value = False  # nothing selected: must not raise
    assert ex.last_error is None
    assert _visible(ex.warning) and WARNING_TEXT in ex.warning.value
    assert ex.image.value == png
    ex.show_3d()  # also safe with nothing selected
    ex.toggles[2].value = True
    assert not _visible(ex.warning) and ex.warning.value == ""
    assert ex.image.value != png and ex.last_error is None


def test_plane_and_slice_stay_in_range_for_a_non_cubic_volume(cropped, model):
    ex = Explorer(ExplorerState(model, *cropped, normalized=True))  # 32 × 28 × 20
    assert ex.slice_slider.max == 19 and 0 <= ex.slice_slider.value <= 19
    for plane, n in (("sagittal", 32), ("coronal", 28), ("axial", 20), ("sagittal", 32), ("axial", 20)):
        ex.slice_slider.value = ex.slice_slider.max  # the far end of the previous plane
        png = ex.image.value
        ex.plane.value = plane
        assert ex.slice_slider.max == n - 1 and 0 <= ex.slice_slider.value <= ex.slice_slider.max
        assert ex.last_error is None and ex.image.value != png
    ex.slice_slider.value = 0
    assert ex.last_error is None


def test_heatmap_and_3d_buttons(state):
    ex = Explorer(state)
    ex.heatmap_button.click()
    fig = ex.heatmap_figure
    assert fig is not None and len(ex.heatmap_out.outputs) == 1
    assert np.asarray(fig.data[0].z, dtype=float).shape == (15, 3)
    row = SUBSETS.index(ALL_PRESENT)
    assert fig.layout.shapes[0].y0 == row - 0.5  # the current subset is framed
    ex.toggles[1].value = False  # the frame follows the subset
    assert ex.heatmap_figure.layout.shapes[0].y0 == SUBSETS.index((True, False, True, True)) - 0.5
    ex.view3d_button.click()
    assert ex.view3d_figure is not None and len(ex.view3d_figure.data) > 0
    assert len(ex.view3d_out.outputs) == 1


def test_css_classes_for_the_browser_test(state):
    ex = Explorer(state)
    classes = lambda w: set(getattr(w, "_dom_classes", ()))  # noqa: E731
    assert [("lckd-toggle-" + m) in classes(t) for m, t in zip(("flair", "t1", "t1ce", "t2"), ex.toggles)] == [True] * 4
    for w, c in ((ex.slice_slider, "lckd-slice-slider"), (ex.dice_label, "lckd-dice"), (ex.image, "lckd-image"),
                 (ex.warning, "lckd-warning"), (ex.plane, "lckd-plane"), (ex.widget, "lckd-explorer")):
        assert c in classes(w)


def test_explorer_convenience(raw_case, model, tmp_path):
    with pytest.raises(FileNotFoundError, match="lckd-kit train"):
        explorer(raw_case, checkpoint=tmp_path / "missing.pt")
    ex = explorer(raw_case, model=model)  # raw phantom dict: normalised and labels converted here
    assert isinstance(ex, Explorer) and ex.state.shape == (32, 32, 32)
    assert ex.state.label.shape == (3, 32, 32, 32) and ex.state.label[2].sum() > 0
    assert ex.last_error is None and len(ex.image.value) > 0


def test_slice_viewer(cropped):
    image, label, spacing = cropped
    v = SliceViewer(image, label, spacing, name="crop")
    assert "lckd-viewer-slider" in v.slice_slider._dom_classes and "lckd-viewer-image" in v.image._dom_classes
    png = v.image.value
    v.slice_slider.value = (v.slice_slider.value + 5) % (v.slice_slider.max + 1)
    assert v.image.value != png
    v.slice_slider.value = v.slice_slider.max
    v.plane.value = "coronal"
    assert v.slice_slider.max == 27 and v.slice_slider.value <= 27
    v.plane.value = "axial"
    assert v.slice_slider.max == 19 and v.slice_slider.value <= 19
    png = v.image.value
    v.overlay.value = False
    assert v.image.value != png


# ----------------------------------------------------------------------------------------------
# several methods on one case


def test_method_explorer_keeps_the_view_and_hides_the_lckd_only_blend(raw_case, model):
    from lckd_kit import methods
    from lckd_kit.widgets import MethodExplorer

    torch.manual_seed(0)
    hemis = methods.build(dataclasses.replace(methods.as_config("hemis_small"), roi_size=(32, 32, 32))).eval()
    me = MethodExplorer({"LCKD": model, "HeMIS": hemis}, raw_case)
    lckd_view = me.current
    assert lckd_view.blend_supported and _visible(lckd_view.blend_box)
    lckd_view.toggles[2].value = False  # T1ce off
    lckd_view.plane.value = "coronal"
    lckd_view.slice_slider.value = 7
    other = me.select("HeMIS")
    assert me.choice.value == "HeMIS" and me.body.children == (other.widget,)
    assert other.available == (True, True, False, True)
    assert other.plane.value == "coronal" and other.slice_slider.value == 7
    assert not other.blend_supported and other.blend is None and not _visible(other.blend_box)
    assert other.last_error is None and other.render_count >= 1
    dice = me.dice()
    assert set(dice) == {"LCKD", "HeMIS"}
    assert dice["HeMIS"] == other.state.dice((True, True, False, True))
    assert me.select("LCKD") is lckd_view  # built once, reused
