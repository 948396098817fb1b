"""Inference and evaluation.

The top of this file is the inference core shared by teacher election, training-time validation
and the 15-subset evaluation: :func:`predict_subsets` runs MONAI's sliding-window inferer with a
predictor that **encodes each window once** and decodes every requested modality subset from that
one encoding (the encoder is ~all of the cost, so 15 subsets cost little more than one), plus the
two Dice flavours used in the kit.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from lckd_kit import as_mask

#: default number of axial slices per window when a 2-D model runs on a volume
SLICES_PER_WINDOW_2D = 16


def _model_config(model):
    """The model's ModelConfig (also through DataParallel/DDP wrappers)."""
    return getattr(model, "config", None) or model.module.config


#: :func:`predict_subsets` decodes the subsets of a window with ``LCKDNet.decode_many``, several per
#: decoder call: up to DECODE_BATCH_ITEMS volumes or slices per call for models smaller than
#: DECODE_BATCH_MAX_PARAMS, DECODE_BATCH_ITEMS_LARGE for larger ones. Measured on 2 CPU cores
#: (benchmarks/run.py, decode what-if): "small", one 64^3 window, 15 subsets in one call ~4x faster
#: than one at a time; small2d, whose 2-D windows already hold 16 slices, fastest one subset per
#: call; "paper", 2 per call fastest at 96x96x48 (all 15 in one call 1.7x slower there, 1.1x faster
#: at 64x64x32), so 2 is the safe choice for large windows.
DECODE_BATCH_MAX_PARAMS = 5_000_000
DECODE_BATCH_ITEMS = 16
DECODE_BATCH_ITEMS_LARGE = 2


