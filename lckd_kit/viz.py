"""Figures for LCKD: slices, overlays, score tables, 15-subset heatmaps, training history, 3-D views.

Every function here is a *pure render function*: it takes arrays / records and returns a
:class:`matplotlib.figure.Figure` or a plain :class:`plotly.graph_objects.Figure`; nothing is
shown, saved or kept in pyplot's global state (the matplotlib figures are built with
``Figure()``, so they never pile up and never need ``plt.close``). In a notebook ``display(fig)``
(or leaving ``fig`` as the last expression) renders it; ``fig.savefig(path)`` writes it.

Conventions used everywhere in the kit's figures
------------------------------------------------
* Arrays are RAS+ (nibabel / MONAI ``Orientation("RAS")``): voxel index ``x`` grows towards the
  patient's **Right**, ``y`` towards **Anterior**, ``z`` towards **Superior**.
* Slices are shown in the **radiological convention**, done once in :func:`take_slice`:
  axial and coronal slices put the patient's right on the image *left* (as if facing the
  patient), anterior / superior up; sagittal slices put anterior on the image left, superior up.
* One colour per region (:data:`REGION_COLORS`, Okabe-Ito, colour-blind friendly) and one per
  modality (:data:`MODALITY_COLORS`); display names :data:`DISPLAY_NAMES` (FLAIR, T1, T1ce, T2).
* Dice of two empty masks is 1 (the BraTS convention, as :func:`lckd_kit.metrics.hard_dice`).

plotly is only needed by the ``*_plotly`` / :func:`region_3d` functions and is imported there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import matplotlib
from matplotlib import colors as mcolors
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.offsetbox import AnchoredOffsetbox, TextArea, VPacker
from matplotlib.patches import Patch, Rectangle
from matplotlib.transforms import blended_transform_factory

from lckd_kit import MODALITIES, REGIONS, SUBSETS, as_mask

# ----------------------------------------------------------------------------------------------
# Shared look: names and colours, defined once
# ----------------------------------------------------------------------------------------------

#: display names of the modalities (the kit's lower-case names are for code)
DISPLAY_NAMES: dict[str, str] = {"flair": "FLAIR", "t1": "T1", "t1ce": "T1ce", "t2": "T2"}

#: one colour per region everywhere (Okabe-Ito: readable with the common colour-vision deficiencies,
#: and each one visible both on a grey MRI slice and on a white plot background)
REGION_COLORS: dict[str, str] = {"ET": "#D55E00", "TC": "#0072B2", "WT": "#009E73"}

#: long names of the nested regions (ET ⊂ TC ⊂ WT)
REGION_NAMES: dict[str, str] = {"ET": "enhancing tumour", "TC": "tumour core", "WT": "whole tumour"}

#: one colour per modality (the remaining Okabe-Ito colours, so never confused with a region)
MODALITY_COLORS: dict[str, str] = {"flair": "#E69F00", "t1": "#6E6E6E", "t1ce": "#CC79A7", "t2": "#56B4E9"}

#: colours of the loss terms in the history plots
LOSS_COLORS: dict[str, str] = {"loss": "#222222", "dice_loss": "#7B3294", "bce": "#A6611A", "kd": "#E69F00"}
LOSS_LABELS: dict[str, str] = {"loss": "total", "dice_loss": "Dice loss", "bce": "BCE", "kd": "KD"}

#: availability glyphs used in tables: present, missing
MARK_ON, MARK_OFF = "●", "○"

_PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
# orientation letters at (left, right, top, bottom) of a displayed slice, see take_slice
_PLANE_LETTERS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}


def display_name(modality: str | int) -> str:
    """``"t1ce"`` or ``2`` -> ``"T1ce"``."""
    return DISPLAY_NAMES[modality_key(modality)]


def modality_key(modality: str | int) -> str:
    """Modality index or (any-case) name -> the kit's lower-case name."""
    if isinstance(modality, (int, np.integer)) and not isinstance(modality, bool):
        return MODALITIES[int(modality)]
    key = str(modality).lower()
    if key not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    return key


def pretty_subset(mask: Sequence[bool] | str) -> str:
    """Display name of a subset: ``(True, False, True, False)`` -> ``"FLAIR + T1ce"``."""
    mask = as_mask(mask)
    return " + ".join(DISPLAY_NAMES[m] for m, on in zip(MODALITIES, mask) if on)


def availability_marks(mask: Sequence[bool] | str, sep: str = " ") -> str:
    """``(True, False, True, False)`` -> ``"● ○ ● ○"`` (FLAIR, T1, T1ce, T2 order)."""
    return sep.join(MARK_ON if on else MARK_OFF for on in as_mask(mask))


_IPYTHON_PNG = False


def _register_ipython_png() -> None:
    """Let IPython/Jupyter display a bare ``Figure`` as a PNG (once per process).

    Jupyter's inline backend registers that formatter only once pyplot has picked its backend;
    our figures never touch pyplot, so without this a notebook would print ``<Figure ...>``.
    """
    global _IPYTHON_PNG
    if _IPYTHON_PNG:
        return
    _IPYTHON_PNG = True
    try:
        from IPython import get_ipython
        from IPython.core.pylabtools import print_figure
    except ImportError:
        return
    ip = get_ipython()
    if ip is None:
        return
    png = ip.display_formatter.formatters["image/png"]
    try:
        png.lookup_by_type(Figure)  # already there (e.g. after %matplotlib inline): keep theirs
    except KeyError:
        png.for_type(Figure, lambda fig: print_figure(fig, "png", bbox_inches="tight"))


