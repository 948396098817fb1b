"""LCKD losses: cross-modal feature distillation and the segmentation loss.

Training loss of the reference (LCKD_SPEC section 3)::

    total, dice, bce = segmentation_loss(logits, target)
    loss = total + 0.1 * distillation_loss(features, available, teachers)

``features`` is the second output of :class:`lckd_kit.model.LCKDNet` (per-modality bottleneck
features before the mean fill); only available modalities take part.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from . import MODALITIES

N_MOD = len(MODALITIES)

#: weight of the distillation term in the reference's total loss (train.py ``kd_wt``)
KD_WEIGHT = 0.1


def _to_rows(mask, batch: int, device, what: str) -> torch.Tensor:
    """(4,) or (B, 4) bool-like -> (B, 4) bool tensor on ``device``."""
    m = torch.as_tensor(mask, device=device)
    if m.dtype != torch.bool:
        m = m != 0
    if m.shape[-1] != N_MOD or m.dim() not in (1, 2):
        raise ValueError(f"{what} must be (4,) or (B, 4), got shape {tuple(m.shape)}")
    return m.expand(batch, N_MOD)


def _teacher_tuple(teachers) -> tuple[bool, ...]:
    """Teachers as 4 python bools; accepts a bool mask (sequence / tensor) or modality indices."""
    if torch.is_tensor(teachers):
        teachers = teachers.detach().cpu().tolist()
    items = list(teachers)
    if len(items) == N_MOD and all(isinstance(v, bool) for v in items):
        return tuple(items)
    if all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < N_MOD for v in items):
        return tuple(m in items for m in range(N_MOD))  # indices, e.g. [2] or (0, 2)
    raise ValueError(f"teachers must be a bool mask of length 4 or modality indices, got {teachers!r}")


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
        teachers: (4,) bool mask (or indices) of the elected teachers.
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


__all__ = ["distillation_loss", "segmentation_loss", "KD_WEIGHT"]
