"""The missing-modality explorer (notebook 04) and a slice viewer (notebook 01).

Three layers, so that everything but the clicking is testable without a browser:

* :class:`ExplorerState` -- pure core, no widgets. Holds one case (normalised image, region
  masks, spacing, name) and a model; the predictions of all 15 modality subsets come from ONE
  call of :func:`lckd_kit.inference.predict_subsets` -- the same function, window and settings as
  the 15-subset evaluation, so the explorer's Dice of a subset is the evaluation's for that case.
* :func:`render_view` -- pure render function: state + subset + slice -> matplotlib ``Figure``.
* :class:`Explorer` / :class:`SliceViewer` -- thin ipywidgets wrappers: controls whose ``value``
  changes call the core and the render function, and put the PNG of the figure into an
  ``ipywidgets.Image``. Only core controls are used (ipywidgets 7.7 in Colab and 8 both work);
  plotly figures are plain ``go.Figure``s displayed into ``ipywidgets.Output``.

Feature blend (an exploration of the model, not a physical quantity)
---------------------------------------------------------------------
``blend`` is one weight ``w_m`` in [0, 1] per modality. For every selected modality its bottleneck
feature becomes ``w_m·f_m + (1−w_m)·fill`` where ``fill`` is the mean of the selected modalities'
(unblended) features -- the very vector the model puts in the slot of a missing modality.
Deselected modalities are treated exactly as the model does (zero-input skip features, ``fill`` as
bottleneck). So ``w = 1`` everywhere is the plain prediction, and ``w_m = 0`` replaces modality m's
bottleneck by the fill **while its skip connections stay its own**: the decoder still sees m's fine
detail but not its deep summary. That is not the same as removing m (removing m also swaps its
skips for the zero response and leaves m out of the fill). With a single selected modality the
fill IS its feature, so every blend gives the plain prediction. See
:func:`lckd_kit.inference.blended_encoding`; each new blend is one sliding-window pass.
"""
from __future__ import annotations

import html
import io
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from lckd_kit import MODALITIES, REGIONS, SUBSETS, NoModalityError, as_mask
from lckd_kit import viz
from lckd_kit.inference import model_config, predict_volume
from lckd_kit.metrics import hard_dice, nest_regions
from lckd_kit.model import LCKDNet

N_MOD = len(MODALITIES)
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")

BLEND_NOTE = "an exploration of the model, not a physical quantity"
WARNING_TEXT = "Select at least one modality"


def default_checkpoint():
    """The trained model the explorer uses by default: the one shipped with the kit."""
    from lckd_kit.paths import shipped_checkpoint

    return shipped_checkpoint()


# ----------------------------------------------------------------------------------------------
# small helpers


def _subset_mask(available) -> tuple[bool, ...]:
    """``as_mask``; the empty subset is reported as ``NoModalityError("no modality selected")``."""
    if available is None:
        raise NoModalityError("no modality selected")
    return as_mask(available)


def _blend_key(blend, mask: Sequence[bool]) -> tuple[float, ...] | None:
    """Normalise a blend to a hashable 4-tuple; ``None`` when it changes nothing.

    Weights of deselected modalities are irrelevant (their slot is the fill) and are set to 1, so
    equivalent blends share a cache entry; all-ones is the plain prediction -> ``None``.
    """
    if blend is None:
        return None
    w = np.asarray(blend, dtype=np.float64).reshape(-1)
    if w.shape != (N_MOD,):
        raise ValueError(f"blend must have {N_MOD} weights (FLAIR, T1, T1ce, T2), got shape {w.shape}")
    if not np.all(np.isfinite(w)) or w.min() < 0 or w.max() > 1:
        raise ValueError(f"blend weights must lie in [0, 1], got {w.tolist()}")
    key = tuple(round(float(v), 4) if on else 1.0 for v, on in zip(w, mask))
    return None if all(v == 1.0 for v in key) else key