def _new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure outside pyplot's state (never auto-shown twice, never leaks), constrained layout."""
    _register_ipython_png()
    return Figure(figsize=figsize, layout="constrained")


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure for the kit's notebooks and reports (see :func:`_new_figure`): shown as a PNG in
    Jupyter, never through pyplot."""
    return _new_figure(figsize)


def _text_color_on(rgba: Sequence[float]) -> str:
    """Black or white, whichever reads better on a cell of colour ``rgba``."""
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def _fmt(v: float, fmt: str) -> str:
    """Format a number; NaN / None -> "–", and no "-0.000" for a value that rounds to zero."""
    if v is None or not np.isfinite(v):
        return "–"
    out = fmt.format(v)
    if not out.strip("+-0.%"):
        out = out.lstrip("+-")
    return out


# ----------------------------------------------------------------------------------------------
# Slices
# ----------------------------------------------------------------------------------------------

def plane_axis(plane: str) -> int:
    """Spatial axis a plane cuts: sagittal -> 0 (X), coronal -> 1 (Y), axial -> 2 (Z)."""
    try:
        return _PLANE_AXIS[plane.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"plane must be one of {tuple(_PLANE_AXIS)}, got {plane!r}") from None


def take_slice(vol: np.ndarray, plane: str = "axial", index: int | None = None) -> np.ndarray:
    """One slice of a RAS+ volume, oriented for ``imshow`` (``origin="upper"``), radiological view.

    Args:
        vol: ``(..., X, Y, Z)`` -- any leading axes (channels, regions) are kept.
        plane: ``"axial"`` (cut Z), ``"coronal"`` (cut Y) or ``"sagittal"`` (cut X).
        index: slice index along the cut axis (negative counts from the end); ``None`` = centre.

    Returns:
        ``(..., H, W)`` view: axial ``(Y, X)``, coronal ``(Z, X)``, sagittal ``(Z, Y)``, with
        rows running anterior->posterior (axial) or superior->inferior (coronal, sagittal) and
        columns running patient's right->left (axial, coronal: the radiological convention, the
        patient's right on the viewer's left) or anterior->posterior (sagittal: face to the left).
    """
    vol = np.asarray(vol)
    if vol.ndim < 3:
        raise ValueError(f"expected (..., X, Y, Z), got shape {vol.shape}")
    axis = vol.ndim - 3 + plane_axis(plane)
    n = vol.shape[axis]
    index = n // 2 if index is None else int(index)
    if not -n <= index < n:
        raise IndexError(f"{plane} slice {index} out of range for {n} slices")
    s = np.take(vol, index % n, axis=axis)  # (..., first, second) remaining spatial axes in X,Y,Z order
    # In all three planes the first remaining axis is the horizontal one and the second the vertical
    # one; both grow towards R/A/S, and the display wants them decreasing (R left, A/S up).
    return np.swapaxes(s, -1, -2)[..., ::-1, ::-1]


def best_slice(regions: np.ndarray | None, plane: str = "axial", region: str = "WT",
               shape: Sequence[int] | None = None) -> int:
    """Index of the slice with the most ``region`` voxels; the centre slice if there are none.

    Args:
        regions: ``(3, X, Y, Z)`` region masks (REGIONS order) or ``(X, Y, Z)`` one mask, or None.
        shape: spatial shape ``(X, Y, Z)`` for the centre fallback when ``regions`` is None.
    """
    axis = plane_axis(plane)
    if regions is None:
        if shape is None:
            raise ValueError("best_slice needs regions or a shape")
        return int(shape[axis]) // 2
    r = np.asarray(regions)
    if r.ndim == 4:
        r = r[REGIONS.index(region)]
    counts = (r > 0).sum(axis=tuple(a for a in range(3) if a != axis))
    return int(np.argmax(counts)) if counts.max() > 0 else r.shape[axis] // 2


def _aspect(plane: str, spacing: Sequence[float] | None) -> float:
    """imshow aspect (row height / column width) of a displayed slice for voxel ``spacing``."""
    if spacing is None:
        return 1.0
    sx, sy, sz = (float(s) for s in spacing)
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[plane.lower()]


def intensity_window(vol: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> tuple[float, float]:
    """Display range of a volume: percentiles of its non-zero (brain) voxels, robust to outliers."""
    v = np.asarray(vol, dtype=np.float32)
    nz = v[(v != 0) & np.isfinite(v)]
    if nz.size == 0:
        return 0.0, 1.0
    a, b = np.percentile(nz, [lo, hi])
    return (float(a), float(b)) if b > a else (float(a), float(a) + 1.0)


def show_gray(ax, img2d: np.ndarray, window: tuple[float, float], aspect: float = 1.0, alpha: float = 1.0):
    """Grey-scale image of one slice in ``window``, without ticks."""
    ax.imshow(img2d, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest",
              aspect=aspect, alpha=alpha)
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def orientation_letters(ax, plane: str, color: str = "white", fontsize: float = 9) -> None:
    """Write R/L, A/P or S/I at the edges of an axes showing a :func:`take_slice` image."""
    left, right, top, bottom = _PLANE_LETTERS[plane.lower()]
    kw = dict(transform=ax.transAxes, color=color, fontsize=fontsize, fontweight="bold")
    ax.text(0.02, 0.5, left, ha="left", va="center", **kw)
    ax.text(0.98, 0.5, right, ha="right", va="center", **kw)
    ax.text(0.5, 0.98, top, ha="center", va="top", **kw)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **kw)


def overlay_regions(ax, regions2d: np.ndarray, alpha: float = 0.45, style: str = "fill",
                    regions: Sequence[str] = REGIONS, linewidth: float = 1.6, linestyle: str = "-") -> None:
    """Draw region masks on an axes that shows a :func:`take_slice` image of the same shape.

    Args:
        regions2d: ``(3, H, W)`` masks in REGIONS order (e.g. ``take_slice(label_regions, ...)``).
        alpha: fill opacity (``style="fill"``).
        style: ``"fill"`` -- one translucent layer, each pixel coloured by its innermost region
            (regions are nested, so stacking three layers would muddy the colours); or
            ``"contour"`` -- outlines in the region colours.
        regions: which regions to draw (default all three).
    """
    r2 = np.asarray(regions2d) > 0
    if r2.ndim != 3 or r2.shape[0] != len(REGIONS):
        raise ValueError(f"expected (3, H, W) region masks, got {r2.shape}")
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    had_image = bool(ax.images)
    if style == "fill":
        rgba = np.zeros(r2.shape[1:] + (4,), dtype=np.float32)
        for name in ("WT", "TC", "ET"):  # outer to inner: the innermost region wins
            if name in regions:
                m = r2[REGIONS.index(name)]
                rgba[m] = (*mcolors.to_rgb(REGION_COLORS[name]), alpha)
        ax.imshow(rgba, interpolation="nearest", aspect=ax.get_aspect())
    elif style == "contour":
        for name in ("WT", "TC", "ET"):
            m = r2[REGIONS.index(name)]
            if name in regions and m.any():  # contour() warns on an empty mask
                ax.contour(m.astype(np.float32), levels=[0.5], colors=[REGION_COLORS[name]],
                           linewidths=linewidth, linestyles=linestyle)
    else:
        raise ValueError(f"style must be 'fill' or 'contour', got {style!r}")
    if had_image:  # keep the base image's pixel-edge limits (contour would autoscale to centres)
        ax.set_xlim(xlim)
        ax.set_ylim(ylim)


def region_handles(style: str = "fill", regions: Sequence[str] = REGIONS, alpha: float = 0.6) -> list:
    """Legend handles (one per region, REGION_COLORS) for a fill or contour overlay."""
    out = []
    for name in regions:
        label = f"{name}  {REGION_NAMES[name]}"
        if style == "contour":
            out.append(Line2D([], [], color=REGION_COLORS[name], lw=2, label=label))
        else:
            out.append(Patch(facecolor=mcolors.to_rgba(REGION_COLORS[name], alpha),
                             edgecolor=REGION_COLORS[name], label=label))
    return out


def region_legend(ax, style: str = "fill", regions: Sequence[str] = REGIONS, loc: str = "lower center", **kw):
    """Add the region legend (ET / TC / WT with their colours and long names) to ``ax``."""
    kw.setdefault("fontsize", 8)
    kw.setdefault("framealpha", 0.85)
    return ax.legend(handles=region_handles(style, regions), loc=loc, **kw)


def show_modalities(image: np.ndarray, label_regions: np.ndarray | None = None, plane: str = "axial",
                    index: int | None = None, overlay: bool = True, available: Sequence[bool] | None = None,
                    spacing: Sequence[float] | None = None, title: str | None = None,
                    letters: bool = True) -> Figure:
    """The four modalities of one slice side by side, plus the tumour regions on FLAIR.

    Args:
        image: ``(4, X, Y, Z)`` float, MODALITIES order, RAS+.
        label_regions: ``(3, X, Y, Z)`` region masks (REGIONS order) or None.
        plane: ``"axial"``, ``"coronal"`` or ``"sagittal"`` (radiological view, see :func:`take_slice`).
        index: slice index; None = the slice with the most WT voxels (or the centre slice).
        overlay: add a fifth panel with the regions filled over FLAIR (needs ``label_regions``).
        available: optional availability mask; missing modalities are drawn dimmed and marked.
        spacing: voxel size ``(sx, sy, sz)`` in mm for the pixel aspect (None = isotropic).
        letters: write R/L, A/P (S/I) orientation letters on the first panel.

    Returns:
        Figure with 4 (or 5) image axes titled FLAIR, T1, T1ce, T2 (, "FLAIR + regions").
    """
    image = np.asarray(image)
    if image.ndim != 4 or image.shape[0] != len(MODALITIES):
        raise ValueError(f"expected image (4, X, Y, Z), got {image.shape}")
    if index is None:
        index = best_slice(label_regions, plane, shape=image.shape[1:])
    avail = as_mask(available) if available is not None else (True,) * len(MODALITIES)
    with_overlay = overlay and label_regions is not None
    n = len(MODALITIES) + int(with_overlay)
    aspect = _aspect(plane, spacing)
    sl = take_slice(image, plane, index)
    h, w = sl.shape[1:]
    panel_w = 2.7
    fig = _new_figure((panel_w * n, panel_w * aspect * h / w + 0.9))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for m, ax in enumerate(axes[: len(MODALITIES)]):
        name = DISPLAY_NAMES[MODALITIES[m]]
        ax.set_facecolor("black")
        show_gray(ax, sl[m], intensity_window(image[m]), aspect, alpha=1.0 if avail[m] else 0.25)
        if avail[m]:
            ax.set_title(name, fontsize=12, fontweight="bold")
        else:
            ax.set_title(f"{name} (missing)", fontsize=12, color="0.5")
            ax.text(0.5, 0.5, "missing", transform=ax.transAxes, ha="center", va="center",
                    color="white", fontsize=16, fontweight="bold", rotation=20, alpha=0.9)
    if with_overlay:
        ax = axes[-1]
        show_gray(ax, sl[0], intensity_window(image[0]), aspect)
        overlay_regions(ax, take_slice(label_regions, plane, index), style="fill")
        ax.set_title("FLAIR + regions", fontsize=12, fontweight="bold")
        fig.legend(handles=region_handles("fill"), loc="outside lower right", ncol=3, fontsize=9, frameon=False)
    if letters:
        orientation_letters(axes[0], plane)
    n_slices = image.shape[1 + plane_axis(plane)]
    head = f"{plane.capitalize()} slice {index} of {n_slices - 1}"
    fig.suptitle(f"{title} — {head}" if title else head, fontsize=12)
    return fig


# ----------------------------------------------------------------------------------------------
# Prediction vs truth
# ----------------------------------------------------------------------------------------------

def dice_per_region(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Hard Dice per region ``2|P∩T| / (|P|+|T|)`` of ``(3, ...)`` masks; both empty -> 1 (BraTS)."""
    t = np.asarray(truth) > 0
    p = np.asarray(pred) > 0
    out = {}
    for r, name in enumerate(REGIONS):
        denom = t[r].sum() + p[r].sum()
        out[name] = 1.0 if denom == 0 else float(2.0 * np.logical_and(t[r], p[r]).sum() / denom)
    return out


def dice_box(ax, dice: Mapping[str, float], loc: str = "lower right", label: str = "Dice") -> None:
    """A small white box on ``ax`` listing ``Dice / ET 0.81 / TC 0.85 / WT 0.90`` in region colours."""
    rows = [TextArea(label, textprops=dict(color="black", fontsize=9, fontweight="bold"))]
    rows += [TextArea(f"{r}  {_fmt(dice.get(r, float('nan')), '{:.3f}')}",
                      textprops=dict(color=REGION_COLORS[r], fontsize=10, fontweight="bold")) for r in REGIONS]
    box = AnchoredOffsetbox(loc=loc, child=VPacker(children=rows, align="left", pad=0, sep=2),
                            frameon=True, pad=0.4, borderpad=0.5)
    box.patch.set_alpha(0.85)
    box.patch.set_boxstyle("round,pad=0.2")
    ax.add_artist(box)


def compare_prediction(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, plane: str = "axial",
                       index: int | None = None, modality: str | int = "flair",
                       dice: Mapping[str, float] | None = None, title: str | None = None,
                       spacing: Sequence[float] | None = None) -> Figure:
    """Image, ground truth and prediction of one slice, with per-region Dice.

    Panels: the chosen modality; the ground truth filled; the prediction filled with the ground
    truth drawn as outlines on top (fill outside an outline = false positive, outline with no fill
    inside = false negative).

    Args:
        image: ``(4, X, Y, Z)`` (or ``(X, Y, Z)`` one modality).
        truth, pred: ``(3, X, Y, Z)`` binary region masks, REGIONS order.
        index: slice index; None = the slice with the most ground-truth WT voxels.
        modality: which channel to show, name or index.
        dice: ``{"ET": .., "TC": .., "WT": ..}`` to print; None = computed here on the whole volume.
        title: figure title (e.g. the case id and the modality subset).
    """
    image = np.asarray(image)
    mkey = modality_key(modality)
    vol = image[MODALITIES.index(mkey)] if image.ndim == 4 else image
    if index is None:
        index = best_slice(truth, plane, shape=vol.shape)
    if dice is None:
        dice = dice_per_region(truth, pred)
    aspect = _aspect(plane, spacing)
    img = take_slice(vol, plane, index)
    t2, p2 = take_slice(truth, plane, index), take_slice(pred, plane, index)
    win = intensity_window(vol)
    h, w = img.shape
    fig = _new_figure((9.0, 3.0 * aspect * h / w + 1.1))
    axes = fig.subplots(1, 3)
    titles = (DISPLAY_NAMES[mkey], "Ground truth", "Prediction  (outline = truth)")
    for ax, t in zip(axes, titles):
        show_gray(ax, img, win, aspect)
        ax.set_title(t, fontsize=11, fontweight="bold")
    overlay_regions(axes[1], t2, style="fill")
    overlay_regions(axes[2], p2, style="fill")
    overlay_regions(axes[2], t2, style="contour", linewidth=1.5)
    orientation_letters(axes[0], plane)
    fig.legend(handles=region_handles("fill"), loc="outside lower center", ncol=3, fontsize=9, frameon=False)
    dice_box(axes[2], dice)
    n_slices = vol.shape[plane_axis(plane)]
    head = f"{plane.capitalize()} slice {index} of {n_slices - 1}"
    fig.suptitle(f"{title} — {head}" if title else head, fontsize=12)
    return fig


# ----------------------------------------------------------------------------------------------
# Heatmaps and tables
# ----------------------------------------------------------------------------------------------

def _winner_matrix(scores: np.ndarray, winners: Any) -> np.ndarray:
    """Normalise ``winners`` to a ``(4, 3)`` bool matrix [modality, region].

    Accepts None (argmax of each column), a dict ``{"ET": "t1ce", ...}`` (names or indices), a
    sequence of 3 modality names / indices in REGIONS order, or a ``(4, 3)`` bool array.
    """
    win = np.zeros((len(MODALITIES), len(REGIONS)), dtype=bool)
    if winners is None:
        s = np.where(np.isfinite(scores), scores, -np.inf)
        for r in range(len(REGIONS)):
            if np.isfinite(s[:, r]).any():
                win[int(np.argmax(s[:, r])), r] = True
        return win
    if isinstance(winners, Mapping):
        for region, mod in winners.items():
            win[MODALITIES.index(modality_key(mod)), REGIONS.index(region)] = True
        return win
    arr = np.asarray(winners)
    if arr.shape == win.shape and arr.dtype == bool:
        return arr.copy()
    for r, mod in enumerate(winners):
        win[MODALITIES.index(modality_key(mod)), r] = True
    return win


