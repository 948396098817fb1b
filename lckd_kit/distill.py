"""LCKD losses: cross-modal feature distillation and the segmentation loss.

Training loss of the reference (its ``train.py``: Dice + BCE + ``kd_wt`` 0.1 x KD)::

    total, dice, bce = segmentation_loss(logits, target)
    loss = total + 0.1 * distillation_loss(features, available, teachers)

``features`` is the second output of :class:`lckd_kit.model.LCKDNet` (per-modality bottleneck
features before the mean fill); only available modalities take part.
"""
from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from . import MODALITIES

N_MOD = len(MODALITIES)

#: weight of the distillation term in the reference's total loss (train.py ``kd_wt``)
KD_WEIGHT = 0.1


def _to_rows(mask, batch: int, device, what: str) -> torch.Tensor:
    """(4,) or (B, 4) bool mask (tensor, array or sequence) -> (B, 4) bool tensor on ``device``."""
    m = torch.as_tensor(mask.detach() if torch.is_tensor(mask) else np.asarray(mask), device=device)
    if m.dtype != torch.bool or m.shape[-1] != N_MOD or m.dim() not in (1, 2):
        raise ValueError(f"{what} must be a bool mask (4,) or (B, 4), got {tuple(m.shape)} {m.dtype}")
    return m.expand(batch, N_MOD)


def _teacher_tuple(teachers) -> tuple[bool, ...]:
    """Teachers as 4 python bools, from a bool mask (sequence, array or tensor)."""
    return tuple(bool(v) for v in _to_rows(teachers, 1, "cpu", "teachers")[0].tolist())


def distillation_loss(
    features: torch.Tensor,
    available,
    teachers,
    distance: str = "l1",
    pairs: str = "all",
    reduction: str = "sum",
) -> torch.Tensor:
    """Pull every available modality's bottleneck feature toward every available teacher's.

    Args:
        features: (B, 4, C, *s) per-modality features.
        available: (4,) or (B, 4) bool mask of present modalities.
        teachers: (4,) bool mask of the elected teachers.
        distance: "l1" (reference, ``nn.L1Loss``) or "mse"; a mean over all elements of a pair.
        pairs: "all" (reference "teach all": every available s, including s == t and other
            teachers) or "students" (s must not be a teacher).
        reduction: "sum" over (teacher, student) pairs (reference) or "mean" over the pairs that
            occur in the batch.

    The teacher side is detached: for the pair (t, s) only ``features[:, s]`` gets a gradient.
    A pair only counts in the samples where both t and s are available, and its value is the mean
    of the per-sample distances over those samples -- with one subset for the whole batch this is
    exactly the reference's mean over all elements. Returns a 0-dim tensor on ``features``' device;
    zero when no teacher is available (safe to add to a loss).
    """
    if distance not in ("l1", "mse"):
        raise ValueError(f"distance must be 'l1' or 'mse', got {distance!r}")
    if pairs not in ("all", "students"):
        raise ValueError(f"pairs must be 'all' or 'students', got {pairs!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    B = features.shape[0]
    avail = _to_rows(available, B, features.device, "available")
    teach = _teacher_tuple(teachers)
    if not any(teach):
        return features.new_zeros(())
    student_ok = avail if pairs == "all" else avail & ~torch.tensor(teach, device=features.device)
    dists, weights = [], []
    for t in (t for t in range(N_MOD) if teach[t]):
        diff = features - features[:, t : t + 1].detach()  # (B, 4, C, *s): every s against teacher t
        d = diff.abs() if distance == "l1" else diff.square()
        dists.append(d.flatten(2).mean(2))  # (B, 4) per-sample distance of each s to t
        weights.append(student_ok & avail[:, t : t + 1])  # pair (t, s) present in sample b
    d, w = torch.stack(dists), torch.stack(weights)  # (T, B, 4)
    n = w.sum(1)  # (T, 4) samples per pair
    per_pair = torch.where(w, d, 0.0).sum(1) / n.clamp_min(1)  # 0 for pairs that never occur
    total = per_pair.sum()
    if reduction == "mean":
        total = total / (n > 0).sum().clamp_min(1)
    return total


_dice = DiceLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1.0, batch=False, reduction="mean")


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference Dice + BCE on 3 sigmoid channels. logits, target (B, 3, *S) -> (total, dice, bce).

    dice: soft Dice per sample and channel, ``1 - 2*sum(p*t) / (sum(p) + sum(t) + 1)``, averaged over
        batch and the 3 channels.
    bce: ``BCEWithLogits`` mean over each channel, SUMMED over the 3 channels (= 3x the mean BCE).
    This is the reference's weighting (BCE counts ~3x relative to Dice); total = dice + bce.
    Computed in float32 whatever the autocast dtype of ``logits``.
    """
    logits, target = logits.float(), target.float()
    dice = _dice(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(2).mean((0, 2)).sum()
    return dice + bce, dice, bce




# --------------------------------------------------------------------------------------------
# what distillation does to the features: the mechanism, measured


def feature_distances(features: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between every two modalities' bottleneck features.

    ``features``: ``(B, 4, C, *s)`` (all four modalities encoded) -> ``(4, 4)``: entry (s, t) is the
    mean over samples and elements of ``|f_s - f_t|`` -- what the KD loss makes small for a teacher t.
    """
    f = features.float().flatten(2)  # (B, 4, n)
    return (f[:, :, None] - f[:, None, :]).abs().mean((0, 3))


