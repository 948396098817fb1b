"""Tests of lckd_kit.viz: every render function returns a figure of the expected structure.

Small synthetic volumes only, so the whole file runs in a few seconds on a CPU.
"""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from lckd_kit import REGIONS, SUBSETS, viz
from lckd_kit.checkpoint import read_history
from matplotlib import colors as mcolors
from matplotlib.figure import Figure


@pytest.fixture(autouse=True)
def _close_figures():
    """viz figures live outside pyplot, but close anything a test might have opened there."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _case(shape=(20, 24, 16)):
    """A (4, X, Y, Z) image of a box-shaped 'brain' and nested regions on the patient's right."""
    X, Y, Z = shape
    x, y, z = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    rng = np.random.default_rng(0)
    image = rng.random((4, X, Y, Z)).astype(np.float32) + 1.0
    r = np.sqrt((x - 0.7 * X) ** 2 + (y - Y / 2) ** 2 + (z - Z / 2) ** 2)
    wt, tc, et = r < 5, r < 3, (r < 3) & (r >= 2)
    truth = np.stack([et, tc, wt]).astype(np.uint8)
    return image, truth


def _texts(fig: Figure) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


# --------------------------------------------------------------------------------------- slices

@pytest.mark.parametrize("plane, expected", [("axial", (7, 5)), ("coronal", (9, 5)), ("sagittal", (9, 7))])
def test_take_slice_shapes(plane, expected):
    vol = np.zeros((5, 7, 9))  # X, Y, Z all different
    assert viz.take_slice(vol, plane).shape == expected
    assert viz.take_slice(np.zeros((3, 5, 7, 9)), plane, 0).shape == (3, *expected)


def test_take_slice_radiological_orientation():
    """RAS+: high X = patient's right -> image LEFT; high Y (anterior) and high Z (superior) -> UP."""
    vol = np.zeros((10, 12, 8))
    vol[9, 6, 4] = 1  # far right of the patient
    img = viz.take_slice(vol, "axial", 4)
    r, c = np.argwhere(img)[0]
    assert c == 0  # right on the viewer's left
    vol[:] = 0
    vol[5, 11, 4] = 1  # most anterior
    assert np.argwhere(viz.take_slice(vol, "axial", 4))[0][0] == 0  # anterior up
    vol[:] = 0
    vol[9, 6, 7] = 1  # right, superior
    r, c = np.argwhere(viz.take_slice(vol, "coronal", 6))[0]
    assert (r, c) == (0, 0)
    vol[:] = 0
    vol[5, 11, 7] = 1  # anterior, superior: face on the left of a sagittal view
    r, c = np.argwhere(viz.take_slice(vol, "sagittal", 5))[0]
    assert (r, c) == (0, 0)
    with pytest.raises(IndexError):
        viz.take_slice(vol, "axial", 8)
    with pytest.raises(ValueError):
        viz.take_slice(vol, "transverse", 0)


def test_best_slice_picks_most_wt():
    _, truth = _case()
    truth[2, 2:10, 2:10, 11] = 1  # an extra 64 WT voxels make axial slice 11 the largest
    assert viz.best_slice(truth, "axial") == 11
    assert viz.best_slice(truth, "axial", region="ET") in range(6, 11)
    assert viz.best_slice(np.zeros_like(truth), "coronal") == 12
    assert viz.best_slice(None, "sagittal", shape=(20, 24, 16)) == 10


def test_show_modalities_panels_and_missing():
    image, truth = _case()
    fig = viz.show_modalities(image, truth, plane="coronal")
    assert isinstance(fig, Figure)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["FLAIR", "T1", "T1ce", "T2", "FLAIR + regions"]
    fig = viz.show_modalities(image, None, plane="sagittal", index=3, available=(True, False, True, True))
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 4 and titles[1] == "T1 (missing)"
    assert "Sagittal slice 3" in fig._suptitle.get_text()


def test_overlay_regions_and_legend():
    _, truth = _case()
    fig = Figure()
    ax = fig.add_subplot()
    reg = viz.take_slice(truth, "axial", 8)
    ax.imshow(np.zeros(reg.shape[1:]), cmap="gray")
    viz.overlay_regions(ax, reg, style="fill")
    assert len(ax.images) == 2
    rgba = ax.images[1].get_array()
    # ET pixels carry the ET colour (innermost region wins)
    et = reg[0].astype(bool)
    assert np.allclose(rgba[et][0, :3], matplotlib.colors.to_rgb(viz.REGION_COLORS["ET"]))
    viz.overlay_regions(ax, reg, style="contour")
    leg = viz.region_legend(ax)
    assert [t.get_text().split()[0] for t in leg.get_texts()] == list(REGIONS)
    with pytest.raises(ValueError):
        viz.overlay_regions(ax, reg, style="dots")