def _color_region_ticks(labels) -> None:
    for lab in labels:
        col = REGION_COLORS.get(lab.get_text())
        if col:
            lab.set_color(col)
            lab.set_fontweight("bold")


def score_table_figure(scores: np.ndarray, winners: Any = None,
                       title: str = "Teacher election: who segments each region best alone?",
                       value_label: str = "Dice (single modality)", cmap: str = "viridis",
                       vmin: float | None = 0.0, vmax: float | None = 1.0, fmt: str = "{:.2f}") -> Figure:
    """Annotated heatmap of the election scores; each region's winner (teacher) cell is outlined.

    Args:
        scores: ``(4, 3)`` [modality (FLAIR, T1, T1ce, T2) × region (ET, TC, WT)].
        winners: teachers per region: None (best score of each column), ``{"ET": "t1ce", ...}``,
            3 names / indices in REGIONS order, or a ``(4, 3)`` bool matrix.
        vmin, vmax: colour range (None = data range).

    Returns:
        Figure with the heatmap axes (texts ``fmt.format(score)``, winners bold) and a colorbar.
    """
    s = np.asarray(scores, dtype=float)
    if s.shape != (len(MODALITIES), len(REGIONS)):
        raise ValueError(f"expected scores (4, 3) [modality × region], got {s.shape}")
    win = _winner_matrix(s, winners)
    fig = _new_figure((5.2, 4.4))
    ax = fig.add_subplot()
    cm = matplotlib.colormaps[cmap]
    norm = mcolors.Normalize(vmin=np.nanmin(s) if vmin is None else vmin,
                             vmax=np.nanmax(s) if vmax is None else vmax)
    im = ax.imshow(np.ma.masked_invalid(s), cmap=cm, norm=norm, aspect="auto")
    for m in range(s.shape[0]):
        for r in range(s.shape[1]):
            v = s[m, r]
            face = cm(norm(v)) if np.isfinite(v) else (1, 1, 1, 1)
            txt = _fmt(v, fmt) + ("  ★" if win[m, r] else "")
            ax.text(r, m, txt, ha="center", va="center", fontsize=13 if win[m, r] else 11,
                    fontweight="bold" if win[m, r] else "normal", color=_text_color_on(face))
            if win[m, r]:  # white halo under a black frame: visible on any colour of the map
                for lw, col in ((6, "white"), (2.5, "black")):
                    ax.add_patch(Rectangle((r - 0.5, m - 0.5), 1, 1, fill=False, lw=lw, edgecolor=col, zorder=3))
    ax.set_xticks(range(len(REGIONS)), REGIONS, fontsize=12)
    ax.set_yticks(range(len(MODALITIES)), [DISPLAY_NAMES[m] for m in MODALITIES], fontsize=12)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    _color_region_ticks(ax.get_xticklabels())
    ax.set_xlim(-0.5, len(REGIONS) - 0.5)
    ax.set_ylim(len(MODALITIES) - 0.5, -0.5)
    fig.colorbar(im, ax=ax, label=value_label, shrink=0.85)
    teachers = sorted({MODALITIES[m] for m, r in zip(*np.nonzero(win))}, key=MODALITIES.index)
    by = ", ".join(f"{DISPLAY_NAMES[t]} ({', '.join(REGIONS[r] for r in np.nonzero(win[MODALITIES.index(t)])[0])})"
                   for t in teachers)
    ax.set_xlabel(f"★ teacher{'s' if len(teachers) != 1 else ''}: {by}" if teachers else "no teacher",
                  fontsize=11)
    ax.set_title(title, fontsize=12, pad=10)
    return fig


def _check_subset_scores(dice: np.ndarray) -> np.ndarray:
    d = np.asarray(dice, dtype=float)
    if d.shape != (len(SUBSETS), len(REGIONS)):
        raise ValueError(f"expected (15, 3) scores in SUBSETS × REGIONS order, got {d.shape}")
    return d


def _subset_columns(d: np.ndarray, show_mean: bool) -> tuple[np.ndarray, list[str]]:
    cols = list(REGIONS)
    if show_mean:
        with np.errstate(invalid="ignore"):
            d = np.concatenate([d, np.nanmean(d, axis=1, keepdims=True)
                                if np.isfinite(d).any() else d[:, :1]], axis=1)
        cols.append("Mean")
    return d, cols


def _diff_limits(d: np.ndarray, vmin, vmax, flagged: np.ndarray | None = None) -> tuple[float, float]:
    """Symmetric colour limits around 0 for difference maps (so 0 is the neutral colour).

    The scale is set by the cells that are not ``flagged`` (cells resting on convention scores):
    one stray-voxel case must not wash out every other cell; flagged cells beyond it saturate."""
    if vmin is not None and vmax is not None:
        return float(vmin), float(vmax)
    keep = np.isfinite(d) & (~flagged if flagged is not None else True)
    if not keep.any():
        keep = np.isfinite(d)
    finite = np.abs(d[keep])
    lim = max(float(finite.max()) if finite.size else 0.0, 0.01)
    return -lim, lim


def subset_heatmap(dice: np.ndarray, title: str = "Dice for every set of available modalities",
                   vmin: float | None = None, vmax: float | None = None, diff: bool = False,
                   labels: str = "marks", show_mean: bool = False, fmt: str | None = None,
                   cmap: str | None = None, cbar_label: str | None = None,
                   flagged: np.ndarray | None = None) -> Figure:
    """The 15-subset table as an annotated heatmap (paper Table 1 as a picture).

    Args:
        dice: ``(15, 3)`` in SUBSETS × REGIONS order.
        vmin, vmax: colour range; None = ``0..1`` (or symmetric around 0 when ``diff``).
        diff: values are differences (e.g. LCKD − baseline): diverging colormap centred at 0,
            signed annotations.
        labels: ``"marks"`` -- a ●/○ availability grid (columns FLAIR, T1, T1ce, T2) left of the
            heatmap; ``"names"`` -- subset names ("FLAIR + T1ce") as row labels.
        show_mean: add a Mean column (mean over the three regions).
        fmt: annotation format (default ``"{:.3f}"``, ``"{:+.3f}"`` for diff).
        flagged: optional ``(15, 3)`` bool, cells that rest on cases without that region
            (``stats.convention_cells``): marked with a dagger and explained under the figure; they
            do not set the colour scale of a difference map.

    Returns:
        Figure; the heatmap axes has 15 rows, 3 (or 4) columns and one text per cell.
    """
    d, cols = _subset_columns(_check_subset_scores(dice), show_mean)
    flags = np.zeros(d.shape, bool)
    if flagged is not None:
        flags[:, :len(REGIONS)] = np.asarray(flagged, bool).reshape(len(SUBSETS), len(REGIONS))
    fmt = fmt or ("{:+.3f}" if diff else "{:.3f}")
    if diff:
        lo, hi = _diff_limits(d, vmin, vmax, flags)
        norm = mcolors.TwoSlopeNorm(vcenter=0.0, vmin=min(lo, -1e-9), vmax=max(hi, 1e-9))
        cm = matplotlib.colormaps[cmap or "RdBu"]
    else:
        norm = mcolors.Normalize(0.0 if vmin is None else vmin, 1.0 if vmax is None else vmax)
        cm = matplotlib.colormaps[cmap or "viridis"]
    n_rows, n_cols = d.shape
    marks = labels == "marks"
    fig = _new_figure((1.05 * n_cols + (2.2 if marks else 2.6) + 1.2, 7.4))
    if marks:
        gs = fig.add_gridspec(1, 2, width_ratios=[len(MODALITIES) * 0.5, n_cols * 1.05], wspace=0.0)
        ax_m = fig.add_subplot(gs[0])
        ax = fig.add_subplot(gs[1], sharey=ax_m)
    else:
        ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(d), cmap=cm, norm=norm, aspect="auto")
    for i in range(n_rows):
        for j in range(n_cols):
            face = cm(norm(d[i, j])) if np.isfinite(d[i, j]) else (1, 1, 1, 1)
            ax.text(j, i, _fmt(d[i, j], fmt) + ("†" if flags[i, j] else ""), ha="center", va="center", fontsize=10,
                    color=_text_color_on(face), fontweight="bold" if cols[j] == "Mean" else "normal")
    ax.set_xticks(range(n_cols), cols, fontsize=11)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    _color_region_ticks(ax.get_xticklabels())
    if show_mean:
        ax.axvline(n_cols - 1.5, color="white", lw=3)
    # white gaps between the singles / pairs / triples / all-four groups
    sizes = [sum(m) for m in SUBSETS]
    bounds = [i + 0.5 for i in range(n_rows - 1) if sizes[i] != sizes[i + 1]]
    for b in bounds:
        ax.axhline(b, color="white", lw=3)
    ax.set_ylim(n_rows - 0.5, -0.5)
    if marks:
        for m in range(len(MODALITIES)):
            on = np.array([s[m] for s in SUBSETS])
            rows = np.arange(n_rows)
            ax_m.scatter(np.full(on.sum(), m), rows[on], s=70, color="#333333", zorder=3)
            ax_m.scatter(np.full((~on).sum(), m), rows[~on], s=70, facecolor="white", edgecolor="#999999", zorder=3)
        ax_m.set_xlim(-0.6, len(MODALITIES) - 0.4)
        ax_m.set_xticks(range(len(MODALITIES)), [DISPLAY_NAMES[m] for m in MODALITIES], fontsize=10,
                        rotation=45, ha="left")
        ax_m.xaxis.tick_top()
        ax_m.tick_params(length=0)
        ax_m.set_yticks([])
        for b in bounds:
            ax_m.axhline(b, color="#cccccc", lw=1)
        for s in ax_m.spines.values():
            s.set_visible(False)
        ax_m.set_ylim(n_rows - 0.5, -0.5)
        ax.tick_params(labelleft=False, left=False)
    else:
        ax.set_yticks(range(n_rows), [pretty_subset(m) for m in SUBSETS], fontsize=9)
    for s in ax.spines.values():
        s.set_visible(False)
    label = cbar_label or ("Δ Dice" if diff else "Dice")
    fig.colorbar(im, ax=ax, label=label, shrink=0.6, extend="both" if diff and flags.any() else "neither")
    fig.suptitle(title, fontsize=12)
    if flags.any():
        fig.text(0.5, 0.01, "† rests on held-out cases without this region: their Dice is 1 or 0 by convention "
                 "(empty vs empty, or stray voxels), not an overlap", ha="center", fontsize=8, color="0.3", wrap=True)
    return fig