def figure_png(fig: Figure, dpi: int = 90) -> bytes:
    """PNG bytes of a matplotlib figure (what the widgets put into their ``ipywidgets.Image``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def load_explorer_case(case_or_path=None) -> dict[str, Any]:
    """A case for the explorer / slice viewer: ``data.as_case`` of ``case_or_path`` (a case folder,
    one of its files, a ``Case`` or a loaded dict: a phantom or your own BraTS scan, at any voxel
    size), or the first bundled demo case when None."""
    from lckd_kit.data import as_case, find_cases

    if case_or_path is None:
        from lckd_kit.paths import data_samples_dir

        case_or_path = find_cases(data_samples_dir())[0]
    return as_case(case_or_path)


# ----------------------------------------------------------------------------------------------
# the pure core


class ExplorerState:
    """One case + one model; predictions and Dice of any subset on demand.

    Args:
        model: a trained model, 2-D or 3-D: an :class:`~lckd_kit.model.LCKDNet` or any method of
            :mod:`lckd_kit.methods` (the feature blend is LCKD's only); put in eval mode here.
        image: ``(4, X, Y, Z)`` float, raw or normalised (say which with ``normalized``).
        label: ``(3, X, Y, Z)`` region masks (ET, TC, WT) or None (unlabelled: no Dice).
        spacing: voxel size in mm (X, Y, Z), for the pixel aspect and the 3-D view.
        name: shown in titles.
        affine: the case's ``(4, 4)`` affine (RAS); with ``spacing``, what lets the model's inference
            resample the case to the voxel size it was trained at and map its output back.
        normalized: the image is already normalised (else the inference normalises it as the model
            was trained).
        device: where the model runs (default: the model's device). Results are numpy on the CPU.
        predict_kwargs: passed to :func:`~lckd_kit.inference.predict_subsets` (e.g. ``roi_size``);
            the defaults are the evaluation's.

    The first query predicts all 15 subsets at once (:func:`~lckd_kit.inference.predict_volume`:
    one sliding-window pass at the model's resolution, each window encoded once) -- exactly what
    the evaluation does for this case. Subsets are mapped back onto the case's grid when shown
    (the last few are kept); a blend costs one more pass. ``predict_seconds`` and
    ``predict_calls`` say what it cost.
    """

    def __init__(self, model: torch.nn.Module, image, label=None, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 name: str = "case", device=None, affine=None, normalized: bool = False, cache_size: int = 8,
                 **predict_kwargs):
        image = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
        if image.ndim != 4 or image.shape[0] != N_MOD:
            raise ValueError(f"image must be (4, X, Y, Z), got {image.shape}")
        self.image = np.ascontiguousarray(image, dtype=np.float32)
        self.shape: tuple[int, int, int] = tuple(int(s) for s in self.image.shape[1:])
        if label is not None:
            label = label.detach().cpu().numpy() if torch.is_tensor(label) else np.asarray(label)
            if label.shape != (len(REGIONS),) + self.shape:
                raise ValueError(f"label must be (3, {', '.join(map(str, self.shape))}) region masks, "
                                 f"got {label.shape}")
            label = (label > 0).astype(np.uint8)
        self.label = label
        self.spacing = tuple(float(s) for s in spacing)
        self.affine = affine
        self.normalized = normalized
        self.name = str(name)
        self.model = model.eval()
        self.config = model_config(model)
        self.device = device
        self.predict_kwargs = predict_kwargs
        self.windows = [viz.intensity_window(self.image[m]) for m in range(N_MOD)]  # display ranges
        self.brain = np.any(self.image != 0, axis=0)  # (X, Y, Z): skull-stripped, the background is 0
        self._plain = None  # CasePrediction of the 15 subsets
        self._shown: OrderedDict = OrderedDict()  # (mask, blend) -> (3, X, Y, Z) on the case grid
        self._cache_size = int(cache_size)
        self._all_dice: np.ndarray | None = None
        self.predict_seconds = 0.0
        self.predict_calls = 0

    @classmethod
    def from_case(cls, model: torch.nn.Module, case_or_path=None, **kwargs) -> "ExplorerState":
        """Load (see :func:`load_explorer_case`) and wrap a case, at whatever voxel size it has."""
        case = load_explorer_case(case_or_path)
        return cls(model, case["image"], case["label"], case["spacing"] or (1.0, 1.0, 1.0), case["name"],
                   affine=case.get("affine"), normalized=case.get("normalized", False), **kwargs)

    @property
    def labelled(self) -> bool:
        return self.label is not None

    def _predict(self, masks, blend=None):
        t0 = time.perf_counter()
        case = {"name": self.name, "image": self.image, "spacing": self.spacing, "affine": self.affine,
                "normalized": self.normalized}
        out = predict_volume(self.model, case, masks, device=self.device, blend=blend, **self.predict_kwargs)
        self.predict_seconds += time.perf_counter() - t0
        self.predict_calls += 1
        return out

    def probabilities(self, available, blend: Sequence[float] | None = None) -> np.ndarray:
        """Sigmoid probabilities ``(3, X, Y, Z)`` float32 (ET, TC, WT) for one modality subset.

        Args:
            available: the subset (bool mask of 4, ``"flair+t1ce"``, indices ...).
            blend: optional ``(4,)`` feature-blend weights (see the module docstring).

        Raises :class:`~lckd_kit.NoModalityError` for the empty subset.
        """
        mask = _subset_mask(available)
        key = (mask, _blend_key(blend, mask))
        if key not in self._shown:
            if key[1] is None:
                if self._plain is None:
                    self._plain = self._predict(SUBSETS)
                p = self._plain[SUBSETS.index(mask)]
            else:
                p = self._predict([mask], key[1])[0]
            self._shown[key] = p.numpy()
            while len(self._shown) > self._cache_size:  # each one is a whole volume: keep a few
                self._shown.popitem(last=False)
        self._shown.move_to_end(key)
        return self._shown[key]

    def prediction(self, available, blend: Sequence[float] | None = None) -> np.ndarray:
        """Region masks ``(3, X, Y, Z)`` bool: probability > 0.5, made nested (ET ⊂ TC ⊂ WT) as the
        evaluation scores them."""
        return nest_regions(torch.from_numpy(self.probabilities(available, blend) > 0.5)).numpy()

    def dice(self, available, blend: Sequence[float] | None = None) -> dict[str, float] | None:
        """Hard Dice per region (both empty = 1) vs the ground truth; None if unlabelled."""
        if self.label is None:
            _subset_mask(available)  # still report the empty subset
            return None
        d = hard_dice(torch.from_numpy(self.prediction(available, blend)), torch.from_numpy(self.label))
        return {r: float(v) for r, v in zip(REGIONS, d.tolist())}

    def all_subset_dice(self) -> np.ndarray:
        """``(15, 3)`` Dice in SUBSETS × REGIONS order (for ``viz.subset_heatmap_plotly``); cached.

        Raises ``ValueError`` for an unlabelled case.
        """
        if self.label is None:
            raise ValueError(f"case {self.name!r} has no ground truth: no Dice to show")
        if self._all_dice is None:
            self._all_dice = np.array([[self.dice(s)[r] for r in REGIONS] for s in SUBSETS], dtype=np.float64)
        return self._all_dice

    def best_slice(self, plane: str) -> int:
        """The slice with the most ground-truth WT voxels (the centre if unlabelled or empty)."""
        return viz.best_slice(self.label, plane, shape=self.shape)

    def n_slices(self, plane: str) -> int:
        return self.shape[viz.plane_axis(plane)]


# ----------------------------------------------------------------------------------------------
# the pure render function

_CROSS = "#C0392B"


def _aspect(plane: str, spacing: Sequence[float]) -> float:
    """imshow aspect (row height / column width) of a displayed slice."""
    sx, sy, sz = spacing
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[plane]


def _dice_text(dice: Mapping[str, float] | None) -> str:
    if dice is None:
        return "no ground truth"
    return "Dice  " + "   ".join(f"{r} {dice[r]:.3f}" for r in REGIONS)


def render_view(state: ExplorerState, available, plane: str = "axial", index: int | None = None,
                blend: Sequence[float] | None = None, show_truth: bool = True, show_pred: bool = True,
                modality: str | int | None = None, cell: float = 1.75) -> Figure:
    """One slice of the explorer: the main image with the regions, plus 2×2 modality thumbnails.

    Args:
        state: the :class:`ExplorerState` (case, model, caches).
        available: the modality subset; raises ``ValueError("no modality selected")`` if empty.
        plane, index: slice (radiological view, :func:`lckd_kit.viz.take_slice`); index None = the
            slice with the most ground-truth WT.
        blend: optional feature blend (shown in the title; an exploration, not a physical quantity).
        show_truth: ground truth as region-coloured outlines. show_pred: prediction as a translucent
            fill (each pixel coloured by its innermost region).
        modality: the modality in the main panel; default FLAIR, or the first selected one when
            FLAIR is missing.
        cell: size (inches) of one thumbnail; the main panel is 2×2 cells.

    Returns:
        Figure: axes[0] the main panel, axes[1:5] the FLAIR, T1, T1ce, T2 thumbnails (missing ones
        dimmed and crossed out); suptitle = subset name, slice and per-region Dice.
    """
    mask = _subset_mask(available)
    plane = plane.lower()
    viz.plane_axis(plane)  # validates the plane
    n = state.n_slices(plane)
    index = state.best_slice(plane) if index is None else int(index)
    if not 0 <= index < n:
        raise IndexError(f"{plane} slice {index} out of range for {n} slices")
    if modality is None:
        shown = 0 if mask[0] else mask.index(True)
    else:
        shown = MODALITIES.index(viz.modality_key(modality))
    key = _blend_key(blend, mask)
    prob = state.probabilities(mask, key)
    dice = state.dice(mask, key)

    img = viz.take_slice(state.image, plane, index)  # (4, H, W)
    # z-scored intensities put the background (exactly 0) mid-grey; NaN shows the black face instead
    img = np.where(viz.take_slice(state.brain, plane, index)[None], img, np.nan)
    h, w = img.shape[1:]
    aspect = _aspect(plane, state.spacing)
    cell_w = cell * w / (h * aspect)
    fig = Figure(figsize=(4 * cell_w + 0.5, 2 * cell + 1.25), layout="constrained")
    gs = fig.add_gridspec(2, 4)
    ax = fig.add_subplot(gs[:, :2])
    ax.set_facecolor("black")
    viz.show_gray(ax, img[shown], state.windows[shown], aspect)
    if show_pred:
        viz.overlay_regions(ax, viz.take_slice(prob > 0.5, plane, index), style="fill", alpha=0.45)
    if show_truth and state.label is not None:
        viz.overlay_regions(ax, viz.take_slice(state.label, plane, index), style="contour", linewidth=1.4)
    viz.orientation_letters(ax, plane, fontsize=8)
    ax.set_title(f"{viz.display_name(shown)}{'' if mask[shown] else ' (not used by the model)'}", fontsize=10)

    for m in range(N_MOD):
        t = fig.add_subplot(gs[m // 2, 2 + m % 2])
        t.set_facecolor("black")
        on = mask[m]
        viz.show_gray(t, img[m], state.windows[m], aspect, alpha=1.0 if on else 0.25)
        label = viz.display_name(m)
        if on and key is not None and key[m] < 1:
            label += f"  (blend {key[m]:.2f})"
        if on:
            t.set_title(label, fontsize=9, fontweight="bold", color=viz.MODALITY_COLORS[MODALITIES[m]])
        else:  # a cross over a dimmed image: "the model does not get this one"
            t.set_title(f"{label} — missing", fontsize=9, color="0.45")
            t.plot([0, 1], [0, 1], transform=t.transAxes, color=_CROSS, lw=2)
            t.plot([0, 1], [1, 0], transform=t.transAxes, color=_CROSS, lw=2)
        if m == shown:  # frame the thumbnail shown large
            for s in t.spines.values():
                s.set_visible(True)
                s.set_color("0.2")
                s.set_linewidth(2)

    head = f"{viz.pretty_subset(mask)}   ·   {plane} slice {index} of {n - 1}\n{_dice_text(dice)}"
    if key is not None:
        head += f"\nfeature blend on: {BLEND_NOTE}"
    fig.suptitle(head, fontsize=10)
    handles = []
    if show_pred:
        handles += [Patch(facecolor=viz.REGION_COLORS[r], alpha=0.6, label=r) for r in REGIONS]
        handles.append(Patch(facecolor="0.6", alpha=0.6, label="fill = prediction"))
    if show_truth and state.label is not None:
        handles.append(Line2D([], [], color="0.2", lw=1.5, label="outline = ground truth"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False,
                   handlelength=1.2, columnspacing=1.0)
    return fig


# ----------------------------------------------------------------------------------------------
# widget helpers (ipywidgets 7.7 and 8)


def _css(widget, cls: str):
    """Stable CSS class for browser tests; ``add_class`` is missing on very old ipywidgets."""
    add = getattr(widget, "add_class", None)
    if add is not None:
        add(cls)
    return widget


def _show(widget, visible: bool) -> None:
    widget.layout.display = None if visible else "none"


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - ipywidgets depends on IPython
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def _display_in(out, obj) -> None:
    """Replace the content of an ``ipywidgets.Output`` with ``obj`` (e.g. a plotly ``go.Figure``).

    In a kernel: the usual ``clear_output(wait=True)`` + ``display``. Outside one (tests, scripts)
    there is no front-end to capture display messages, so a plain-text stand-in is stored instead.
    """
    if _in_kernel():
        from IPython.display import clear_output, display

        with out:
            clear_output(wait=True)
            display(obj)
    else:
        out.outputs = ({"output_type": "display_data", "metadata": {},
                        "data": {"text/plain": f"<{type(obj).__module__}.{type(obj).__name__}>"}},)


def _slice_slider(n: int, index: int, cls: str):
    import ipywidgets as W

    slider = W.IntSlider(value=index, min=0, max=n - 1, step=1, description="slice", continuous_update=False,
                         layout=W.Layout(width="420px"))
    return _css(slider, cls)


def _plane_buttons(plane: str, cls: str):
    import ipywidgets as W

    return _css(W.ToggleButtons(options=list(PLANES), value=plane, description="plane",
                                style={"button_width": "80px"}), cls)


class _Held:
    """Re-entrancy guard: while held, value observers do not re-render."""

    def __init__(self):
        self.depth = 0

    @contextmanager
    def __call__(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def __bool__(self):
        return self.depth > 0


def _set_slider_range(slider, n: int, index: int) -> None:
    """Point the slider at ``index`` of ``n`` slices. ``max`` first: ipywidgets clamps ``value`` into
    the new range when ``max`` shrinks, and would refuse a value above the old ``max`` otherwise."""
    slider.max = n - 1
    slider.value = max(0, min(int(index), n - 1))


# ----------------------------------------------------------------------------------------------
# the explorer


class Explorer:
    """Interactive missing-modality explorer around an :class:`ExplorerState`.

    Controls (all observe ``value``): ``toggles`` (4 ToggleButtons FLAIR, T1, T1ce, T2),
    ``blend_sliders`` (4 FloatSliders 0..1), ``plane`` (ToggleButtons axial/coronal/sagittal),
    ``slice_slider`` (IntSlider, range follows the plane), ``show_truth`` / ``show_pred``
    (Checkboxes), ``heatmap_button`` and ``view3d_button``. Outputs: ``image`` (ipywidgets.Image
    with the PNG of :func:`render_view`), ``dice_label`` (HTML, live Dice per region),
    ``warning`` (HTML, visible when no modality is selected), ``info``, ``heatmap_out`` and
    ``view3d_out`` (plotly figures, also kept as ``heatmap_figure`` / ``view3d_figure``).
    ``widget`` is the VBox to display (or display the Explorer itself).

    With no modality selected the warning appears and the image keeps the last valid view. Any
    other error during a render is shown in the warning too and kept in ``last_error``.
    """

    def __init__(self, state: ExplorerState, plane: str = "axial", index: int | None = None, dpi: int = 90,
                 modality: str | int | None = None):
        import ipywidgets as W

        self.state = state
        self.dpi = int(dpi)
        self.modality = modality
        self.last_error: Exception | None = None
        self.render_count = 0
        self.heatmap_figure = None
        self.view3d_figure = None
        self._held = _Held()
        self._last_mask: tuple[bool, ...] | None = None
        plane = plane.lower()
        if plane not in PLANES:
            raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")

        names = [viz.display_name(m) for m in MODALITIES]
        self.toggles = [_css(W.ToggleButton(value=True, description=d, tooltip=f"use {d}", icon="check",
                                            button_style="success", layout=W.Layout(width="80px")),
                             f"lckd-toggle-{m}")
                        for m, d in zip(MODALITIES, names)]
        self.blend_sliders = [_css(W.FloatSlider(value=1.0, min=0.0, max=1.0, step=0.05, description=d,
                                                 continuous_update=False, readout_format=".2f"), f"lckd-blend-{m}")
                              for m, d in zip(MODALITIES, names)]
        self.blend_reset = _css(W.Button(description="reset blend", layout=W.Layout(width="110px")),
                                "lckd-blend-reset")
        self.plane = _plane_buttons(plane, "lckd-plane")
        n = state.n_slices(plane)
        start = state.best_slice(plane) if index is None else min(max(int(index), 0), n - 1)
        self.slice_slider = _slice_slider(n, start, "lckd-slice-slider")
        self.show_truth = _css(W.Checkbox(value=state.labelled, description="ground truth (outline)",
                                          disabled=not state.labelled, indent=False), "lckd-show-truth")
        self.show_pred = _css(W.Checkbox(value=True, description="prediction (fill)", indent=False), "lckd-show-pred")
        self.dice_label = _css(W.HTML(value=""), "lckd-dice")
        self.warning = _css(W.HTML(value=""), "lckd-warning")
        _show(self.warning, False)
        self.info = _css(W.HTML(value=""), "lckd-info")
        self.image = _css(W.Image(format="png"), "lckd-image")
        self.heatmap_button = _css(W.Button(description="Dice for all 15 subsets", disabled=not state.labelled,
                                            layout=W.Layout(width="200px")), "lckd-heatmap-button")
        self.view3d_button = _css(W.Button(description="Show 3D", layout=W.Layout(width="120px")), "lckd-3d-button")
        self.heatmap_out = _css(W.Output(), "lckd-heatmap")
        self.view3d_out = _css(W.Output(), "lckd-3d")

        for t in self.toggles:
            t.observe(self._on_toggle, names="value")
        for s in self.blend_sliders:
            s.observe(self._on_change, names="value")
        self.plane.observe(self._on_plane, names="value")
        for c in (self.slice_slider, self.show_truth, self.show_pred):
            c.observe(self._on_change, names="value")
        self.blend_reset.on_click(lambda _: self.reset_blend())
        self.heatmap_button.on_click(lambda _: self.show_heatmap())
        self.view3d_button.on_click(lambda _: self.show_3d())

        self.blend_box = blend_box = W.VBox([
            W.HTML(f"<b>Feature blend</b> — <i>{BLEND_NOTE}</i>. 1 = the modality's own bottleneck feature, "
                   "0 = the mean of the selected modalities' features (its skip connections stay its own)."
                   + " <i>Every new blend re-runs the sliding window over the case.</i>"),
            W.HBox(self.blend_sliders[:2]), W.HBox(self.blend_sliders[2:]), self.blend_reset])
        # the blend rebuilds LCKD's bottleneck slots: other methods have nothing to blend
        self.blend_supported = isinstance(state.model, LCKDNet)
        _show(blend_box, self.blend_supported)
        self.widget = _css(W.VBox([
            self.info,
            W.HBox([W.HTML("<b>Available modalities</b>&nbsp;"), *self.toggles]),
            W.HBox([self.plane, self.slice_slider]),
            W.HBox([self.show_truth, self.show_pred]),
            self.dice_label, self.warning, self.image, blend_box,
            W.HBox([self.heatmap_button, self.view3d_button]),
            self.heatmap_out, self.view3d_out,
        ]), "lckd-explorer")
        self.refresh()

    # -- state of the controls ------------------------------------------------------------------

    @property
    def available(self) -> tuple[bool, ...]:
        """The selected subset as a bool mask (may be all False)."""
        return tuple(bool(t.value) for t in self.toggles)

    @property
    def blend(self) -> tuple[float, ...] | None:
        """The slider weights, or None when they change nothing (all selected ones at 1)."""
        mask = self.available
        if not any(mask) or not self.blend_supported:
            return None
        return _blend_key([s.value for s in self.blend_sliders], mask)

    # -- callbacks ------------------------------------------------------------------------------

    def _on_change(self, change=None) -> None:
        if not self._held:
            self.refresh()

    def _on_toggle(self, change=None) -> None:
        for t, s in zip(self.toggles, self.blend_sliders):
            s.disabled = not t.value  # a missing modality has nothing to blend
            # grey-on-grey is hard to read in JupyterLab: on = green with a tick, off = plain
            t.button_style, t.icon = ("success", "check") if t.value else ("", "")
        self._on_change(change)
        if self.heatmap_figure is not None and any(self.available):
            self.show_heatmap()  # move the highlight to the new subset

    def _on_plane(self, change=None) -> None:
        plane = self.plane.value
        with self._held():
            _set_slider_range(self.slice_slider, self.state.n_slices(plane), self.state.best_slice(plane))
        self.refresh()

    def reset_blend(self) -> None:
        with self._held():
            for s in self.blend_sliders:
                s.value = 1.0
        self.refresh()

    # -- rendering ------------------------------------------------------------------------------

    def _dice_html(self, mask, dice) -> str:
        name = html.escape(viz.pretty_subset(mask))
        if dice is None:
            return f"<b>{name}</b>: no ground truth for this case"
        parts = [f"<span style='color:{viz.REGION_COLORS[r]};font-weight:bold'>{r} {dice[r]:.3f}</span>"
                 for r in REGIONS]
        return f"<b>Dice</b> ({name}): " + " &nbsp; ".join(parts)

    def _info_html(self) -> str:
        s = self.state
        return (f"<b>{html.escape(s.name)}</b> — {'×'.join(map(str, s.shape))} voxels, "
                f"model <code>{html.escape(s.config.name)}</code>; all 15 subsets predicted in one sliding-window "
                f"pass, as the evaluation does ({s.predict_calls} pass(es), {s.predict_seconds:.1f} s so far)")

    def refresh(self) -> None:
        """Re-render the view from the current control values."""
        mask = self.available
        if not any(mask):
            self.warning.value = (f"<div style='color:#B00020;font-weight:bold'>⚠ {WARNING_TEXT} "
                                  "(the view below still shows the last selection)</div>")
            _show(self.warning, True)
            self.dice_label.value = "<b>Dice</b>: — (no modality selected)"
            return
        try:
            fig = render_view(self.state, mask, self.plane.value, self.slice_slider.value, blend=self.blend,
                              show_truth=self.show_truth.value, show_pred=self.show_pred.value,
                              modality=self.modality)
            self.image.value = figure_png(fig, self.dpi)
            self.dice_label.value = self._dice_html(mask, self.state.dice(mask, self.blend))
        except Exception as err:  # a widget callback must not die silently: say what went wrong
            self.last_error = err
            what = html.escape(f"{type(err).__name__}: {err}")
            self.warning.value = f"<div style='color:#B00020'>⚠ {what}</div>"
            _show(self.warning, True)
            return
        self.last_error = None
        self.warning.value = ""
        _show(self.warning, False)
        self._last_mask = mask
        self.render_count += 1
        self.info.value = self._info_html()

    def heatmap_plotly(self):
        """The figure of the "Dice for all 15 subsets" button: a plotly heatmap with the current
        (or last valid) subset framed. None, with the warning shown, when there is nothing to score."""
        try:
            d = self.state.all_subset_dice()
        except ValueError as err:
            self.warning.value = f"<div style='color:#B00020'>⚠ {html.escape(str(err))}</div>"
            _show(self.warning, True)
            return None
        fig = viz.subset_heatmap_plotly(d, title=f"{self.state.name}: Dice for every set of available modalities",
                                        height=520)
        mask = self.available if any(self.available) else self._last_mask
        if mask is not None:
            row = SUBSETS.index(tuple(mask))
            fig.add_shape(type="rect", xref="x", yref="y", x0=-0.5, x1=len(REGIONS) - 0.5, y0=row - 0.5,
                          y1=row + 0.5, line=dict(color="#C0392B", width=3), fillcolor="rgba(0,0,0,0)")
        return fig

    def show_heatmap(self) -> None:
        """Draw :meth:`heatmap_plotly` in the explorer's ``heatmap_out`` panel."""
        fig = self.heatmap_plotly()
        if fig is None:
            return
        self.heatmap_figure = fig
        _display_in(self.heatmap_out, fig)
        self.info.value = self._info_html()

    def view3d_plotly(self):
        """The figure of the "Show 3D" button: truth and prediction of the current subset (plotly);
        None, with the warning shown, when no modality is selected."""
        mask = self.available
        if not any(mask):
            self.refresh()  # shows the warning
            return None
        pred = self.state.prediction(mask, self.blend)
        return viz.region_3d(self.state.label, pred, spacing=self.state.spacing, brain=self.state.image[0],
                             title=f"{self.state.name}: {viz.pretty_subset(mask)} "
                                   "(click again after changing the subset)")

    def show_3d(self) -> None:
        """Draw :meth:`view3d_plotly` in the explorer's ``view3d_out`` panel."""
        fig = self.view3d_plotly()
        if fig is None:
            return
        self.view3d_figure = fig
        _display_in(self.view3d_out, fig)

    # -- display ----------------------------------------------------------------------------------

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs):
        bundle = getattr(self.widget, "_repr_mimebundle_", None)
        return bundle(**kwargs) if bundle is not None else None


def _load_model(checkpoint, device, model):
    """An explicit model, or the checkpoint's; FileNotFoundError with a recipe when there is none."""
    if isinstance(checkpoint, torch.nn.Module):
        model, checkpoint = checkpoint, None
    if model is not None:
        return model.to(device).eval() if device is not None else model.eval()
    path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    if not path.is_file():
        raise FileNotFoundError(
            f"no trained model at {path}. Train one (minutes on a CPU): `lckd-kit samples --out data/phantoms "
            f"--n 24 --seed 0` then `lckd-kit train --data data/phantoms --config small --out runs/lckd`, and "
            f"pass checkpoint='runs/lckd/final.pt' -- or pass a model object (model=...).")
    from lckd_kit.checkpoint import load_model

    return load_model(path, device or "cpu")[0]


def explorer(case_or_path=None, checkpoint=None, device=None, model: torch.nn.Module | None = None,
             plane: str = "axial", **state_kwargs) -> Explorer:
    """The explorer in one call.

    Args:
        case_or_path: see :func:`load_explorer_case` (default: the first bundled demo case).
        checkpoint: a kit checkpoint path (default ``checkpoints/lckd_small_phantom.pt``) or a model.
        device: where the model runs; default ``"cpu"`` for a checkpoint, the model's own device for
            a model object.
        model: an explicit model (instead of a checkpoint).
        state_kwargs: passed to :class:`ExplorerState` (e.g. ``roi_size=...``).

    Raises ``FileNotFoundError`` (saying how to train one) when the checkpoint does not exist.
    """
    net = _load_model(checkpoint, device, model)
    return Explorer(ExplorerState.from_case(net, case_or_path, device=device, **state_kwargs), plane=plane)


class MethodExplorer:
    """The explorer for several trained models on ONE case: a dropdown switches the model and keeps
    the selected modalities, plane and slice, so the same view can be compared across methods.

    Args:
        models: display name -> trained model (LCKD or any :mod:`lckd_kit.methods` model).
        case_or_path: see :func:`load_explorer_case` (default: the first bundled demo case).
        device, plane, state_kwargs: as :func:`explorer`.

    Each model's explorer is built the first time it is chosen (its 15 subsets are predicted then).
    """

    def __init__(self, models: Mapping[str, torch.nn.Module], case_or_path=None, device=None, plane: str = "axial",
                 **state_kwargs):
        import ipywidgets as W

        if not models:
            raise ValueError("MethodExplorer needs at least one model")
        self.models = dict(models)
        self.case = load_explorer_case(case_or_path)
        self.device, self.plane, self.state_kwargs = device, plane, state_kwargs
        self.explorers: dict[str, Explorer] = {}
        self.choice = _css(W.Dropdown(options=list(self.models), description="Method"), "lckd-method")
        self.body = W.Box()
        self.widget = _css(W.VBox([self.choice, self.body]), "lckd-method-explorer")
        self.choice.observe(lambda change: self.select(change["new"]), names="value")
        self.select(self.choice.value)

    @property
    def current(self) -> Explorer:
        return self.explorers[self.choice.value]

    def explorer_for(self, name: str) -> Explorer:
        """The explorer of one model (built on first use)."""
        if name not in self.explorers:
            state = ExplorerState.from_case(self.models[name].eval(), self.case, device=self.device,
                                            **self.state_kwargs)
            self.explorers[name] = Explorer(state, plane=self.plane)
        return self.explorers[name]

    def select(self, name: str) -> Explorer:
        """Show model ``name`` with the view of the one shown before (modalities, plane, slice)."""
        before = self.explorers.get(getattr(self, "_shown", None))
        ex = self.explorer_for(name)
        if before is not None and before is not ex:
            with ex._held():
                for mine, theirs in zip(ex.toggles, before.toggles):
                    mine.value = theirs.value
                ex.plane.value = before.plane.value
                _set_slider_range(ex.slice_slider, ex.state.n_slices(ex.plane.value), before.slice_slider.value)
            ex._on_toggle()
        self._shown = name
        if self.choice.value != name:
            self.choice.value = name
        self.body.children = (ex.widget,)
        return ex

    def dice(self) -> dict[str, dict[str, float] | None]:
        """Name -> Dice of the currently selected subset, for every model (predicts those not yet shown)."""
        mask = self.current.available
        return {n: self.explorer_for(n).state.dice(mask) for n in self.models}

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


# ----------------------------------------------------------------------------------------------
# the slice viewer (notebook 01)


class SliceViewer:
    """The four modalities of one slice (+ the regions over FLAIR), with plane and slice controls.

    Args:
        image: ``(4, X, Y, Z)`` (raw or normalised: the display window is per modality).
        label: ``(3, X, Y, Z)`` region masks or None. spacing: voxel size in mm. name: title.

    Attributes: ``plane`` (ToggleButtons), ``slice_slider`` (IntSlider, CSS "lckd-viewer-slider"),
    ``overlay`` (Checkbox), ``image`` (ipywidgets.Image, CSS "lckd-viewer-image"), ``widget``.
    """

    def __init__(self, image, label=None, spacing: Sequence[float] | None = None, name: str | None = None,
                 plane: str = "axial", index: int | None = None, dpi: int = 80):
        import ipywidgets as W

        self.volume = np.asarray(image, dtype=np.float32)
        if self.volume.ndim != 4 or self.volume.shape[0] != N_MOD:
            raise ValueError(f"image must be (4, X, Y, Z), got {self.volume.shape}")
        self.label = None if label is None else np.asarray(label)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.name = name
        self.dpi = int(dpi)
        self.render_count = 0
        self._held = _Held()
        plane = plane.lower()
        shape = self.volume.shape[1:]
        n = shape[viz.plane_axis(plane)]
        self.plane = _plane_buttons(plane, "lckd-viewer-plane")
        start = viz.best_slice(self.label, plane, shape=shape) if index is None else min(max(int(index), 0), n - 1)
        self.slice_slider = _slice_slider(n, start, "lckd-viewer-slider")
        self.overlay = _css(W.Checkbox(value=self.label is not None, description="regions over FLAIR",
                                       disabled=self.label is None, indent=False), "lckd-viewer-overlay")
        self.image = _css(W.Image(format="png"), "lckd-viewer-image")
        self.plane.observe(self._on_plane, names="value")
        for c in (self.slice_slider, self.overlay):
            c.observe(self._on_change, names="value")
        self.widget = _css(W.VBox([W.HBox([self.plane, self.slice_slider]), self.overlay, self.image]), "lckd-viewer")
        self.refresh()

    def _on_change(self, change=None) -> None:
        if not self._held:
            self.refresh()

    def _on_plane(self, change=None) -> None:
        plane = self.plane.value
        shape = self.volume.shape[1:]
        with self._held():
            _set_slider_range(self.slice_slider, shape[viz.plane_axis(plane)],
                              viz.best_slice(self.label, plane, shape=shape))
        self.refresh()

    def refresh(self) -> None:
        fig = viz.show_modalities(self.volume, self.label, self.plane.value, self.slice_slider.value,
                                  overlay=self.overlay.value, spacing=self.spacing, title=self.name)
        self.image.value = figure_png(fig, self.dpi)
        self.render_count += 1

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs):
        bundle = getattr(self.widget, "_repr_mimebundle_", None)
        return bundle(**kwargs) if bundle is not None else None


def slice_viewer(case_or_path=None, plane: str = "axial", **kwargs) -> SliceViewer:
    """:class:`SliceViewer` of a case (see :func:`load_explorer_case`; default: the first demo case)."""
    case = load_explorer_case(case_or_path)
    return SliceViewer(case["image"], case["label"], case["spacing"], case["name"], plane=plane, **kwargs)


__all__ = [
    "ExplorerState", "Explorer", "MethodExplorer", "SliceViewer", "render_view", "explorer", "slice_viewer",
    "load_explorer_case",
    "figure_png", "default_checkpoint", "PLANES", "BLEND_NOTE", "WARNING_TEXT",
]