def test_compare_prediction_dice_text():
    image, truth = _case()
    pred = truth.copy()
    pred[0] = 0  # ET missed entirely
    fig = viz.compare_prediction(image, truth, pred, plane="axial", modality="t1ce", title="case 1")
    assert len(fig.axes) == 3 and fig.axes[0].get_title() == "T1ce"
    dice = viz.dice_per_region(truth, pred)
    assert dice["ET"] == 0.0 and dice["WT"] == 1.0
    fig = viz.compare_prediction(image, truth, pred, modality=0, dice={"ET": 0.123, "TC": 0.5, "WT": 0.9})
    texts = [c.get_text() for a in fig.axes[2].artists for c in a.get_child().get_children()]
    assert any("0.123" in t for t in texts) and any("WT" in t and "0.900" in t for t in texts)


# ------------------------------------------------------------------------------- tables, heatmaps

def test_availability_marks():
    assert viz.availability_marks((True, False, True, False)) == "● ○ ● ○"
    assert viz.availability_marks("t2") == "○ ○ ○ ●"
    assert viz.pretty_subset("flair+t1ce") == "FLAIR + T1ce"


def test_score_table_figure():
    scores = np.array([[0.1, 0.2, 0.85], [0.3, 0.3, 0.3], [0.7, 0.75, 0.6], [0.4, 0.5, 0.8]])
    fig = viz.score_table_figure(scores)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 12
    assert "0.85  ★" in texts and "0.30" in texts
    bold = [t.get_text() for t in ax.texts if t.get_fontweight() == "bold"]
    assert sorted(bold) == sorted(["0.85  ★", "0.70  ★", "0.75  ★"])
    assert "FLAIR (WT)" in ax.get_xlabel() and "T1ce (ET, TC)" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["FLAIR", "T1", "T1ce", "T2"]
    # explicit winners (as written in election records) override the argmax
    fig = viz.score_table_figure(scores, winners={"ET": "t2", "TC": "t2", "WT": "t2"})
    assert sum("★" in t.get_text() for t in fig.axes[0].texts) == 3
    assert "T2 (ET, TC, WT)" in fig.axes[0].get_xlabel()


def _subset_scores():
    return np.array([[0.5 + 0.02 * i, 0.6, 0.85 if i == 5 else 0.7] for i in range(len(SUBSETS))])


def test_subset_heatmap_marks_and_values():
    d = _subset_scores()
    fig = viz.subset_heatmap(d, title="demo")
    marks_ax, heat_ax = fig.axes[0], fig.axes[1]
    assert [t.get_text() for t in marks_ax.get_xticklabels()] == ["FLAIR", "T1", "T1ce", "T2"]
    assert [t.get_text() for t in heat_ax.get_xticklabels()] == list(REGIONS)
    texts = [t.get_text() for t in heat_ax.texts]
    assert len(texts) == 45 and "0.850" in texts
    fig = viz.subset_heatmap(d, labels="names", show_mean=True)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [*REGIONS, "Mean"]
    assert ax.get_yticklabels()[5].get_text() == "FLAIR + T1ce"


def test_subset_heatmap_diff_is_centred():
    d = _subset_scores() - 0.6
    fig = viz.subset_heatmap(d, diff=True)
    norm = fig.axes[1].images[0].norm
    assert norm.vcenter == 0.0 and norm.vmin == -norm.vmax
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert "+0.250" in texts and "-0.100" in texts and "0.000" in texts  # no "-0.000"


def test_subset_heatmap_plotly():
    import plotly.graph_objects as go

    fig = viz.subset_heatmap_plotly(_subset_scores(), diff=False, show_mean=True)
    assert isinstance(fig, go.Figure)
    heat = fig.data[0]
    assert list(heat.x) == [*REGIONS, "Mean"] and heat.y[5] == "● ○ ● ○"
    assert heat.text[5][2] == "0.850" and heat.customdata[5][0] == "FLAIR + T1ce"
    diff = viz.subset_heatmap_plotly(_subset_scores() - 0.6, diff=True)
    assert diff.data[0].zmid == 0