def subset_heatmap_plotly(dice: np.ndarray, title: str = "Dice for every set of available modalities",
                          vmin: float | None = None, vmax: float | None = None, diff: bool = False,
                          show_mean: bool = False, fmt: str | None = None, height: int = 560):
    """Interactive :func:`subset_heatmap` (plotly ``go.Figure`` with one ``go.Heatmap``).

    Rows are labelled with ●/○ marks (FLAIR, T1, T1ce, T2); hovering shows the subset name.
    """
    import plotly.graph_objects as go

    d, cols = _subset_columns(_check_subset_scores(dice), show_mean)
    fmt = fmt or ("{:+.3f}" if diff else "{:.3f}")
    rows = [availability_marks(m) for m in SUBSETS]
    names = [[pretty_subset(m)] * len(cols) for m in SUBSETS]
    text = [[_fmt(v, fmt) for v in row] for row in d]
    z = np.where(np.isfinite(d), d, None).tolist()
    if diff:
        lo, hi = _diff_limits(d, vmin, vmax)
        color = dict(colorscale="RdBu", zmid=0.0, zmin=lo, zmax=hi)
    else:
        color = dict(colorscale="Viridis", zmin=0.0 if vmin is None else vmin, zmax=1.0 if vmax is None else vmax)
    heat = go.Heatmap(z=z, x=cols, y=rows, text=text, texttemplate="%{text}", customdata=names,
                      hovertemplate="%{customdata}<br>%{x}: %{text}<extra></extra>", xgap=2, ygap=2,
                      colorbar=dict(title="Δ Dice" if diff else "Dice"), **color)
    fig = go.Figure(heat)
    fig.update_layout(title=title, height=height, width=260 + 110 * len(cols) + 120,
                      margin=dict(l=130, r=20, t=90, b=20), plot_bgcolor="white")  # l: room for the key
    fig.update_xaxes(side="top", tickfont=dict(size=13))
    fig.update_yaxes(autorange="reversed", tickfont=dict(size=14, family="monospace"))
    fig.add_annotation(text="FLAIR T1 T1ce T2<br>(● available)", xref="paper", yref="paper", x=0.0, y=1.0,
                       xanchor="right", yanchor="bottom", showarrow=False, font=dict(size=11), align="right")
    return fig


def markdown_subset_table(dice: np.ndarray, hd95: np.ndarray | None = None, title: str | None = None,
                          percent: bool = False, digits: int | None = None) -> str:
    """Paper-style markdown table of the 15-subset results.

    Columns ``FLAIR | T1 | T1ce | T2 | ET | TC | WT | Mean`` (+ ``HD95 ET | HD95 TC | HD95 WT``),
    one row per subset with ●/○ availability marks, then a Mean row (mean over the 15 subsets).

    Args:
        dice: ``(15, 3)`` SUBSETS × REGIONS.
        hd95: optional ``(15, 3)`` 95th-percentile Hausdorff distances (mm).
        title: optional bold line (plus a blank line) above the table.
        percent: print Dice × 100 (as the paper) instead of fractions.
        digits: decimals (default 2 for percent, 3 for fractions).

    Returns:
        ``2 + 15 + 1`` table lines (header, separator, subsets, mean), joined with newlines.
    """
    d = _check_subset_scores(dice) * (100.0 if percent else 1.0)
    digits = digits if digits is not None else (2 if percent else 3)
    f = "{:.%df}" % digits
    with np.errstate(invalid="ignore"):
        row_mean = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in d])
    blocks = [d, row_mean[:, None]]
    head = [DISPLAY_NAMES[m] for m in MODALITIES] + list(REGIONS) + ["Mean"]
    if hd95 is not None:
        blocks.append(_check_subset_scores(hd95))
        head += [f"HD95 {r}" for r in REGIONS]
    vals = np.concatenate(blocks, axis=1)
    col_mean = np.array([np.nanmean(c) if np.isfinite(c).any() else np.nan for c in vals.T])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":-:"] * len(MODALITIES) + ["--:"] * vals.shape[1]) + "|"]
    for mask, row in zip(SUBSETS, vals):
        cells = [MARK_ON if on else MARK_OFF for on in mask] + [_fmt(v, f) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["**Mean**"] + [""] * (len(MODALITIES) - 1) + [f"**{_fmt(v, f)}**" for v in col_mean]
    lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    return f"**{title}**\n\n{table}" if title else table


# ----------------------------------------------------------------------------------------------
# Training history
# ----------------------------------------------------------------------------------------------

def _as_records(records: Iterable[Mapping] | str | Path | None) -> list[Mapping]:
    if records is None:
        return []
    if isinstance(records, (str, Path)):
        from lckd_kit.checkpoint import read_history

        return read_history(records)
    return [r for r in records if isinstance(r, Mapping)]


def _of_kind(records: list[Mapping], kind: str) -> list[Mapping]:
    return sorted((r for r in records if r.get("kind") == kind and "step" in r), key=lambda r: r["step"])


def _ema(y: np.ndarray, weight: float) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing); NaNs are skipped."""
    if weight <= 0 or len(y) == 0:
        return y
    out = np.empty_like(y, dtype=float)
    acc, norm = 0.0, 0.0
    for i, v in enumerate(y):
        if np.isfinite(v):
            acc = weight * acc + (1 - weight) * v
            norm = weight * norm + (1 - weight)
        out[i] = acc / norm if norm > 0 else np.nan
    return out


def _last_step(records: list[Mapping]) -> float | None:
    steps = [r["step"] for r in records if isinstance(r.get("step"), (int, float))]
    return max(steps) if steps else None


def _stage2_start(records: list[Mapping]) -> float | None:
    s2 = [r["step"] for r in records if r.get("kind") == "step" and r.get("stage") == 2]
    if not s2:
        return None
    # a record's step counts the steps done, so the last stage-1 record marks the boundary itself
    s1 = [r["step"] for r in records if r.get("kind") == "step" and r.get("stage") == 1 and r["step"] < min(s2)]
    return max(s1) if s1 else min(s2)


def mark_stages(ax, records, label: bool = True) -> None:
    """Shade stage 2 of a two-stage run on ``ax`` (x = step) and mark where it starts."""
    records = _as_records(records)
    s2 = _stage2_start(records)
    if s2 is None:
        return
    end = _last_step(records)
    ax.axvspan(s2, max(end, s2), color="#EEEEEE", zorder=0, lw=0)
    ax.axvline(s2, color="#888888", ls="--", lw=1, zorder=1)
    if label:
        tr = blended_transform_factory(ax.transData, ax.transAxes)
        ax.text(s2, 0.97, "  stage 2 →", transform=tr, ha="left", va="top", fontsize=9, color="#555555")
        has_s1 = any(r.get("kind") == "step" and r.get("stage") == 1 for r in records)
        if has_s1:
            ax.text(s2, 0.97, "← stage 1  ", transform=tr, ha="right", va="top", fontsize=9, color="#555555")


def _note(ax, text: str) -> None:
    """A centred grey note on an empty panel (instead of failing on missing records)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11,
            color="#777777", style="italic")
    ax.set_yticks([])


#: legends of the history panels sit right of the plot, so they never hide a curve
_OUTSIDE_LEGEND = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False, borderaxespad=0.0)


def _axes(ax, figsize=(8, 3.2)):
    if ax is not None:
        return ax.figure, ax
    fig = _new_figure(figsize)
    return fig, fig.add_subplot()


def plot_loss(records, ax=None, smooth: float = 0.9, logy: bool = False,
              terms: Sequence[str] = ("loss", "dice_loss", "bce", "kd"), show_lr: bool = False,
              stage_labels: bool = True, kd_weight: float | None = None) -> Figure:
    """Loss terms over training steps: faint raw values, bold smoothed curves, stage 2 shaded.

    Args:
        records: history records (list of dicts, or a JSON-lines path); uses ``kind == "step"``.
        smooth: EMA weight in ``[0, 1)`` (0 = no smoothing).
        logy: logarithmic loss axis.
        terms: record keys to plot (missing / non-finite ones are skipped).
        show_lr: also draw the learning rate on a twin y axis.
        kd_weight: the run's KD weight: the KD curve is then drawn as ``kd_weight x KD``, the part
            of the total it makes up (None: the unweighted KD term, labelled so).
    """
    records = _as_records(records)
    fig, ax = _axes(ax)
    steps = _of_kind(records, "step")
    ax.set_title("Training loss", fontsize=11, loc="left", fontweight="bold")
    if not steps:
        _note(ax, "no training steps yet")
        return fig
    x = np.array([r["step"] for r in steps], dtype=float)
    drawn = 0
    for key in terms:
        y = np.array([float(r[key]) if isinstance(r.get(key), (int, float)) else np.nan for r in steps])
        if not np.isfinite(y).any():
            continue
        col, lab = LOSS_COLORS.get(key, None), LOSS_LABELS.get(key, key)
        if key == "kd":
            if kd_weight is not None:
                y, lab = y * kd_weight, f"{kd_weight:g} × KD (its part of the total)"
            else:
                lab = "KD (unweighted; the total adds kd_weight × KD)"
        lw = 2.2 if key == "loss" else 1.6
        if smooth > 0 and len(y) > 2:
            ax.plot(x, y, color=col, alpha=0.18, lw=0.8)
            ax.plot(x, _ema(y, smooth), color=col, lw=lw, label=lab)
        else:
            ax.plot(x, y, color=col, lw=lw, label=lab, marker="o" if len(y) < 30 else None, ms=3)
        drawn += 1
    if not drawn:
        _note(ax, "no loss values in the records")
        return fig
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    mark_stages(ax, records, label=stage_labels)
    handles, _ = ax.get_legend_handles_labels()
    if smooth > 0 and len(x) > 2:  # say what the faint lines are
        handles.append(Line2D([], [], color="#222222", alpha=0.25, lw=0.8,
                              label="faint: each logged mean (every log_every steps); bold: smoothed"))
    ax.legend(handles=handles, **_OUTSIDE_LEGEND)
    if show_lr:
        plot_lr(records, ax=ax.twinx(), twin=True)
    return fig


def plot_lr(records, ax=None, twin: bool = False) -> Figure:
    """Learning rate over steps (its own small panel, or a twin axis of the loss panel)."""
    records = _as_records(records)
    fig, ax = _axes(ax, (8, 1.6))
    steps = [r for r in _of_kind(records, "step") if isinstance(r.get("lr"), (int, float))]
    if not steps:
        if not twin:
            _note(ax, "no learning-rate values")
        return fig
    x = [r["step"] for r in steps]
    y = [r["lr"] for r in steps]
    ax.plot(x, y, color="#4D4D4D", lw=1.4, ls=":" if twin else "-", label="lr")
    ax.set_ylabel("learning rate", fontsize=9)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if not twin:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        mark_stages(ax, records, label=False)
    return fig


