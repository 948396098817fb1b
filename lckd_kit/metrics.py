"""Scoring a segmentation: Dice (hard and soft), HD95 and the BraTS empty-region conventions.

Everything here works on binary region masks ``(..., 3, *S)`` in ``REGIONS`` order (ET, TC, WT)
and knows nothing about models: inference produces the probabilities, these functions score them.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from lckd_kit import REGIONS


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


#: Empty-region conventions of the BraTS evaluation tools. Per case and region:
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


def image_diagonal(shape: Sequence[int], spacing: Sequence[float] | float = 1.0) -> float:
    """Physical diagonal of an image in mm: ``sqrt(sum((n_i * s_i)^2))``.

    240x240x155 @ 1 mm -> 373.13 (the BraTS penalty); 96^3 @ 2 mm -> 332.55.
    """
    shape = np.asarray(shape, dtype=np.float64)
    return float(np.sqrt(np.sum((shape * np.broadcast_to(np.asarray(spacing, np.float64), shape.shape)) ** 2)))


def check_convention(convention: str) -> dict:
    """The :data:`METRIC_CONVENTIONS` entry of ``convention`` (ValueError if unknown)."""
    if convention not in METRIC_CONVENTIONS:
        raise ValueError(f"unknown metric convention {convention!r}; expected one of {sorted(METRIC_CONVENTIONS)}")
    return METRIC_CONVENTIONS[convention]


def as_spacing(spacing, ndim: int) -> tuple[float, ...]:
    """A number or per-axis voxel size (None: 1 mm) -> ``ndim`` floats."""
    s = np.broadcast_to(np.asarray(spacing if spacing is not None else 1.0, dtype=np.float64), (ndim,))
    return tuple(float(v) for v in s)


def missing_penalty(shape: Sequence[int], spacing, convention: str = "brats2018",
                    penalty: float | None = None) -> float:
    """HD95 given when exactly one of prediction / truth is empty: ``penalty`` if given, else the
    convention's constant, else the image diagonal (brats2018)."""
    if penalty is not None:
        return float(penalty)
    conv = check_convention(convention)
    return conv["penalty"] if conv["penalty"] is not None else image_diagonal(shape, as_spacing(spacing, len(shape)))


def as_bool_tensor(x) -> torch.Tensor:
    """numpy / torch / MetaTensor -> a CPU bool tensor."""
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
    conv = check_convention(convention)
    pred, truth = as_bool_tensor(pred), as_bool_tensor(truth)
    if pred.ndim == truth.ndim:
        pred = pred[None]
    if pred.shape[1:] != truth.shape or truth.shape[0] != len(REGIONS):
        raise ValueError(f"pred (n, 3, *S) and truth (3, *S) do not match: {tuple(pred.shape)} vs {tuple(truth.shape)}")
    spatial = tuple(truth.shape[1:])
    spacing = as_spacing(spacing, len(spatial))
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
    dice, hd95 = score_regions(as_bool_tensor(pred)[None], truth, spacing, convention, penalty)
    return {r: {"dice": float(dice[0, i]), "hd95": float(hd95[0, i])} for i, r in enumerate(REGIONS)}


# --------------------------------------------------------------------------------------------
# region post-processing


def nest_regions(regions: torch.Tensor) -> torch.Tensor:
    """Enforce ET ⊂ TC ⊂ WT on ``(..., 3, X, Y, Z)`` binary masks: TC |= ET, WT |= TC.

    This is what a prediction becomes once written as a label map (ET voxels are labelled ET,
    hence counted in TC and WT) -- the regions the BraTS portal scores for the reference's output.
    """
    r = as_bool_tensor(regions)
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
    r = as_bool_tensor(regions).clone()
    voxel_mm3 = float(np.prod(as_spacing(spacing, 3)))
    et = r[..., 0, :, :, :]
    small = et.flatten(-3).sum(-1).double() * voxel_mm3 < et_min_voxels  # (...,) per prediction
    move = et & small[..., None, None, None]
    r[..., 1, :, :, :] |= move
    r[..., 2, :, :, :] |= move
    r[..., 0, :, :, :] &= ~move
    return r


__all__ = ["soft_dice", "hard_dice", "METRIC_CONVENTIONS", "HD95_FLAVOUR", "image_diagonal", "check_convention",
           "as_spacing", "missing_penalty", "as_bool_tensor", "score_regions", "region_metrics", "nest_regions",
           "postprocess_et"]