def test_markdown_subset_table():
    table = viz.markdown_subset_table(_subset_scores())
    lines = table.splitlines()
    assert len(lines) == 15 + 2 + 1
    assert lines[0].replace(" ", "") == "|FLAIR|T1|T1ce|T2|ET|TC|WT|Mean|"
    row = [c.strip() for c in lines[2 + 5].strip("|").split("|")]  # SUBSETS[5] = flair+t1ce
    assert row[:4] == ["●", "○", "●", "○"] and row[6] == "0.850"
    assert lines[-1].startswith("| **Mean**")
    with_hd = viz.markdown_subset_table(_subset_scores(), hd95=np.full((15, 3), 4.5), title="T", percent=True)
    assert with_hd.startswith("**T**\n\n") and "HD95 WT" in with_hd and "85.00" in with_hd
    assert "4.50" in with_hd.splitlines()[-1]


# ------------------------------------------------------------------------------------- history

def _history(n=60, elections=True, val=True):
    recs = []
    for s in range(n):
        recs.append({"kind": "step", "step": s, "stage": 1 if s < n // 2 else 2, "loss": 1.0 / (s + 1) + 0.2,
                     "dice_loss": 0.5, "bce": 0.2, "kd": 0.0 if s < n // 2 else 0.1, "lr": 1e-3 * (1 - s / n),
                     "subset": "flair+t1+t1ce+t2", "teachers": ["flair"]})
        if val and s % 10 == 9:
            recs.append({"kind": "val", "step": s, "dice": {"ET": 0.5, "TC": 0.6, "WT": 0.7 + s / 1000}})
        if elections and s % 20 == 0:
            recs.append({"kind": "election", "step": s, "scores": np.full((4, 3), 0.5).tolist(),
                         "winners": {"ET": "t1ce", "TC": "t1ce", "WT": "flair" if s < 40 else "t2"},
                         "teachers": ["flair", "t1ce"]})
    return recs


def test_plot_history_full():
    fig = viz.plot_history(_history())
    assert len(fig.axes) >= 4
    timeline = fig.axes[3]
    labels = {t.get_text() for t in timeline.texts}
    assert {"T1ce", "FLAIR", "T2"} <= labels
    assert [t.get_text() for t in timeline.get_yticklabels()] == list(REGIONS)
    loss_legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert loss_legend[:3] == ["total", "Dice loss", "BCE"]
    assert loss_legend[3].startswith("KD (unweighted")  # without the run's KD weight the label says so
    assert "faint" in loss_legend[4]  # the raw lines are explained
    weighted = viz.plot_loss(_history(20), kd_weight=0.1)
    kd_line = next(l for l in weighted.axes[0].get_lines() if l.get_label().startswith("0.1 × KD"))
    raw_kd = np.array([r["kd"] for r in _history(20) if r["kind"] == "step"])
    assert np.nanmax(kd_line.get_ydata()) <= 0.1 * raw_kd.max() + 1e-9  # drawn as it enters the total
    assert any("stage 2" in t for t in _texts(fig))


def test_plot_history_partial_and_empty(tmp_path):
    fig = viz.plot_history(_history(elections=False, val=False))
    # before any election the timeline shows the initial teacher the step records report
    assert "no validation yet" in _texts(fig) and _texts(fig).count("FLAIR (initial)") == len(REGIONS)
    assert "no election" in fig.axes[3].get_xlabel()
    assert "no elections yet" in _texts(viz.plot_teacher_timeline([{"kind": "val", "step": 3, "dice": {}}]))
    fig = viz.plot_history([])
    assert "no training steps yet" in _texts(fig)
    # a JSON-lines path works too, with a half-written last line
    path = tmp_path / "history.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _history(20)) + '\n{"kind": "st')
    assert len(read_history(path)) == len(_history(20))
    assert isinstance(viz.plot_teacher_timeline(path), Figure)


def test_teacher_timeline_draws_the_initial_teacher_before_the_first_election():
    recs = [r for r in _history(60) if not (r["kind"] == "election" and r["step"] == 0)]  # first at 20
    ax = viz.plot_teacher_timeline(recs).axes[0]
    bars = [c for c in ax.collections if c.get_hatch()]  # hatched: the initial teacher, one per region
    assert len(bars) == len(REGIONS)
    for bar in bars:
        (x0, y0), (x1, _) = bar.get_paths()[0].get_extents().get_points()
        assert (x0, x1) == (0.0, 20.0)
        np.testing.assert_allclose(bar.get_facecolor()[0][:3], mcolors.to_rgb(viz.MODALITY_COLORS["flair"]))
    assert "initial teacher" in [t.get_text() for t in ax.get_legend().get_texts()]
    # election segments follow: ET is T1ce from step 20 on
    solid = [c for c in ax.collections if not c.get_hatch() and len(c.get_paths())]
    assert min(c.get_paths()[0].get_extents().x0 for c in solid) == 20.0