def plot_val_dice(records, ax=None, stage_labels: bool = False) -> Figure:
    """Validation Dice (all modalities present) per region over steps, best mean marked."""
    records = _as_records(records)
    fig, ax = _axes(ax)
    vals = [r for r in _of_kind(records, "val") if isinstance(r.get("dice"), Mapping)]
    ax.set_title("Validation Dice (all four modalities)", fontsize=11, loc="left", fontweight="bold")
    if not vals:
        _note(ax, "no validation yet")
        return fig
    x = np.array([r["step"] for r in vals], dtype=float)
    ys = {}
    for name in REGIONS:
        y = np.array([float(r["dice"].get(name, np.nan)) for r in vals])
        ys[name] = y
        ax.plot(x, y, color=REGION_COLORS[name], lw=2, marker="o", ms=4, label=name)
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(np.stack(list(ys.values())), axis=0)
    ax.plot(x, mean, color="#444444", lw=1.5, ls="--", label="mean")
    if np.isfinite(mean).any():
        b = int(np.nanargmax(mean))
        ax.plot(x[b], mean[b], marker="*", ms=14, color="#444444", zorder=5, ls="none")
        ax.annotate(f"best mean {mean[b]:.3f}\n@ step {int(x[b])}", (x[b], mean[b]), xytext=(6, -22),
                    textcoords="offset points", fontsize=8, color="#444444")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("Dice")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    mark_stages(ax, records, label=stage_labels)
    ax.legend(**_OUTSIDE_LEGEND)
    return fig


def _initial_teachers(records: list[Mapping], before: float) -> list[str]:
    """The teacher set the step records report before step ``before`` (the initial teachers)."""
    for r in _of_kind(records, "step"):
        if r["step"] <= before and r.get("teachers"):
            return [modality_key(m) for m in r["teachers"]]
    return []


def plot_teacher_timeline(records, ax=None) -> Figure:
    """Who was teacher when: one strip per region, coloured by the modality elected for it.

    Each election holds until the next one (the last until the last logged step); election steps
    are ticked. Before the first election every region is taught by the initial teachers (the
    step records' ``teachers``, reference: FLAIR), drawn hatched. Uses records ``{"kind":
    "election", "step", "winners": {"ET": "t1ce", ...}}`` and ``{"kind": "step", "teachers"}``.
    """
    records = _as_records(records)
    fig, ax = _axes(ax, (8, 1.9))
    elections = [r for r in _of_kind(records, "election") if isinstance(r.get("winners"), Mapping)]
    ax.set_title("Teacher timeline: modality elected for each region", fontsize=11, loc="left", fontweight="bold")
    last = _last_step(records) or 0.0
    first = float(elections[0]["step"]) if elections else float(last)
    initial = _initial_teachers(records, first)
    if not elections and not initial:
        _note(ax, "no elections yet")
        return fig
    starts = [float(e["step"]) for e in elections]
    last = max(last, *starts) if starts else last
    origin = 0.0 if initial else starts[0]
    span = max(last - origin, 1.0)
    ends = starts[1:] + ([last if last > starts[-1] else starts[-1] + 0.04 * span] if starts else [])
    total = max((ends[-1] if ends else last) - origin, 1.0)

    def label(x0, x1, row, key, text):
        if (x1 - x0) / total > 0.07:  # label only segments wide enough to hold the text
            ax.text((x0 + x1) / 2, row, text, ha="center", va="center", fontsize=8,
                    color=_text_color_on(mcolors.to_rgba(MODALITY_COLORS[key])), fontweight="bold")

    for row, name in enumerate(REGIONS):
        if initial and first > 0:  # stacked when the initial set has several modalities
            h = 0.76 / len(initial)
            for j, key in enumerate(initial):
                ax.broken_barh([(0.0, first)], (row - 0.38 + j * h, h), facecolors=MODALITY_COLORS[key],
                               edgecolor="white", hatch="///", lw=0.8, alpha=0.6)
            if len(initial) == 1:
                label(0.0, first, row, initial[0], f"{DISPLAY_NAMES[initial[0]]} (initial)")
        for e, s0, s1 in zip(elections, starts, ends):
            mod = e["winners"].get(name)
            if mod is None:
                continue
            key = modality_key(mod)
            ax.broken_barh([(s0, s1 - s0)], (row - 0.38, 0.76), facecolors=MODALITY_COLORS[key],
                           edgecolor="white", lw=0.8)
            label(s0, s1, row, key, DISPLAY_NAMES[key])
    for s in starts:
        ax.plot([s], [-0.6], marker="v", color="#444444", ms=4, clip_on=False)
    ax.set_yticks(range(len(REGIONS)), REGIONS)
    _color_region_ticks(ax.get_yticklabels())
    ax.set_ylim(len(REGIONS) - 0.5, -0.7)
    ax.set_xlabel("step  (▼ = election)" if starts else "step  (no election yet)")
    mark_stages(ax, records, label=False)
    handles = [Patch(color=MODALITY_COLORS[m], label=DISPLAY_NAMES[m]) for m in MODALITIES]
    if initial and first > 0:
        handles.append(Patch(facecolor="white", edgecolor="#666666", hatch="///", label="initial teacher"))
    ax.legend(handles=handles, title="teacher", title_fontsize=9, **_OUTSIDE_LEGEND)
    return fig


def plot_history(records, smooth: float = 0.9, logy: bool = False, title: str | None = None,
                 kd_weight: float | None = None) -> Figure:
    """Training at a glance: loss terms, learning rate, validation Dice and the teacher timeline.

    Panels share the step axis; stage 2 is shaded in all of them. Works on partial histories
    (live plots): missing kinds show a note instead of failing. ``kd_weight``: see :func:`plot_loss`.
    """
    records = _as_records(records)
    fig = _new_figure((10, 9.5))
    axes = fig.subplots(4, 1, sharex=True, gridspec_kw=dict(height_ratios=[3, 1, 2.4, 1.4]))
    plot_loss(records, ax=axes[0], smooth=smooth, logy=logy, kd_weight=kd_weight)
    plot_lr(records, ax=axes[1])
    plot_val_dice(records, ax=axes[2])
    plot_teacher_timeline(records, ax=axes[3])
    for ax in axes[:-1]:
        ax.set_xlabel("")
    if not any(r.get("kind") in ("election", "step") for r in records):
        axes[-1].set_xlabel("step")
    fig.suptitle(title or "LCKD training history", fontsize=13, fontweight="bold")
    return fig


def compare_histories(records_a, records_b, labels: Sequence[str] = ("LCKD", "no-KD"),
                      smooth: float = 0.9) -> Figure:
    """Two runs side by side: smoothed training loss and validation Dice (solid = a, dashed = b).

    The loss panel compares the segmentation part (``dice_loss + bce``) when present, since only
    run a has a KD term; otherwise the total loss.
    """
    runs = [_as_records(records_a), _as_records(records_b)]
    styles = ["-", "--"]
    fig = _new_figure((11, 4))
    ax_l, ax_v = fig.subplots(1, 2)
    seg_keys = ("dice_loss", "bce")
    use_seg = all(any(all(isinstance(r.get(k), (int, float)) for k in seg_keys) for r in _of_kind(recs, "step"))
                  for recs in runs)
    ax_l.set_title("Segmentation loss (Dice + BCE)" if use_seg else "Training loss", fontsize=11,
                   loc="left", fontweight="bold")
    ax_v.set_title("Validation Dice (all four modalities)", fontsize=11, loc="left", fontweight="bold")
    any_loss = any_val = False
    for recs, ls, lab in zip(runs, styles, labels):
        steps = _of_kind(recs, "step")
        if steps:
            x = np.array([r["step"] for r in steps], dtype=float)
            if use_seg:
                y = np.array([sum(float(r.get(k, np.nan)) for k in seg_keys) for r in steps])
            else:
                y = np.array([float(r.get("loss", np.nan)) for r in steps])
            ax_l.plot(x, _ema(y, smooth) if len(y) > 2 else y, color="#222222", ls=ls, lw=1.8, label=lab)
            any_loss = True
        vals = [r for r in _of_kind(recs, "val") if isinstance(r.get("dice"), Mapping)]
        if vals:
            x = [r["step"] for r in vals]
            for name in REGIONS:
                ax_v.plot(x, [r["dice"].get(name, np.nan) for r in vals], color=REGION_COLORS[name], ls=ls,
                          lw=1.8, marker="o", ms=3)
            any_val = True
    if any_loss:
        ax_l.set_xlabel("step")
        ax_l.set_ylabel("loss (smoothed)")
        ax_l.grid(alpha=0.3)
        ax_l.legend(fontsize=9)
    else:
        _note(ax_l, "no training steps yet")
    if any_val:
        ax_v.set_ylim(0, 1.02)
        ax_v.set_xlabel("step")
        ax_v.set_ylabel("Dice")
        ax_v.grid(alpha=0.3)
        handles = [Line2D([], [], color=REGION_COLORS[r], lw=2, label=r) for r in REGIONS]
        handles += [Line2D([], [], color="#222222", ls=ls, lw=1.8, label=lab) for ls, lab in zip(styles, labels)]
        ax_v.legend(handles=handles, loc="lower right", fontsize=9, ncol=2)
    else:
        _note(ax_v, "no validation yet")
    fig.suptitle(f"{labels[0]} vs {labels[1]}", fontsize=13, fontweight="bold")
    return fig


# ----------------------------------------------------------------------------------------------
# what distillation does to the features
# ----------------------------------------------------------------------------------------------


