"""lckd_kit: learn, teach and explore LCKD (Learnable Cross-modal Knowledge Distillation).

One canonical order everywhere in the kit:

* ``MODALITIES = ("flair", "t1", "t1ce", "t2")`` -- channel ``m`` of every image tensor.
* ``REGIONS = ("ET", "TC", "WT")`` -- channel ``r`` of every region mask / logit tensor
  (nested: ET ⊂ TC ⊂ WT).  The reference code outputs (ET, WT, TC); we reorder once, when
  loading its weights (see :func:`lckd_kit.model.load_reference_state_dict`).

Modality availability is always a boolean mask of length 4 in MODALITIES order.
``SUBSETS`` lists the 15 non-empty subsets in one documented order: the four singles,
then the six pairs, the four triples and finally all four modalities (lexicographic within
each size, by modality index) -- the row order of the paper-style 15-subset table.
"""
from __future__ import annotations

from itertools import combinations
from typing import Iterable, Sequence

import numpy as np

__version__ = "0.1.0"

MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
REGIONS: tuple[str, ...] = ("ET", "TC", "WT")
ALL_PRESENT: tuple[bool, ...] = (True, True, True, True)


def _subsets() -> tuple[tuple[bool, ...], ...]:
    out = []
    for k in range(1, len(MODALITIES) + 1):
        for idx in combinations(range(len(MODALITIES)), k):
            out.append(tuple(m in idx for m in range(len(MODALITIES))))
    return tuple(out)


#: The 15 non-empty modality subsets as boolean masks (singles, pairs, triples, all four).
SUBSETS: tuple[tuple[bool, ...], ...] = _subsets()


class NoModalityError(ValueError):
    """An availability mask without any modality (nothing to segment from)."""


def as_mask(available: Sequence[bool] | Iterable[int] | str) -> tuple[bool, ...]:
    """Normalise an availability description to a boolean mask of length 4.

    Accepts a boolean sequence / array / tensor of length 4, a subset name (``"flair+t1ce"``) or an
    iterable of modality indices / names. This is the one place where other spellings become a
    mask: the model, the losses and the inference functions take masks only. Raises
    :class:`NoModalityError` for the empty subset and ``ValueError`` for anything unreadable.
    """
    if isinstance(available, str):
        parts = [p.strip().lower() for p in available.replace(",", "+").split("+") if p.strip()]
        unknown = [p for p in parts if p not in MODALITIES]
        if unknown:
            raise ValueError(f"unknown modality name(s) {unknown}; expected some of {MODALITIES}")
        mask = tuple(m in parts for m in MODALITIES)
    else:
        items = list(available.tolist() if hasattr(available, "tolist") else available)
        if len(items) == len(MODALITIES) and all(isinstance(v, (bool, np.bool_)) for v in items):
            mask = tuple(bool(v) for v in items)
        else:
            idx = set()
            for v in items:
                if isinstance(v, str):
                    if v.lower() not in MODALITIES:
                        raise ValueError(f"unknown modality {v!r}; expected one of {MODALITIES}")
                    idx.add(MODALITIES.index(v.lower()))
                elif isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(MODALITIES):
                    idx.add(int(v))
                else:
                    raise ValueError(f"cannot read {available!r} as a modality subset")
            mask = tuple(m in idx for m in range(len(MODALITIES)))
    if not any(mask):
        raise NoModalityError("no modality selected: at least one of flair, t1, t1ce, t2 must be available")
    return mask


def subset_name(mask: Sequence[bool]) -> str:
    """Name a subset: ``(True, False, True, False)`` -> ``"flair+t1ce"``."""
    mask = as_mask(mask)
    return "+".join(m for m, on in zip(MODALITIES, mask) if on)


__all__ = ["MODALITIES", "REGIONS", "SUBSETS", "ALL_PRESENT", "NoModalityError", "as_mask", "subset_name", "__version__"]