@torch.no_grad()
def predict_subsets(
    model: torch.nn.Module,
    image: torch.Tensor | np.ndarray,
    subsets: Sequence[Sequence[bool] | str],
    roi_size: Sequence[int] | None = None,
    overlap: float = 1 / 3,
    sw_batch_size: int = 1,
    device: torch.device | str | None = None,
    mode: str = "constant",
    average: str = "probs",
    amp: bool = False,
    crop_foreground: bool = False,
    decode_batch: int | None = None,
) -> torch.Tensor:
    """Sliding-window probabilities of one case for several modality subsets at once.

    Args:
        model: an ``LCKDNet`` (2-D or 3-D). It is used as is: call ``model.eval()`` first.
        image: ``(4, X, Y, Z)`` already normalised (see ``data.normalize_image``).
        subsets: availability masks (anything :func:`lckd_kit.as_mask` reads), e.g. ``SUBSETS``.
        roi_size: window in kit layout. 3-D: ``(rx, ry, rz)``, default ``model.config.roi_size``.
            2-D: ``(rx, ry, k)`` -- each window holds ``k`` axial slices that are folded into the
            batch, so one call serves 2-D and 3-D models; default ``(*model.config.roi_size, 16)``.
        overlap: window overlap fraction (reference: 1/3); 2-D models: in-plane only.
        sw_batch_size: windows per forward pass.
        device: where the model runs (default: the model's device). The result is on the CPU.
        mode: MONAI blend mode, ``"constant"`` (reference: plain average) or ``"gaussian"``.
        average: ``"probs"`` averages sigmoid probabilities over overlapping windows (reference
            ``eval.py``); ``"logits"`` averages raw logits and applies the sigmoid once at the end
            (reference ``train.py`` validation / election).
        amp: bfloat16 autocast (CUDA only; ignored elsewhere).
        crop_foreground: run only on the bounding box of the non-zero voxels (the skull-stripped
            brain) and return probability 0 outside it -- nnU-Net-style, 2-3x less work on
            BraTS-like data. The reference runs on the whole volume (``False``).
        decode_batch: subsets decoded per decoder call (``LCKDNet.decode_many``). None: as many as
            keep a call at :data:`DECODE_BATCH_ITEMS` volumes or slices for models under
            :data:`DECODE_BATCH_MAX_PARAMS` parameters (3-D "small": all 15; 2-D windows of 16
            slices: 1), at :data:`DECODE_BATCH_ITEMS_LARGE` for larger ones ("paper": 2).

    Returns:
        ``(n_subsets, 3, X, Y, Z)`` float32 probabilities, channels ET, TC, WT.

    Memory: the stitched output holds ``3 * n_subsets`` full volumes (15 subsets at 240x240x155 is
    1.6 GB in float32); call several times with fewer subsets if that is too much.
    """
    if average not in ("probs", "logits"):
        raise ValueError(f"average must be 'probs' or 'logits', got {average!r}")
    masks = [torch.tensor(as_mask(s)) for s in subsets]
    if not masks:
        raise ValueError("no subsets requested")
    cfg = _model_config(model)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    x = image.as_tensor() if hasattr(image, "as_tensor") else image
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x, dtype=torch.float32)
    if x.ndim != 4 or x.shape[0] != 4:
        raise ValueError(f"image must be (4, X, Y, Z), got {tuple(x.shape)}")
    two_d = cfg.spatial_dims == 2
    if roi_size is None:
        roi_size = (*cfg.roi_size, SLICES_PER_WINDOW_2D) if two_d else tuple(cfg.roi_size)
    roi_size = tuple(int(r) for r in roi_size)
    if len(roi_size) != 3:
        raise ValueError(f"roi_size must have 3 entries (rx, ry, rz or slices), got {roi_size}")
    n = len(masks)
    use_amp = amp and device.type == "cuda"
    small_model = sum(p.numel() for p in model.parameters()) < DECODE_BATCH_MAX_PARAMS

    def predictor(window: torch.Tensor) -> torch.Tensor:
        # window (b, 4, rx, ry, rz) -> (b, 3 * n, rx, ry, rz): all subsets stacked along channels so
        # MONAI stitches them in one buffer.
        if hasattr(window, "as_tensor"):  # MONAI may hand MetaTensors; the model wants plain ones
            window = window.as_tensor()
        b, _, rx, ry, rz = window.shape
        if two_d:  # slices become batch items: (b, 4, rx, ry, k) -> (b * k, 4, rx, ry)
            window = window.permute(0, 4, 1, 2, 3).reshape(b * rz, 4, rx, ry)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            enc = model.encode(window)  # the expensive part, once per window
            items = DECODE_BATCH_ITEMS if small_model else DECODE_BATCH_ITEMS_LARGE
            k = decode_batch or max(1, items // window.shape[0])
            if hasattr(model, "decode_many"):
                out = model.decode_many(enc, masks, chunk=k).float()  # (n, b', 3, ...)
            else:  # any model with encode / decode
                out = torch.stack([model.decode(enc, m.to(window.device)).float() for m in masks])
        out = out.transpose(0, 1).flatten(1, 2)  # (b', 3n, ...), subset-major channels
        if average == "probs":
            out = torch.sigmoid(out)
        if two_d:  # (b * k, 3n, rx, ry) -> (b, 3n, rx, ry, k)
            out = out.reshape(b, rz, 3 * n, rx, ry).permute(0, 2, 3, 4, 1)
        return out

    box = tuple(slice(None) for _ in range(3))
    if crop_foreground:
        nonzero = (x != 0).any(0)
        if not nonzero.any():  # nothing to segment
            return torch.zeros(n, 3, *x.shape[1:])
        box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in torch.nonzero(nonzero).unbind(1))

    # 2-D: slices are independent, so slice windows need no overlap (it would only cost time)
    overlaps = (overlap, overlap, 0.0) if two_d else overlap
    stitched = sliding_window_inference(
        x[(slice(None), *box)][None], roi_size, sw_batch_size, predictor, overlap=overlaps, mode=mode,
        sw_device=device, device=device,
    )  # (1, 3n, *box)
    if hasattr(stitched, "as_tensor"):
        stitched = stitched.as_tensor()
    if average == "logits":
        stitched = torch.sigmoid(stitched)
    stitched = stitched.reshape(n, 3, *stitched.shape[2:]).float().cpu()
    if not crop_foreground:
        return stitched
    out = torch.zeros(n, 3, *x.shape[1:])
    out[(slice(None), slice(None), *box)] = stitched
    return out


def soft_dice(prob: torch.Tensor, target: torch.Tensor, spatial_dims: int = 3) -> torch.Tensor:
    """Reference soft Dice per region: ``2 sum(p t) / (sum p + sum t + 1)`` on unthresholded probabilities.

    Args: prob ``(..., 3, *S)`` in [0, 1] with ``len(S) == spatial_dims``; target the same shape (0/1).
    Returns ``(..., 3)``. The ``+1`` only in the denominator (the reference's ``compute_dice_score``)
    means an empty region can never score 1; used by election ``metric="soft"``.
    """
    axes = tuple(range(-spatial_dims, 0))
    p, t = prob.float(), target.float()
    return 2 * (p * t).sum(axes) / (p.sum(axes) + t.sum(axes) + 1)


def hard_dice(pred: torch.Tensor, target: torch.Tensor, spatial_dims: int = 3) -> torch.Tensor:
    """BraTS Dice per region on binary masks: ``2|P∩T| / (|P| + |T|)``, both empty -> 1.

    Args: pred ``(..., 3, *S)`` bool (e.g. ``prob > 0.5``) with ``len(S) == spatial_dims``; target
    the same shape. Returns ``(..., 3)`` float32 (counts in float64 so large volumes stay exact).
    """
    axes = tuple(range(-spatial_dims, 0))
    p, t = pred.bool(), target.bool()
    inter = (p & t).sum(axes).double()
    total = p.sum(axes).double() + t.sum(axes).double()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total)).float()