def plot_features(runs: Mapping[str, Any], teachers: Sequence[str] = ("flair", "t1ce")) -> Figure:
    """The mechanism over training, from the ``"features"`` records of one or more runs.

    Left: the mean L1 distance of the other modalities' bottleneck features to each teacher's --
    what the KD loss makes small. Right: the error of the mean fill in a teacher's slot when that
    teacher is missing (mean over the 7 subsets without it) -- what the decoder then has to cope with.

    Args:
        runs: label -> history records (e.g. ``{"LCKD": lckd.history, "no-KD": base.history}``).
        teachers: the modalities to follow (the usual winners: FLAIR for WT, T1ce for ET and TC).
    """
    fig = _new_figure((11, 3.8))
    ax_d, ax_f = fig.subplots(1, 2)
    styles = ["-", "--", ":", "-."]
    drawn = False
    for (label, records), ls in zip(runs.items(), styles):
        recs = _of_kind(_as_records(records), "features")
        if not recs:
            continue
        x = [r["step"] for r in recs]
        for t in teachers:
            k = MODALITIES.index(t)
            others = [m for m in range(len(MODALITIES)) if m != k]
            d = [np.mean([r["l1"][m][k] for m in others]) for r in recs]
            ax_d.plot(x, d, ls=ls, color=MODALITY_COLORS[t], lw=2, marker="o", ms=3, label=f"to {DISPLAY_NAMES[t]}, {label}")
            ax_f.plot(x, [r["fill_error"][k] for r in recs], ls=ls, color=MODALITY_COLORS[t], lw=2, marker="o", ms=3,
                      label=f"{DISPLAY_NAMES[t]} missing, {label}")
        drawn = True
    ax_d.set_title("Distance of the other modalities' features to a teacher's", fontsize=10, loc="left",
                   fontweight="bold")
    ax_f.set_title("Error of the mean fill in a missing teacher's slot", fontsize=10, loc="left", fontweight="bold")
    for ax in (ax_d, ax_f):
        if drawn:
            ax.set_xlabel("step")
            ax.set_ylabel("mean |difference| (L1)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        else:
            _note(ax, "no feature records (older runs, or models without per-modality features)")
    return fig


def feature_pca(features: Mapping[str, np.ndarray], title: str | None = None) -> Figure:
    """A 2-D PCA of per-modality bottleneck features, one panel per model, one colour per modality.

    ``features``: label -> ``(n, 4, C)`` (each case's bottleneck, averaged over space). The axes are
    the two main directions of all the models' features together, so the panels are comparable:
    points of one case's four modalities close together mean the encoder maps them alike.
    """
    data = {k: np.asarray(v, np.float64) for k, v in features.items()}
    allf = np.concatenate([v.reshape(-1, v.shape[-1]) for v in data.values()])
    mean = allf.mean(0)
    _, _, vt = np.linalg.svd(allf - mean, full_matrices=False)
    fig = _new_figure((4.6 * len(data), 4.2))
    axes = np.atleast_1d(fig.subplots(1, len(data)))
    for ax, (label, v) in zip(axes, data.items()):
        xy = (v - mean) @ vt[:2].T  # (n, 4, 2)
        for case in xy:  # a light line joins the four modalities of one case
            ax.plot(*np.vstack([case, case[:1]]).T, color="0.85", lw=0.8, zorder=1)
        for m, name in enumerate(MODALITIES):
            ax.scatter(xy[:, m, 0], xy[:, m, 1], color=MODALITY_COLORS[name], s=30, label=DISPLAY_NAMES[name], zorder=2)
        ax.set_title(label, fontsize=11, fontweight="bold")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=9, loc="best")
    fig.suptitle(title or "Bottleneck features of each modality (PCA over both models)", fontsize=12)
    return fig


# ----------------------------------------------------------------------------------------------
# pictures of the method
# ----------------------------------------------------------------------------------------------


def _box(ax, x, y, w, h, text, face="#FFFFFF", edge="#444444", fontsize=9, **kw):
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", facecolor=face,
                                edgecolor=edge, lw=1.3, **kw))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize,
            color=_text_color_on(mcolors.to_rgba(face)))


def _arrow(ax, xy0, xy1, color="#444444", ls="-", lw=1.4, style="-|>", rad=0.0):
    from matplotlib.patches import FancyArrowPatch

    ax.add_patch(FancyArrowPatch(xy0, xy1, arrowstyle=style, mutation_scale=11, color=color, lw=lw, ls=ls,
                                 connectionstyle=f"arc3,rad={rad}"))


def architecture_figure(available: Sequence[bool] = (True, True, False, True),
                        teachers: Sequence[bool] = (True, False, True, False)) -> Figure:
    """LCKD's data flow for one availability pattern, drawn from the model's logic.

    Each available modality goes through the ONE shared encoder (same colour: same weights); a
    missing one contributes the encoder's response to an all-zero input as its skip connections and
    the mean of the available bottleneck features as its bottleneck; the four bottlenecks are
    concatenated and decoded into ET/TC/WT. During training the KD loss pulls every available
    modality's bottleneck toward the elected teachers' (orange arrows); the election chooses them.
    """
    avail, teach = list(available), list(teachers)
    _register_ipython_png()
    fig = Figure(figsize=(12, 6.2))  # a free-form drawing: no layout engine
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 6.6)
    ax.set_axis_off()
    ys = [5.3, 3.9, 2.5, 1.1]
    enc_face, miss = "#DCE9F5", "#F2F2F2"
    for m, (name, y) in enumerate(zip(MODALITIES, ys)):
        on = avail[m]
        _box(ax, 0.2, y, 1.2, 0.8, DISPLAY_NAMES[name] + ("" if on else "\nmissing"),
             face=MODALITY_COLORS[name] if on else miss, fontsize=10)
        if not on:
            ax.plot([0.25, 1.35], [y + 0.05, y + 0.75], color="#C0392B", lw=2)
        _box(ax, 2.0, y, 1.9, 0.8, "shared encoder" if on else "shared encoder\non an all-zero input",
             face=enc_face if on else miss, fontsize=8.5)
        _arrow(ax, (1.4, y + 0.4), (2.0, y + 0.4))
        feat = f"$f_{{{DISPLAY_NAMES[name]}}}$" if on else "mean of the\navailable $f$"
        _box(ax, 4.6, y + 0.1, 1.3, 0.6, feat, face="#FFFFFF" if on else "#FFF3CD", fontsize=9)
        _arrow(ax, (3.9, y + 0.4), (4.6, y + 0.4))
        if teach[m] and on:
            ax.text(5.95, y + 0.62, "teacher", fontsize=8, color="#E69F00", fontweight="bold")
        # skip connections run from the encoder to the decoder, under the bottleneck column
        ax.plot([3.9, 4.2, 4.2], [y + 0.15, y + 0.15, 0.45], color="#888888", lw=0.9, ls=":")
    for m, y in enumerate(ys):  # missing bottleneck slots are filled from the available ones
        if not avail[m]:
            for k, y2 in enumerate(ys):
                if avail[k]:
                    _arrow(ax, (5.25, y2 + 0.1 if y2 > y else y2 + 0.7), (5.25, y + 0.7 if y2 > y else y + 0.1),
                           color="#B8860B", ls="--", lw=0.9, rad=0.25)
    for s_ in range(4):  # KD: every available modality toward each available teacher
        for t in range(4):
            if teach[t] and avail[t] and avail[s_] and s_ != t:
                _arrow(ax, (5.9, ys[s_] + 0.4), (5.9, ys[t] + 0.4), color="#E69F00", lw=1.6, rad=-0.45)
    _box(ax, 7.0, 2.3, 1.5, 2.0, "concatenate\n4 × C\nchannels", face="#FFFFFF")
    for y in ys:
        _arrow(ax, (5.9, y + 0.4), (7.0, 3.3), color="#444444", lw=0.9)
    _box(ax, 9.0, 2.3, 1.3, 2.0, "decoder\n(+ skips)", face=enc_face)
    _arrow(ax, (8.5, 3.3), (9.0, 3.3))
    _arrow(ax, (4.2, 0.45), (9.65, 2.3), color="#888888", lw=0.9, ls=":", rad=0.15)
    for k, (r, y) in enumerate(zip(REGIONS, (3.9, 3.1, 2.3))):
        _box(ax, 10.8, y, 0.9, 0.6, r, face=REGION_COLORS[r], fontsize=10)
        _arrow(ax, (10.3, 3.3), (10.8, y + 0.3))
    ax.text(0.2, 6.35, "LCKD for one set of available modalities", fontsize=13, fontweight="bold")
    ax.text(7.0, 5.55, "training only:\nloss = Dice + BCE + 0.1 × Σ L1($f_s$, $f_{teacher}$)\n"
            "teachers = per-region winners of\nthe single-modality election", fontsize=9, color="#8A5A00",
            va="center")
    ax.text(4.4, 0.15, "dotted: skip connections (a missing modality's are the zero-input response)", fontsize=8,
            color="#666666")
    return fig


def concept_map() -> Figure:
    """One picture of the kit's story: four scans, each showing some regions best; any may be
    missing at test time (15 subsets); LCKD elects the best one per region as teacher and distils
    its features into the others, so a missing teacher hurts less."""
    _register_ipython_png()
    fig = Figure(figsize=(12, 4.6))  # a free-form drawing: no layout engine
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 5.0)
    ax.set_axis_off()
    shows = {"flair": "whole tumour\n(oedema bright,\nCSF dark)", "t1": "anatomy\n(tumour faint)",
             "t1ce": "enhancing rim\n(ET), the core", "t2": "fluid: oedema\nand CSF"}
    for m, name in enumerate(MODALITIES):
        y = 3.6 - 1.05 * m
        _box(ax, 0.2, y, 1.2, 0.8, DISPLAY_NAMES[name], face=MODALITY_COLORS[name], fontsize=10)
        ax.text(1.55, y + 0.4, shows[name], va="center", fontsize=8.5)
    ax.text(0.2, 4.55, "1. Four MRI scans, each shows\n    some regions best (notebook 01)", fontsize=10,
            fontweight="bold", va="center")
    _box(ax, 4.1, 1.7, 2.6, 1.5, "at test time any of the\n15 non-empty subsets\nmay be all you have",
         face="#F2F2F2", fontsize=9.5)
    ax.text(4.1, 4.55, "2. Modalities go missing", fontsize=10, fontweight="bold", va="center")
    _arrow(ax, (3.3, 2.45), (4.1, 2.45))
    _box(ax, 7.5, 2.6, 2.2, 1.0, "election: the best single\nmodality per region\n(T1ce: ET, TC; FLAIR: WT)",
         face="#FFF3CD", fontsize=8.5)
    _box(ax, 7.5, 1.1, 2.2, 1.0, "distillation: pull every\nmodality's features\ntoward the teachers'",
         face="#FDE3C3", fontsize=8.5)
    _arrow(ax, (8.6, 2.6), (8.6, 2.1), color="#E69F00")
    ax.text(7.5, 4.55, "3. LCKD (notebooks 02, 03)", fontsize=10, fontweight="bold", va="center")
    _arrow(ax, (6.7, 2.45), (7.5, 2.45))
    _box(ax, 10.2, 1.7, 1.6, 1.5, "a missing\nteacher hurts\nless?\n(03, 04, 05)", face="#E8F4EA", fontsize=9)
    _arrow(ax, (9.7, 2.45), (10.2, 2.45))
    ax.text(10.2, 4.55, "4. Measure it", fontsize=10, fontweight="bold", va="center")
    return fig


# ----------------------------------------------------------------------------------------------
# 3-D view
# ----------------------------------------------------------------------------------------------