def fill_errors(features: torch.Tensor) -> torch.Tensor:
    """How far the mean fill is from a modality's own feature when that modality is missing.

    ``features``: ``(B, 4, C, *s)`` -> ``(4,)``: entry t is the mean, over the 7 subsets without t
    (and over samples and elements), of ``|mean_{m in S} f_m - f_t|`` -- the error the model makes in
    t's slot when t is absent. Distillation toward a teacher t is meant to shrink it.
    """
    f = features.float().flatten(2)
    out = torch.zeros(N_MOD)
    for t in range(N_MOD):
        others = [m for m in range(N_MOD) if m != t]
        errs = []
        for k in range(1, len(others) + 1):
            for subset in combinations(others, k):
                errs.append((f[:, list(subset)].mean(1) - f[:, t]).abs().mean())
        out[t] = torch.stack(errs).mean()
    return out


def _tumour_crop(image: np.ndarray, label: np.ndarray, roi: Sequence[int]) -> np.ndarray:
    """The ``roi``-sized window (2-D: an axial slice) centred on the tumour (WT) of a case, zero-padded."""
    wt = label[2] if label is not None and label[2].any() else (image != 0).any(0)
    centre = np.round(np.argwhere(wt).mean(0)).astype(int)
    size = list(roi) + ([1] if len(roi) == 2 else [])
    out = np.zeros((image.shape[0], *size), np.float32)
    src, dst = [], []
    for c, n, r in zip(centre, image.shape[1:], size):
        lo = c - r // 2
        src.append(slice(max(lo, 0), min(lo + r, n)))
        dst.append(slice(max(lo, 0) - lo, min(lo + r, n) - lo))
    out[(slice(None), *dst)] = image[(slice(None), *src)]
    return out[..., 0] if len(roi) == 2 else out


@torch.no_grad()
def tumour_features(model, case: dict, device=None) -> torch.Tensor:
    """The bottleneck features ``(1, 4, C, *s)`` of a window of the model's trained size centred on
    the case's tumour, all four modalities encoded. ``case``: normalised ``"image"`` (4, X, Y, Z) and
    ``"label"``, at the model's voxel size."""
    cfg = getattr(model, "config", None) or model.module.config
    device = device or next(model.parameters()).device
    crop = _tumour_crop(np.asarray(case["image"]), case.get("label"), cfg.roi_size)
    was_training = model.training
    model.eval()
    try:
        return model.encode(torch.from_numpy(crop[None]).to(device)).bottleneck
    finally:
        model.train(was_training)


@torch.no_grad()
def feature_probe(model, cases: Sequence[dict], device=None, reduce=None) -> dict:
    """Bottleneck features of a window on each case's tumour, encoded with all four modalities ->
    ``{"l1": (4, 4) feature_distances, "fill_error": (4,) fill_errors, "n_cases"}``, means over cases.

    ``cases``: dicts with a normalised ``"image"`` (4, X, Y, Z) and ``"label"``, at the model's voxel
    size; the window is the model's trained one. Training records this at every election.
    ``reduce`` (``distributed.all_reduce_sum``): ``cases`` is this process's shard (maybe empty).
    """
    total = np.zeros(N_MOD * N_MOD + N_MOD + 1)
    for c in cases:
        feats = tumour_features(model, c, device)
        total += np.concatenate([feature_distances(feats).cpu().numpy().ravel(), fill_errors(feats).numpy(), [1]])
    if reduce is not None:
        total = reduce(total)
    n = max(total[-1], 1)
    l1, fill = total[:N_MOD * N_MOD].reshape(N_MOD, N_MOD) / n, total[N_MOD * N_MOD:-1] / n
    return {"l1": [[round(float(v), 6) for v in row] for row in l1], "fill_error": [round(float(v), 6) for v in fill],
            "n_cases": int(total[-1])}


__all__ = ["distillation_loss", "segmentation_loss", "KD_WEIGHT", "feature_distances", "fill_errors", "tumour_features",
           "feature_probe"]