def test_stage_boundary_is_the_last_stage1_record():
    # train logs {"step": steps done, "stage": stage of the last of them}: 300 done ends stage 1
    recs = [{"kind": "step", "step": s, "stage": 1 if s <= 300 else 2, "loss": 1.0} for s in range(10, 610, 10)]
    assert viz._stage2_start(recs) == 300
    assert viz._stage2_start([r for r in recs if r["stage"] == 2]) == 310  # resumed in stage 2
    assert viz._stage2_start(recs[:30]) is None


def test_individual_history_plots_on_given_axes():
    fig = Figure()
    axes = fig.subplots(3)
    assert viz.plot_loss(_history(), ax=axes[0], logy=True, show_lr=True) is fig
    assert viz.plot_val_dice(_history(), ax=axes[1]) is fig
    assert viz.plot_teacher_timeline(_history(), ax=axes[2]) is fig
    assert axes[0].get_yscale() == "log"
    assert [ln.get_label() for ln in axes[1].get_lines()][:3] == list(REGIONS)


def test_compare_histories():
    fig = viz.compare_histories(_history(), _history(elections=False), labels=("LCKD", "no-KD"))
    assert len(fig.axes) == 2
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["LCKD", "no-KD"]
    fig = viz.compare_histories([], [])
    assert "no validation yet" in _texts(fig)


# ------------------------------------------------------------------------------------------- 3-D

def test_surface_nets_closed_sphere():
    x, y, z = np.meshgrid(*[np.arange(24)] * 3, indexing="ij")
    ball = np.sqrt((x - 12) ** 2 + (y - 11) ** 2 + (z - 12) ** 2) < 7
    v, f = viz.mask_mesh(ball, step=1, smooth_iterations=0)
    edges = {tuple(sorted(e)) for a, b in ((0, 1), (1, 2), (2, 0)) for e in zip(f[:, a], f[:, b])}
    assert len(v) - len(edges) + len(f) == 2  # closed genus-0 surface
    assert abs(np.linalg.norm(v - [12, 11, 12], axis=1).mean() - 7) < 0.6
    normals = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    assert ((normals * (v[f].mean(1) - [12, 11, 12])).sum(1) > 0).all()  # outward winding


def test_region_3d_traces_and_size():
    import plotly.graph_objects as go

    _, truth = _case((32, 32, 32))
    pred = np.roll(truth, 2, axis=1)
    fig = viz.region_3d(truth, pred, brain=np.ones((32, 32, 32)), step=1)
    assert isinstance(fig, go.Figure)
    groups = [tr.legendgroup for tr in fig.data if tr.name != "brain"]
    assert groups.count("truth") == 3 and groups.count("prediction") == 3
    assert {type(tr).__name__ for tr in fig.data if tr.legendgroup == "truth"} == {"Scatter3d"}
    assert {type(tr).__name__ for tr in fig.data if tr.legendgroup == "prediction"} == {"Mesh3d"}
    assert len(fig.layout.updatemenus[0].buttons) == 3
    assert len(fig.to_json()) < 2_000_000
    only_truth = viz.region_3d(truth, None)
    assert [tr.name for tr in only_truth.data] == ["WT truth", "TC truth", "ET truth"]
    with pytest.raises(ValueError):
        viz.region_3d(None, None)


@pytest.mark.parametrize("available", [(True, True, False, True), (False, True, True, False)])
def test_diagrams_are_drawn_for_the_availability_asked(available):
    missing = [viz.DISPLAY_NAMES[m] for m, a in zip(("flair", "t1", "t1ce", "t2"), available) if not a]
    red = mcolors.to_rgba("#C0392B")
    for fig, panels in ((viz.fusion_diagrams(available), 4), (viz.architecture_figure(available), 1)):
        crossed = [ln for ax in fig.axes for ln in ax.lines if mcolors.to_rgba(ln.get_color()) == red]
        assert len(crossed) == panels * len(missing)  # each missing modality crossed out in every panel
        if panels == 4:
            assert all(name in fig.texts[0].get_text() for name in missing)
            assert {"modality dropout", "LCKD", "HeMIS", "region fusion"} <= {t.get_text() for ax in fig.axes for t in ax.texts}