# ============================================================================================
# The 15-subset evaluation: metrics and their empty-region conventions, EvalResult, evaluate(),
# predict_case() and the slow per-subset reference path.
#
# Imports of this part are kept here, below the inference core above, which has none of them.
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from monai.metrics import compute_dice, compute_hausdorff_distance  # noqa: E402

from lckd_kit import ALL_PRESENT, MODALITIES, REGIONS, SUBSETS, subset_name  # noqa: E402

#: Empty-region conventions of the BraTS tools (DATA_SPEC A4). Per case and region:
#: ``both_empty`` = (Dice, HD95) when prediction and truth are both empty; ``penalty`` = HD95 when
#: exactly one is empty (Dice is then 0), None meaning "the physical image diagonal".
METRIC_CONVENTIONS: dict[str, dict] = {
    # nnU-Net's reimplementation of the BraTS 2018-2020 scheme (compute_BraTS_dice / _HD95):
    # 373.12866 mm is the diagonal of 240x240x155 @ 1 mm; other grids use their own diagonal.
    "brats2018": dict(both_empty=(1.0, 0.0), penalty=None,
                      source="BraTS 2018-2021 as reimplemented by nnU-Net (Task082_BraTS_2020.py)"),
    # BraTS 2023 lesion-wise script, "legacy" full-image scores: inf replaced by 374.
    "brats2023_legacy": dict(both_empty=(1.0, 0.0), penalty=374.0,
                             source="BraTS 2023 metrics script, legacy full-image scores (inf -> 374)"),
    # brats-evaluation 0.0.10 (panoptica): no instances at all -> NaN, dropped from the means.
    "brats_eval_0_0_10": dict(both_empty=(math.nan, math.nan), penalty=373.0,
                              source="brats-evaluation 0.0.10 / panoptica (both empty -> NaN, excluded)"),
}

#: How HD95 is computed here (stored in every result): MONAI takes the 95th percentile of each
#: directed surface-distance set and returns the larger one. medpy / panoptica instead take the
#: 95th percentile of both sets stacked together, which is <= this value.
HD95_FLAVOUR = ("monai.metrics.compute_hausdorff_distance(percentile=95, spacing): "
                "max of the two directed 95th-percentile surface distances, in mm")

EVAL_FORMAT = "lckd_kit.eval/1"


def image_diagonal(shape: Sequence[int], spacing: Sequence[float] | float = 1.0) -> float:
    """Physical diagonal of an image in mm: ``sqrt(sum((n_i * s_i)^2))``.

    240x240x155 @ 1 mm -> 373.13 (the BraTS penalty); 96^3 @ 2 mm -> 332.55.
    """
    shape = np.asarray(shape, dtype=np.float64)
    return float(np.sqrt(np.sum((shape * np.broadcast_to(np.asarray(spacing, np.float64), shape.shape)) ** 2)))


def _check_convention(convention: str) -> dict:
    if convention not in METRIC_CONVENTIONS:
        raise ValueError(f"unknown metric convention {convention!r}; expected one of {sorted(METRIC_CONVENTIONS)}")
    return METRIC_CONVENTIONS[convention]


def _spacing(spacing, ndim: int) -> tuple[float, ...]:
    s = np.broadcast_to(np.asarray(spacing if spacing is not None else 1.0, dtype=np.float64), (ndim,))
    return tuple(float(v) for v in s)


def missing_penalty(shape: Sequence[int], spacing, convention: str = "brats2018",
                    penalty: float | None = None) -> float:
    """HD95 given when exactly one of prediction / truth is empty: ``penalty`` if given, else the
    convention's constant, else the image diagonal (brats2018)."""
    if penalty is not None:
        return float(penalty)
    conv = _check_convention(convention)
    return conv["penalty"] if conv["penalty"] is not None else image_diagonal(shape, _spacing(spacing, len(shape)))


def _as_bool_tensor(x) -> torch.Tensor:
    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    return (x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))).detach().cpu().bool()


def _hd95(pred: torch.Tensor, truth: torch.Tensor, spacing: tuple[float, ...]) -> float:
    """MONAI HD95 of two non-empty masks ``(*S)``, on their union's bounding box + 1 voxel.

    MONAI crops to exactly that box itself (``get_mask_edges``: margin 1, zero padding beyond the
    image), so cropping first gives the same number -- without handling the full volume each call.
    """
    idx = torch.nonzero(pred | truth)
    box = tuple(slice(max(int(lo) - 1, 0), int(hi) + 2) for lo, hi in zip(idx.min(0).values, idx.max(0).values))
    return float(compute_hausdorff_distance(pred[box][None, None], truth[box][None, None], include_background=True,
                                            percentile=95, spacing=spacing)[0, 0])