# corners of a unit cube and its 12 edges (pairs of corners differing in one coordinate)
_CUBE = np.array([(i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float32)
_EDGES = [(a, b) for a in range(8) for b in range(a + 1, 8) if np.abs(_CUBE[a] - _CUBE[b]).sum() == 1]


def surface_nets(field: np.ndarray, level: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Triangle mesh of the ``level`` isosurface of a 3-D field (naive surface nets).

    One vertex per grid cell the surface crosses (the mean of its edge crossings), one quad per
    grid edge the surface crosses -- smoother than voxel faces, far simpler than marching cubes,
    and watertight when the field is ``< level`` on its border (pad it with zeros).

    Args:
        field: ``(A, B, C)`` float.

    Returns:
        ``verts (V, 3)`` float32 in voxel-index coordinates, ``faces (F, 3)`` int32 (outward winding
        for "inside = above level").
    """
    f = np.asarray(field, dtype=np.float32)
    inside = f > level
    cnt = sum(inside[dx:inside.shape[0] - 1 + dx, dy:inside.shape[1] - 1 + dy, dz:inside.shape[2] - 1 + dz]
              .astype(np.int8) for dx, dy, dz in _CUBE.astype(int))
    cells = np.argwhere((cnt > 0) & (cnt < 8))
    if len(cells) == 0:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32)
    corners = np.stack([f[cells[:, 0] + dx, cells[:, 1] + dy, cells[:, 2] + dz]
                        for dx, dy, dz in _CUBE.astype(int)], axis=1)  # (K, 8)
    acc = np.zeros((len(cells), 3), np.float32)
    n = np.zeros(len(cells), np.float32)
    for a, b in _EDGES:
        va, vb = corners[:, a], corners[:, b]
        cross = (va > level) != (vb > level)
        t = np.where(cross, (level - va) / np.where(cross, vb - va, 1.0), 0.0)
        acc += cross[:, None] * (_CUBE[a] + t[:, None] * (_CUBE[b] - _CUBE[a]))
        n += cross
    verts = cells + acc / np.maximum(n, 1)[:, None]
    vid = np.full(cnt.shape, -1, dtype=np.int64)
    vid[tuple(cells.T)] = np.arange(len(cells))
    faces = []
    for axis in range(3):
        u, w = (axis + 1) % 3, (axis + 2) % 3
        sl0 = [slice(None)] * 3
        sl1 = [slice(None)] * 3
        sl0[axis], sl1[axis] = slice(0, -1), slice(1, None)
        flip = inside[tuple(sl0)] != inside[tuple(sl1)]
        p = np.argwhere(flip)
        # the 4 cells around an edge need u and w indices >= 1 (cells sit at p - e_u, p - e_w, ...)
        p = p[(p[:, u] >= 1) & (p[:, w] >= 1) & (p[:, u] <= f.shape[u] - 2) & (p[:, w] <= f.shape[w] - 2)]
        if len(p) == 0:
            continue
        eu, ew = np.eye(3, dtype=int)[u], np.eye(3, dtype=int)[w]
        quad = [p - eu - ew, p - ew, p, p - eu]  # counter-clockwise seen from +axis
        q = np.stack([vid[tuple(c.T)] for c in quad], axis=1)
        out = inside[tuple(p.T)]  # inside below the edge -> surface faces +axis: keep winding
        q[~out] = q[~out][:, ::-1]
        faces.append(np.concatenate([q[:, [0, 1, 2]], q[:, [0, 2, 3]]]))
    faces = np.concatenate(faces) if faces else np.zeros((0, 3), np.int64)
    return verts.astype(np.float32), faces.astype(np.int32)


def _smooth_mesh(verts: np.ndarray, faces: np.ndarray, iterations: int = 2) -> np.ndarray:
    """Laplacian smoothing (move each vertex halfway to its neighbours' mean) to soften voxel steps."""
    v = verts.astype(np.float32)
    if len(faces) == 0:
        return v
    a = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])
    b = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    src, dst = np.concatenate([a, b]), np.concatenate([b, a])
    deg = np.bincount(dst, minlength=len(v)).astype(np.float32)
    for _ in range(iterations):
        acc = np.zeros_like(v)
        np.add.at(acc, dst, v[src])
        v = np.where(deg[:, None] > 0, 0.5 * v + 0.5 * acc / np.maximum(deg, 1)[:, None], v)
    return v


def _downsample(mask: np.ndarray, step: int) -> np.ndarray:
    """Block mean over ``step³`` blocks (partial volume in ``[0, 1]``: a smoother field than striding)."""
    m = np.asarray(mask, dtype=np.float32)
    if step <= 1:
        return m
    pad = [(0, (-s) % step) for s in m.shape]
    m = np.pad(m, pad)
    a, b, c = (s // step for s in m.shape)
    return m.reshape(a, step, b, step, c, step).mean(axis=(1, 3, 5))


def mask_mesh(mask: np.ndarray, step: int = 2, spacing: Sequence[float] = (1.0, 1.0, 1.0),
              smooth_iterations: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Surface mesh of a binary ``(X, Y, Z)`` mask in millimetres (RAS voxel axes × ``spacing``).

    The mask is cropped to its bounding box (cost scales with the object, not the volume),
    block-averaged by ``step`` and meshed at 0.5 with :func:`surface_nets`.
    """
    m = np.asarray(mask) > 0
    if not m.any():
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32)
    nz = np.argwhere(m)
    lo = np.maximum(nz.min(0) - step, 0)
    hi = np.minimum(nz.max(0) + step + 1, m.shape)
    sub = _downsample(m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], step)
    verts, faces = surface_nets(np.pad(sub, 1), 0.5)
    verts = _smooth_mesh(verts, faces, smooth_iterations)
    # padded block coordinate -> voxel coordinate (block centre) -> mm
    vox = lo + (verts - 1.0) * step + (step - 1) / 2.0
    return (vox * np.asarray(spacing, dtype=np.float32)).astype(np.float32), faces


def _boundary_points(mask: np.ndarray) -> np.ndarray:
    """``(N, 3)`` voxel indices of a mask's boundary (voxels with a 6-neighbour outside)."""
    m = np.pad(np.asarray(mask) > 0, 1)
    c = m[1:-1, 1:-1, 1:-1]
    core = (c & m[:-2, 1:-1, 1:-1] & m[2:, 1:-1, 1:-1] & m[1:-1, :-2, 1:-1] & m[1:-1, 2:, 1:-1]
            & m[1:-1, 1:-1, :-2] & m[1:-1, 1:-1, 2:])
    return np.argwhere(c & ~core)


def _brain_mask(brain: np.ndarray) -> np.ndarray:
    """Head / brain extent of an image: its non-zero voxels (skull-stripped BraTS and normalised
    images have an exact-zero background; z-scored brain voxels can be negative, so no ``> 0``);
    if the background is not exactly zero, voxels above a low percentile of the intensities."""
    b = np.asarray(brain)
    if b.dtype == bool:
        return b
    zero = b == 0
    if zero.mean() > 0.05:
        return ~zero
    return b > np.percentile(b, 30)


_OPACITY = {"WT": 0.22, "TC": 0.45, "ET": 0.9}


def region_3d(truth: np.ndarray | None = None, pred: np.ndarray | None = None,
              spacing: Sequence[float] = (2.0, 2.0, 2.0), max_points: int = 15000, step: int = 2,
              brain: np.ndarray | None = None, truth_style: str | None = None, title: str | None = None,
              height: int = 600):
    """Interactive 3-D view of ground-truth and predicted regions (plotly ``go.Figure``).

    Predictions are smooth translucent surfaces (``go.Mesh3d``, nested WT ⊃ TC ⊃ ET get more
    opaque inwards); the ground truth is drawn as dots on its boundary (``go.Scatter3d``,
    subsampled to ``max_points``) when a prediction is shown too -- so the two never hide each
    other -- and as surfaces otherwise. Every trace has its own legend entry (click to hide) and
    buttons switch between truth, prediction and both. The figure stays small (a 96³ case is
    a few hundred kB of JSON) because only surfaces / points are sent, never the volume.

    Args:
        truth, pred: ``(3, X, Y, Z)`` region masks (REGIONS order), either may be None.
        spacing: voxel size in mm (axes are RAS millimetres from the volume corner).
        max_points: total number of ground-truth dots (``truth_style="points"``).
        step: block size of the downsampling before meshing (1 = full resolution).
        brain: optional ``(X, Y, Z)`` image (e.g. FLAIR); its non-zero extent is drawn as a faint
            grey shell for context.
        truth_style: ``"points"`` or ``"surface"``; None = points if ``pred`` is given.
    """
    import plotly.graph_objects as go

    if truth is None and pred is None:
        raise ValueError("region_3d needs truth, pred or both")
    truth_style = truth_style or ("points" if pred is not None else "surface")
    spacing = np.asarray(spacing, dtype=np.float32)
    traces, groups = [], []
    lighting = dict(ambient=0.55, diffuse=0.7, specular=0.15, roughness=0.6, fresnel=0.1)

    if brain is not None:
        v, f = mask_mesh(_brain_mask(brain), step=max(2 * step, 2), spacing=spacing, smooth_iterations=3)
        if len(f):
            traces.append(go.Mesh3d(x=v[:, 0], y=v[:, 1], z=v[:, 2], i=f[:, 0], j=f[:, 1], k=f[:, 2],
                                    color="#9A9A9A", opacity=0.08, name="brain", hoverinfo="skip",
                                    showlegend=True, lighting=lighting))
            groups.append("brain")

    def surfaces(masks, group, group_title):
        for name in ("WT", "TC", "ET"):
            v, f = mask_mesh(masks[REGIONS.index(name)], step=step, spacing=spacing)
            if len(f) == 0:
                continue
            traces.append(go.Mesh3d(
                x=v[:, 0], y=v[:, 1], z=v[:, 2], i=f[:, 0], j=f[:, 1], k=f[:, 2], color=REGION_COLORS[name],
                opacity=_OPACITY[name], name=f"{name} {group}", legendgroup=group, legendgrouptitle_text=group_title,
                showlegend=True, flatshading=False, lighting=lighting, hoverinfo="name"))
            groups.append(group)

    def points(masks, group, group_title):
        pts = {name: _boundary_points(masks[REGIONS.index(name)]) for name in REGIONS}
        total = sum(len(p) for p in pts.values())
        rng = np.random.default_rng(0)  # fixed: the same case always gives the same picture
        for name in ("WT", "TC", "ET"):
            p = pts[name]
            if len(p) == 0:
                continue
            keep = max(1, int(round(max_points * len(p) / max(total, 1))))
            if len(p) > keep:
                p = p[rng.choice(len(p), keep, replace=False)]
            p = p.astype(np.float32) * spacing
            traces.append(go.Scatter3d(
                x=p[:, 0], y=p[:, 1], z=p[:, 2], mode="markers", name=f"{name} {group}", legendgroup=group,
                legendgrouptitle_text=group_title, marker=dict(size=2, color=REGION_COLORS[name], opacity=0.7),
                hoverinfo="name"))
            groups.append(group)

    if truth is not None:
        t = np.asarray(truth) > 0
        if truth_style == "points":
            points(t, "truth", "Ground truth (dots)")
        else:
            surfaces(t, "truth", "Ground truth")
    if pred is not None:
        surfaces(np.asarray(pred) > 0, "prediction", "Prediction (surface)")

    fig = go.Figure(traces)
    axis = dict(showbackground=False, showgrid=True, gridcolor="#E5E5E5", zeroline=False, ticksuffix=" mm")
    fig.update_layout(
        title=title or "Tumour regions in 3-D", height=height, margin=dict(l=0, r=0, t=50, b=0),
        legend=dict(groupclick="toggleitem", itemsizing="constant"),
        scene=dict(aspectmode="data", xaxis=dict(title="x → R", **axis), yaxis=dict(title="y → A", **axis),
                   zaxis=dict(title="z → S", **axis),
                   camera=dict(eye=dict(x=-1.5, y=1.3, z=0.8))))
    present = set(groups)
    if {"truth", "prediction"} <= present:
        def vis(show):
            return [g == "brain" or g in show for g in groups]
        fig.update_layout(updatemenus=[dict(
            type="buttons", direction="right", x=0.0, y=1.0, xanchor="left", yanchor="top", showactive=True,
            buttons=[dict(label="both", method="restyle", args=[{"visible": vis({"truth", "prediction"})}]),
                     dict(label="truth", method="restyle", args=[{"visible": vis({"truth"})}]),
                     dict(label="prediction", method="restyle", args=[{"visible": vis({"prediction"})}])])])
    return fig


# ----------------------------------------------------------------------------------------------
# Comparing methods (lckd_kit.compare)
# ----------------------------------------------------------------------------------------------

def _method_colors(names: Sequence[str], colors: Mapping[str, str] | None) -> dict[str, str]:
    cycle = matplotlib.colormaps["tab10"].colors
    return {n: (colors or {}).get(n, mcolors.to_hex(cycle[i % len(cycle)])) for i, n in enumerate(names)}


def method_summary_bars(summary: Mapping[str, Mapping[str, Sequence[float]]],
                        groups: Mapping[str, str] | None = None, colors: Mapping[str, str] | None = None,
                        title: str = "Mean Dice of each method, with 95 % intervals", ylabel: str = "Dice",
                        ylim: tuple[float, float] | None = (0.0, 1.0)) -> Figure:
    """Grouped bar chart of a few summary numbers per method, each with its interval.

    Args:
        summary: method name -> {group key -> ``(mean, low, high)``} (e.g. the mean Dice over the 15
            subsets and its bootstrap interval, ``compare.CompareResults.summary_table()``).
        groups: group key -> x-axis label, in display order (default: the first method's keys).
        colors: method name -> colour (default: matplotlib's tab10, in the order of ``summary``).
        ylim: y range (None: automatic).

    Returns:
        Figure: one cluster of bars per group, one bar per method (value printed on top), the
        interval as a black error bar.
    """
    names = list(summary)
    keys = list(groups or (summary[names[0]] if names else {}))
    labels = [(groups or {}).get(k, k) for k in keys]
    col = _method_colors(names, colors)
    fig = _new_figure((max(6.0, 1.0 + 0.55 * len(names) * len(keys)), 4.2))
    ax = fig.add_subplot()
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        vals = np.array([summary[name].get(k, (np.nan, np.nan, np.nan)) for k in keys], dtype=float).reshape(-1, 3)
        x = np.arange(len(keys)) - 0.4 + width * (i + 0.5)
        err = np.abs(np.stack([vals[:, 0] - vals[:, 1], vals[:, 2] - vals[:, 0]]))
        ax.bar(x, vals[:, 0], width * 0.92, color=col[name], label=name, yerr=np.nan_to_num(err), capsize=2,
               error_kw=dict(lw=1, ecolor="#222222"))
        for xi, (v, _, hi) in zip(x, vals):
            if np.isfinite(v):  # the value just above its interval
                ax.text(xi, (hi if np.isfinite(hi) else v) + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7,
                        rotation=90, color="#333333")
    ax.set_xticks(range(len(keys)), labels, fontsize=10)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=9, ncol=min(len(names), 5), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.set_title(title, fontsize=12, loc="left", fontweight="bold")
    for sp in ("top", "right"):
        ax.spines[sp].set_visible(False)
    return fig


def paired_difference_plot(diffs: Mapping[str, Mapping[str, Sequence[float]]],
                           groups: Mapping[str, str] | None = None, reference: str = "LCKD",
                           colors: Mapping[str, str] | None = None, title: str | None = None) -> Figure:
    """Forest plot of paired differences against a reference method, with their intervals.

    Args:
        diffs: method name -> {group key -> ``(difference, low, high)``}, the difference being
            method − reference, paired by seed and case (``stats.compare``).
        groups: group key -> panel title, in display order (default: the first method's keys).
        reference: the reference method's name (axis label and title).
        colors: method name -> colour.

    Returns:
        Figure with one panel per group: a row per method, a dot at the difference, a line across
        its interval, and a vertical line at 0 (an interval crossing it is not evidence of a difference).
    """
    names = list(diffs)
    keys = list(groups or (diffs[names[0]] if names else {}))
    col = _method_colors(names, colors)
    fig = _new_figure((3.0 * max(len(keys), 1) + 1.4, 0.45 * len(names) + 1.6))
    axes = np.atleast_1d(fig.subplots(1, max(len(keys), 1), sharey=True))
    for ax, key in zip(axes, keys):
        for row, name in enumerate(names):
            d, lo, hi = (float(v) for v in diffs[name].get(key, (np.nan,) * 3))
            excl = np.isfinite(lo) and (lo > 0 or hi < 0)
            ax.plot([lo, hi], [row, row], color=col[name], lw=2.2, solid_capstyle="round")
            ax.plot([d], [row], "o", color=col[name], ms=7, mfc=col[name] if excl else "white", mew=2)
        ax.axvline(0, color="#555555", lw=1, ls="--")
        ax.set_title((groups or {}).get(key, key), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel(f"Δ Dice vs {reference}")
        for sp in ("top", "right"):
            ax.spines[sp].set_visible(False)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].set_ylim(len(names) - 0.5, -0.5)
    fig.suptitle(title or f"Paired difference to {reference} (dot filled: the 95 % interval excludes 0)", fontsize=11)
    return fig


def fusion_diagrams(available: Sequence[bool] = (True, True, False, True)) -> Figure:
    """Four ways to survive a missing modality, one small data-flow panel each.

    Drawn for one availability pattern (default: T1ce missing). Each panel shows where the four
    modalities meet and what stands in for the missing one: modality dropout zeroes its input
    channel; LCKD fills its bottleneck slot with the mean of the others; HeMIS leaves it out of the
    mean and variance; region fusion gives it weight 0 and lets a softmax share its weight among the
    others, per region.
    """
    avail = [bool(a) for a in as_mask(available)]
    _register_ipython_png()
    fig = Figure(figsize=(13, 4.4))
    panels = [
        ("modality dropout", "one U-Net on\n4 channels", "channel set to 0", "#999999"),
        ("LCKD", "shared encoder", "mean of\nthe others", "#0072B2"),
        ("HeMIS", "own encoder", "left out", "#E69F00"),
        ("region fusion", "own encoder", "weight 0", "#009E73"),
    ]
    miss_face = "#F2F2F2"
    for k, (title, enc_text, miss_text, color) in enumerate(panels):
        ax = fig.add_axes((k / 4 + 0.005, 0.0, 0.24, 0.9))
        ax.set_xlim(0, 4.2)
        ax.set_ylim(0, 5.2)
        ax.set_axis_off()
        ax.text(0.05, 5.0, title, fontsize=12, fontweight="bold", color=color, va="center")
        ys = [3.9, 2.9, 1.9, 0.9]
        for m, (name, y) in enumerate(zip(MODALITIES, ys)):
            on = avail[m]
            _box(ax, 0.05, y, 0.75, 0.6, DISPLAY_NAMES[name], face=MODALITY_COLORS[name] if on else miss_face,
                 fontsize=8.5)
            if not on:
                ax.plot([0.1, 0.75], [y + 0.05, y + 0.55], color="#C0392B", lw=1.8)
        if k == 0:  # input-level fusion: the channels are stacked before any layer
            _box(ax, 1.15, 0.9, 1.1, 3.6, enc_text, face="#EFEFEF", fontsize=8)
            for m, y in enumerate(ys):
                _arrow(ax, (0.8, y + 0.3), (1.15, y + 0.3), color="#444444" if avail[m] else "#C0392B",
                       ls="-" if avail[m] else ":")
            miss = next((y for m, y in enumerate(ys) if not avail[m]), None)
            if miss is not None:
                ax.text(0.97, miss + 0.62, "0", color="#C0392B", fontsize=9, ha="center", fontweight="bold")
            _box(ax, 2.6, 2.2, 1.0, 1.0, "decoder", face="#EFEFEF", fontsize=8.5)
            _arrow(ax, (2.25, 2.7), (2.6, 2.7))
        else:
            for m, y in enumerate(ys):
                on = avail[m]
                _box(ax, 1.05, y, 1.05, 0.6, enc_text if on else miss_text, fontsize=7,
                     face="#DCE9F5" if (on and k == 1) else ("#FFF3CD" if not on else "#FCE9CF" if k == 2 else "#D5EFE5"))
                _arrow(ax, (0.8, y + 0.3), (1.05, y + 0.3), color="#444444" if on else "#C0392B",
                       ls="-" if on else ":")
            fuse = {1: "concat\n4 slots", 2: "mean,\nvariance", 3: "weights\nper region\n(sum to 1)"}[k]
            _box(ax, 2.45, 1.9, 0.85, 1.6, fuse, face="#FFFFFF", fontsize=7.5)
            for m, y in enumerate(ys):
                if avail[m] or k == 1:  # LCKD's missing slot still takes part, filled with the mean
                    _arrow(ax, (2.1, y + 0.3), (2.45, 2.7), color="#444444", lw=0.8)
            _box(ax, 3.45, 2.2, 0.7, 1.0, "dec.", face="#EFEFEF", fontsize=8)
            _arrow(ax, (3.3, 2.7), (3.45, 2.7))
        ax.text(0.05, 0.3, {0: "fuses at the input", 1: "fuses at the bottleneck (+ skips)",
                            2: "fuses at every scale", 3: "fuses at every scale, learned"}[k],
                fontsize=8.5, color="#555555")
    fig.suptitle("Where the modalities meet, and what stands in for a missing one (here: "
                 + ", ".join(DISPLAY_NAMES[m] for m, a in zip(MODALITIES, avail) if not a) + " missing)",
                 fontsize=11, x=0.01, ha="left")
    return fig


__all__ = [
    "DISPLAY_NAMES", "REGION_COLORS", "REGION_NAMES", "MODALITY_COLORS", "LOSS_COLORS", "MARK_ON", "MARK_OFF",
    "display_name", "pretty_subset", "availability_marks", "plane_axis", "take_slice", "best_slice",
    "intensity_window", "orientation_letters", "overlay_regions", "region_handles", "region_legend",
    "show_modalities", "dice_per_region", "dice_box", "compare_prediction", "score_table_figure", "subset_heatmap",
    "subset_heatmap_plotly", "markdown_subset_table", "mark_stages", "plot_loss", "plot_lr",
    "plot_val_dice", "plot_teacher_timeline", "plot_history", "compare_histories", "plot_features", "feature_pca",
    "architecture_figure", "concept_map", "surface_nets", "mask_mesh",
    "region_3d", "method_summary_bars", "paired_difference_plot", "fusion_diagrams",
]