def score_regions(pred, truth, spacing=1.0, convention: str = "brats2018",
                  penalty: float | None = None, hd95: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Dice and HD95 of several predictions of one case against its truth.

    Args:
        pred: ``(n, 3, *S)`` binary region masks (ET, TC, WT), e.g. one row per modality subset.
        truth: ``(3, *S)`` binary region masks.
        spacing: voxel size in mm (a number or one per spatial axis).
        convention, penalty: see :func:`region_metrics`.
        hd95: False skips the surface distances (the slow part): HD95 is then NaN where both
            masks are non-empty (the empty-region values are still filled in).

    Returns:
        ``(dice, hd95)``, each ``(n, 3)`` float64.
    """
    conv = _check_convention(convention)
    pred, truth = _as_bool_tensor(pred), _as_bool_tensor(truth)
    if pred.ndim == truth.ndim:
        pred = pred[None]
    if pred.shape[1:] != truth.shape or truth.shape[0] != len(REGIONS):
        raise ValueError(f"pred (n, 3, *S) and truth (3, *S) do not match: {tuple(pred.shape)} vs {tuple(truth.shape)}")
    spatial = tuple(truth.shape[1:])
    spacing = _spacing(spacing, len(spatial))
    miss = missing_penalty(spatial, spacing, convention, penalty)
    # MONAI Dice with ignore_empty=False scores both-empty as 1 and one-empty as 0 (overridden below
    # where the convention says otherwise).
    dice = compute_dice(pred, truth[None].expand_as(pred), include_background=True,
                        ignore_empty=False).double().numpy()
    pred_any = pred.flatten(2).any(-1).numpy()
    truth_any = truth.flatten(1).any(-1).numpy()
    dist = np.zeros(dice.shape)
    with warnings.catch_warnings():  # MONAI-internal deprecation notice, nothing the caller can act on
        warnings.simplefilter("ignore", FutureWarning)
        for i, r in np.ndindex(*dice.shape):
            if pred_any[i, r] and truth_any[r]:
                dist[i, r] = math.nan if not hd95 else _hd95(pred[i, r], truth[r], spacing)
            elif pred_any[i, r] or truth_any[r]:
                dice[i, r], dist[i, r] = 0.0, miss
            else:
                dice[i, r], dist[i, r] = conv["both_empty"]
    return dice, dist


def region_metrics(pred, truth, spacing=1.0, convention: str = "brats2018",
                   penalty: float | None = None) -> dict[str, dict[str, float]]:
    """Dice and HD95 (mm) per region of one prediction, with a BraTS empty-region convention.

    Args:
        pred, truth: ``(3, *S)`` binary masks, REGIONS order (ET, TC, WT); numpy or torch.
        spacing: voxel size in mm (number or per axis); HD95 is physical.
        convention: what an empty region scores (:data:`METRIC_CONVENTIONS`):

            ===================  ===================  =======================================
            convention           both empty           exactly one empty
            ===================  ===================  =======================================
            ``brats2018``        Dice 1, HD95 0       Dice 0, HD95 = image diagonal
                                                      (373.13 mm for 240x240x155 @ 1 mm)
            ``brats2023_legacy`` Dice 1, HD95 0       Dice 0, HD95 374
            ``brats_eval_0_0_10`` NaN, NaN (excluded   Dice 0, HD95 373
                                  from means)
            ===================  ===================  =======================================
        penalty: HD95 for "exactly one empty", overriding the convention's.

    HD95 flavour: :data:`HD95_FLAVOUR` (MONAI, max of the two directed 95th percentiles).

    Returns:
        ``{"ET": {"dice": .., "hd95": ..}, "TC": {...}, "WT": {...}}``.
    """
    dice, hd95 = score_regions(_as_bool_tensor(pred)[None], truth, spacing, convention, penalty)
    return {r: {"dice": float(dice[0, i]), "hd95": float(hd95[0, i])} for i, r in enumerate(REGIONS)}


# --------------------------------------------------------------------------------------------
# region post-processing


def nest_regions(regions: torch.Tensor) -> torch.Tensor:
    """Enforce ET ⊂ TC ⊂ WT on ``(..., 3, X, Y, Z)`` binary masks: TC |= ET, WT |= TC.

    This is what a prediction becomes once written as a label map (ET voxels are labelled ET,
    hence counted in TC and WT) -- the regions the BraTS portal scores for the reference's output.
    """
    r = _as_bool_tensor(regions)
    et = r[..., 0, :, :, :]
    tc = r[..., 1, :, :, :] | et
    wt = r[..., 2, :, :, :] | tc
    return torch.stack([et, tc, wt], dim=-4)


def postprocess_et(regions: torch.Tensor, spacing=1.0, et_min_voxels: float = 500) -> torch.Tensor:
    """The reference's ET rule (``postprocess.py`` step 3): a prediction whose whole ET is smaller
    than ``et_min_voxels`` 1-mm voxels (i.e. ``et_min_voxels`` mm^3, scaled by the voxel volume)
    is relabelled necrosis: ET emptied, its voxels kept in TC and WT.

    Args: regions ``(..., 3, X, Y, Z)`` binary (ET, TC, WT); spacing in mm. Returns a new bool tensor.
    Why it exists: an empty ET scores Dice 1 on cases without ET, so removing small ET pays off.
    """
    r = _as_bool_tensor(regions).clone()
    voxel_mm3 = float(np.prod(_spacing(spacing, 3)))
    et = r[..., 0, :, :, :]
    small = et.flatten(-3).sum(-1).double() * voxel_mm3 < et_min_voxels  # (...,) per prediction
    move = et & small[..., None, None, None]
    r[..., 1, :, :, :] |= move
    r[..., 2, :, :, :] |= move
    r[..., 0, :, :, :] &= ~move
    return r


# --------------------------------------------------------------------------------------------
# results


def _nan_to_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _none_to_nan(v):
    return math.nan if v is None else v


@dataclass
class EvalResult:
    """Per-case, per-subset, per-region scores of one evaluation (a tidy table).

    Attributes:
        rows: one dict per (case, subset, region, postprocessed): ``case``, ``subset`` (name,
            e.g. ``"flair+t1ce"``), ``mask`` (4 bools, MODALITIES order), ``region``, ``dice``,
            ``hd95`` (mm), ``postprocessed`` (bool), ``convention``.
        convention: the empty-region convention of the scores (:data:`METRIC_CONVENTIONS`).
        meta: how the numbers were made (model, window, overlap, threshold, HD95 flavour, penalty,
            post-processing, timing, ...).
    """

    rows: list[dict]
    convention: str = "brats2018"
    meta: dict = field(default_factory=dict)

    # -- views ---------------------------------------------------------------------------------

    @property
    def subsets(self) -> list[tuple[bool, ...]]:
        """Subset masks in order of first appearance (SUBSETS order for a full evaluation)."""
        seen: dict[str, tuple[bool, ...]] = {}
        for r in self.rows:
            seen.setdefault(r["subset"], tuple(bool(v) for v in r["mask"]))
        return list(seen.values())

    @property
    def cases(self) -> list[str]:
        return list(dict.fromkeys(r["case"] for r in self.rows))

    @property
    def has_postprocessed(self) -> bool:
        return any(r["postprocessed"] for r in self.rows)

    def per_case(self, metric: str = "dice", postprocessed: bool = False) -> np.ndarray:
        """``(n_cases, n_subsets, 3)`` scores (NaN where a convention excludes a value)."""
        if metric not in ("dice", "hd95"):
            raise ValueError(f"metric must be 'dice' or 'hd95', got {metric!r}")
        cases = {c: i for i, c in enumerate(self.cases)}
        subsets = {subset_name(m): i for i, m in enumerate(self.subsets)}
        out = np.full((len(cases), len(subsets), len(REGIONS)), np.nan)
        for r in self.rows:
            if bool(r["postprocessed"]) == postprocessed:
                out[cases[r["case"]], subsets[r["subset"]], REGIONS.index(r["region"])] = _none_to_nan(r[metric])
        return out

    def table(self, metric: str = "dice", postprocessed: bool = False) -> np.ndarray:
        """``(n_subsets, 3)`` mean over cases, NaNs ignored (``brats_eval_0_0_10`` both-empty)."""
        if postprocessed and not self.has_postprocessed:
            raise ValueError("no post-processed rows: evaluate(..., postprocess=True) first")
        v = self.per_case(metric, postprocessed)
        with warnings.catch_warnings():  # an all-NaN column stays NaN, silently
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(v, axis=0)

    def dice_table(self, postprocessed: bool = False) -> np.ndarray:
        """``(15, 3)`` mean Dice over cases, rows in SUBSETS order, columns ET, TC, WT."""
        return self.table("dice", postprocessed)

    def hd95_table(self, postprocessed: bool = False) -> np.ndarray:
        """``(15, 3)`` mean HD95 (mm) over cases."""
        return self.table("hd95", postprocessed)

    # -- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict:
        rows = [{k: _nan_to_none(v) for k, v in r.items()} for r in self.rows]
        return {"format": EVAL_FORMAT, "convention": self.convention, "meta": self.meta, "rows": rows}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        if d.get("format") != EVAL_FORMAT:
            raise ValueError(f"not an lckd_kit evaluation (format {EVAL_FORMAT!r}), got {d.get('format')!r}")
        rows = [{**r, "dice": _none_to_nan(r["dice"]), "hd95": _none_to_nan(r["hd95"])} for r in d["rows"]]
        return cls(rows=rows, convention=d["convention"], meta=d.get("meta", {}))

    def to_json(self, path: str | os.PathLike) -> Path:
        """Strict JSON (NaN written as null)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "EvalResult":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_csv(self, path: str | os.PathLike) -> Path:
        """One line per row; the mask as four 0/1 columns (flair, t1, t1ce, t2); NaN as empty."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        head = ["case", "subset", *MODALITIES, "region", "dice", "hd95", "postprocessed", "convention"]
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(head)
            for r in self.rows:
                score = ["" if not math.isfinite(r[k]) else f"{r[k]:.6f}" for k in ("dice", "hd95")]
                w.writerow([r["case"], r["subset"], *[int(bool(v)) for v in r["mask"]], r["region"], *score,
                            int(bool(r["postprocessed"])), r["convention"]])
        return path

    # -- presentation ----------------------------------------------------------------------------

    def _note(self) -> str:
        conv = METRIC_CONVENTIONS.get(self.convention, {})
        pen = self.meta.get("penalty_mm")
        return (f"Mean over {len(self.cases)} case(s) (NaN excluded). Empty-region convention "
                f"`{self.convention}` ({conv.get('source', '?')}); one-empty HD95 penalty "
                f"{'%.2f mm' % pen if isinstance(pen, (int, float)) else '?'}. HD95: {HD95_FLAVOUR}.")

    def markdown(self, title: str | None = None, hd95: bool = True) -> str:
        """Paper-style table(s): ●/○ availability (FLAIR, T1, T1ce, T2), ET/TC/WT Dice, Mean row
        (+ HD95 columns); the post-processed table follows when there is one."""
        parts = [f"**{title}**" if title else None]
        for pp in ([False, True] if self.has_postprocessed else [False]):
            head = ("ET post-processed (small ET -> necrosis)" if pp else "raw") if self.has_postprocessed else None
            parts.append(self._one_table(pp, hd95, head))
        parts.append(self._note())
        return "\n\n".join(p for p in parts if p)

    def _one_table(self, postprocessed: bool, hd95: bool, head: str | None) -> str:
        from lckd_kit import viz

        dice = self.dice_table(postprocessed)
        hd = self.hd95_table(postprocessed) if hd95 else None
        if [tuple(m) for m in self.subsets] == list(SUBSETS):
            return viz.markdown_subset_table(dice, hd, title=head)
        # a partial evaluation: one row per evaluated subset, named
        cols = list(REGIONS) + ([f"HD95 {r}" for r in REGIONS] if hd95 else [])
        lines = ["| subset | " + " | ".join(cols) + " |", "|---|" + "--:|" * len(cols)]
        for i, m in enumerate(self.subsets):
            vals = list(dice[i]) + (list(hd[i]) if hd95 else [])
            lines.append(f"| {subset_name(m)} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
        return (f"**{head}**\n\n" if head else "") + "\n".join(lines)

    def heatmap(self, title: str | None = None, postprocessed: bool = False):
        """The 15-subset Dice heatmap (``viz.subset_heatmap``, with a Mean column) -> Figure."""
        from lckd_kit import viz

        if [tuple(m) for m in self.subsets] != list(SUBSETS):
            raise ValueError("the heatmap needs all 15 subsets in SUBSETS order")
        title = title or f"Dice over {len(self.cases)} case(s)" + (" (ET post-processed)" if postprocessed else "")
        return viz.subset_heatmap(self.dice_table(postprocessed), title=title, show_mean=True)

    def save(self, out_dir: str | os.PathLike, title: str | None = None) -> list[Path]:
        """Write ``results.json``, ``results.csv``, ``table.md`` and ``heatmap.png`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = [self.to_json(out / "results.json"), self.to_csv(out / "results.csv")]
        (out / "table.md").write_text(self.markdown(title) + "\n")
        files.append(out / "table.md")
        if [tuple(m) for m in self.subsets] == list(SUBSETS):
            self.heatmap(title).savefig(out / "heatmap.png", dpi=100, bbox_inches="tight")
            files.append(out / "heatmap.png")
        return files


# --------------------------------------------------------------------------------------------
# evaluation


def default_roi(model: torch.nn.Module, image_shape: Sequence[int]) -> tuple[int, int, int]:
    """The model's default window, shrunk to the image where the image is smaller.

    A window larger than the image only adds zero padding (e.g. a 96x96 2-D window on a 32^3 test
    phantom does 9x the work); each shrunk axis stays a multiple of the model's size divisor.
    ``image_shape`` is ``(X, Y, Z)``; 2-D models' third entry is slices per window.
    """
    cfg = _model_config(model)
    two_d = cfg.spatial_dims == 2
    roi = (*cfg.roi_size, SLICES_PER_WINDOW_2D) if two_d else tuple(cfg.roi_size)
    size_divisor = tuple(getattr(cfg, "size_divisor", (1,) * cfg.spatial_dims))
    div = (*size_divisor, 1) if two_d else size_divisor
    return tuple(int(min(r, math.ceil(n / d) * d)) for r, n, d in zip(roi, image_shape, div))


def _case_spacing(case: dict, ndim: int = 3) -> tuple[float, ...]:
    if case.get("spacing") is not None:
        return _spacing(case["spacing"], ndim)
    if case.get("affine") is not None:
        return tuple(float(s) for s in np.linalg.norm(np.asarray(case["affine"])[:3, :3], axis=0))
    warnings.warn(f"case {case.get('name', '?')}: no spacing or affine, HD95 assumes 1 mm voxels", stacklevel=3)
    return (1.0,) * ndim


def _eval_case(case) -> dict:
    """A ``data.Case`` is loaded and z-scored; a dict is used as is (its image must be normalised)."""
    from lckd_kit.data import Case, load_case, normalize_image

    if isinstance(case, Case):
        case = load_case(case)
        case["image"] = normalize_image(case["image"])
    if case.get("label") is None:
        raise ValueError(f"case {case.get('name', '?')} has no label: evaluation needs one")
    return case


def evaluate(
    model: torch.nn.Module,
    cases: Sequence[dict],
    subsets: Sequence[Sequence[bool] | str] = SUBSETS,
    roi_size: Sequence[int] | None = None,
    overlap: float = 1 / 3,
    device: torch.device | str | None = None,
    convention: str = "brats2018",
    penalty: float | None = None,
    postprocess: bool = False,
    et_min_voxels: float = 500,
    progress: bool = False,
    sw_batch_size: int = 1,
    crop_foreground: bool = False,
    nested: bool = True,
    mode: str = "constant",
    average: str = "probs",
    amp: bool = False,
    hd95: bool = True,
) -> EvalResult:
    """Dice and HD95 of ``model`` on ``cases`` for every modality subset.

    Per case, ONE :func:`predict_subsets` call encodes each sliding window once and decodes all
    subsets; probabilities are averaged over windows (reference ``eval.py``), thresholded at 0.5,
    made nested (``nested``: TC |= ET, WT |= TC, as the label map the reference writes), and scored
    per region with :func:`score_regions`.

    Args:
        model: an ``LCKDNet``; switched to ``eval()`` for the call, its mode restored afterwards.
        cases: dicts with a normalised ``"image"`` ``(4, X, Y, Z)``, a ``"label"`` ``(3, X, Y, Z)``,
            ``"spacing"`` (mm; else derived from ``"affine"``) and ``"name"`` -- or ``data.Case``
            objects, which are loaded and z-scored here.
        subsets: modality subsets to score (default: all 15, the paper's table).
        roi_size, overlap, sw_batch_size, crop_foreground, mode, average, amp: passed to
            :func:`predict_subsets`; ``roi_size`` None is :func:`default_roi` (the model's window,
            shrunk to small images).
        convention, penalty: empty-region convention and one-empty HD95 penalty (:func:`region_metrics`).
        postprocess: also score the reference's ET rule (:func:`postprocess_et`); these rows carry
            ``postprocessed=True`` and never replace the raw ones.
        et_min_voxels: ET threshold of that rule, in 1-mm voxels (mm^3), scaled by the voxel volume.
        progress: tqdm bar over cases.
        hd95: False skips the surface distances (Dice only; HD95 NaN unless a region is empty).

    Returns:
        :class:`EvalResult`; ``result.dice_table()`` is ``(15, 3)``.
    """
    _check_convention(convention)
    masks = [as_mask(s) for s in subsets]
    if not masks:
        raise ValueError("no subsets to evaluate")
    if not len(cases):
        raise ValueError("no cases to evaluate")
    cfg = _model_config(model)
    rows: list[dict] = []
    penalties = set()
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        it = cases
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(cases, desc="evaluate", unit="case", dynamic_ncols=True)
        for case in it:
            case = _eval_case(case)
            roi = roi_size or default_roi(model, np.shape(case["image"])[1:])
            prob = predict_subsets(model, case["image"], masks, roi_size=roi, overlap=overlap,
                                   sw_batch_size=sw_batch_size, device=device, mode=mode, average=average,
                                   amp=amp, crop_foreground=crop_foreground)
            pred = prob > 0.5  # reference: np.around(prob), so exactly 0.5 -> 0
            del prob
            if nested:
                pred = nest_regions(pred)
            truth = torch.as_tensor(np.asarray(case["label"])).bool()
            spacing = _case_spacing(case, truth.ndim - 1)
            penalties.add(round(missing_penalty(truth.shape[1:], spacing, convention, penalty), 4))
            variants = [(False, pred)]
            if postprocess:
                variants.append((True, postprocess_et(pred, spacing, et_min_voxels)))
            for pp, p in variants:
                dice, dist = score_regions(p, truth, spacing, convention, penalty, hd95=hd95)
                for i, m in enumerate(masks):
                    for r, region in enumerate(REGIONS):
                        rows.append({"case": case.get("name", f"case{len(rows)}"), "subset": subset_name(m),
                                     "mask": list(m), "region": region, "dice": float(dice[i, r]),
                                     "hd95": float(dist[i, r]), "postprocessed": pp, "convention": convention})
    finally:
        model.train(was_training)
    meta = {
        "model": cfg.name, "spatial_dims": cfg.spatial_dims, "n_cases": len(cases), "n_subsets": len(masks),
        "roi_size": [int(r) for r in roi], "overlap": overlap,
        "blend": mode, "average": average, "threshold": 0.5, "nested": nested,
        "crop_foreground": crop_foreground, "convention": convention,
        "penalty_mm": penalties.pop() if len(penalties) == 1 else sorted(penalties),
        "hd95": HD95_FLAVOUR if hd95 else None, "postprocess": postprocess,
        "et_min_mm3": et_min_voxels if postprocess else None, "seconds": round(time.perf_counter() - t0, 2),
    }
    return EvalResult(rows=rows, convention=convention, meta=meta)


@torch.no_grad()
def predict_case(
    model: torch.nn.Module,
    case,
    available: Sequence[bool] | str = ALL_PRESENT,
    out_path: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    roi_size: Sequence[int] | None = None,
    overlap: float = 1 / 3,
    postprocess: bool = False,
    et_min_voxels: float = 500,
    sw_batch_size: int = 1,
):
    """Segment one case from the ``available`` modalities only.

    Args:
        case: a ``data.Case`` or the dict ``data.load_case`` returned. Its image is z-scored here
            (z-scoring an already normalised image changes nothing).
        available: modality mask / name (``"flair+t1ce"``); the other channels are never read.
        out_path: ``.nii[.gz]`` file, or a folder (then ``<folder>/<case>_<subset>.nii.gz``); None
            returns the regions instead of writing.
        roi_size: sliding window (default :func:`default_roi`).
        postprocess: apply the reference's small-ET rule (:func:`postprocess_et`).

    Returns:
        The written path -- a label NIfTI in the case's own geometry (original orientation and
        affine) and label convention, via ``data.save_prediction`` -- or, without ``out_path``,
        ``(3, X, Y, Z)`` uint8 nested region masks (ET, TC, WT) in RAS.
    """
    from lckd_kit.data import Case, load_case, normalize_image, save_prediction

    loaded = load_case(case) if isinstance(case, Case) else case
    mask = as_mask(available)
    image = normalize_image(np.asarray(loaded["image"], dtype=np.float32))
    was_training = model.training
    model.eval()
    try:
        prob = predict_subsets(model, image, [mask], roi_size=roi_size or default_roi(model, image.shape[1:]),
                               overlap=overlap, device=device, sw_batch_size=sw_batch_size)
    finally:
        model.train(was_training)
    regions = nest_regions(prob > 0.5)[0]
    if postprocess:
        regions = postprocess_et(regions, _case_spacing(loaded), et_min_voxels)
    regions = regions.numpy().astype(np.uint8)
    if out_path is None:
        return regions
    out = Path(out_path)
    if out.is_dir() or not (out.name.endswith(".nii") or out.name.endswith(".nii.gz")):
        out = out / f"{loaded['name']}_{subset_name(mask)}.nii.gz"
    if "original_affine" not in loaded:
        raise ValueError("writing a prediction needs the case's geometry: pass a data.Case or a load_case dict")
    return save_prediction(regions, loaded, out)


@torch.no_grad()
def per_subset_reference(
    model: torch.nn.Module,
    image: torch.Tensor | np.ndarray,
    subsets: Sequence[Sequence[bool] | str],
    roi_size: Sequence[int] | None = None,
    overlap: float = 1 / 3,
    device: torch.device | str | None = None,
    mode: str = "constant",
    sw_batch_size: int = 1,
) -> torch.Tensor:
    """The slow path: one sliding-window pass per subset with ``model(window, mask)`` (the
    reference's way, one ``--mode`` per run). Same windows, blending and probability averaging as
    :func:`predict_subsets`, so both agree to float precision; used by tests and benchmarks.

    Returns ``(n_subsets, 3, X, Y, Z)`` float32 probabilities on the CPU.
    """
    cfg = _model_config(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    x = image.as_tensor() if hasattr(image, "as_tensor") else image
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x, dtype=torch.float32)
    two_d = cfg.spatial_dims == 2
    roi_size = tuple(int(r) for r in (roi_size or default_roi(model, x.shape[1:])))
    overlaps = (overlap, overlap, 0.0) if two_d else overlap
    outs = []
    for s in subsets:
        mask = as_mask(s)

        def predictor(window: torch.Tensor) -> torch.Tensor:
            if hasattr(window, "as_tensor"):
                window = window.as_tensor()
            b, _, rx, ry, rz = window.shape
            if two_d:  # slices become batch items, as in predict_subsets
                window = window.permute(0, 4, 1, 2, 3).reshape(b * rz, 4, rx, ry)
            out = torch.sigmoid(model(window, mask)[0].float())
            if two_d:
                out = out.reshape(b, rz, 3, rx, ry).permute(0, 2, 3, 4, 1)
            return out

        prob = sliding_window_inference(x[None], roi_size, sw_batch_size, predictor, overlap=overlaps, mode=mode,
                                        sw_device=device, device=device)
        outs.append((prob.as_tensor() if hasattr(prob, "as_tensor") else prob)[0].float().cpu())
    return torch.stack(outs)
