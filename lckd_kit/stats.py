"""Honest comparisons: per-case Dice of two models, paired, with bootstrap intervals over cases and seeds.

The numbers a report, notebook or README states about "LCKD vs a baseline" come from here:

    c = compare(lckd, base, "no_t1ce", ("ET", "TC"))   # per-case Dice (n_seeds, n_cases, 15, 3) each
    c.diff, c.low, c.high                              # mean difference and its 95 % interval
    describe(c, "missing-T1ce core")                   # one sentence that follows from the interval

The interval is a percentile bootstrap of the mean paired difference. With several seeds it is
hierarchical (resample seeds, then cases within them), so it carries both sources of noise; with
one seed it only knows the case-to-case spread, and the sentence says so. Nothing here ever calls
a difference "significant": with a handful of cases and seeds the honest statement is whether
the interval excludes zero, and how wide it is.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from lckd_kit import ALL_PRESENT, REGIONS, SUBSETS


def _rows(pred) -> list[int]:
    return [i for i, m in enumerate(SUBSETS) if pred(m)]


#: subset groups of the summaries: name -> (description, subset row indices)
GROUPS: dict[str, tuple[str, list[int]]] = {
    "all": ("all 15 subsets", list(range(len(SUBSETS)))),
    "no_t1ce": ("the 7 subsets without T1ce", _rows(lambda m: not m[2])),
    "no_flair": ("the 7 subsets without FLAIR", _rows(lambda m: not m[0])),
    "full": ("all four modalities", [SUBSETS.index(ALL_PRESENT)]),
}


def _nanmean(x, axis=None):
    with warnings.catch_warnings():  # an all-NaN slice stays NaN, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def mean_table(dice: np.ndarray) -> np.ndarray:
    """Per-case Dice ``(n_seeds, n_cases, 15, 3)`` -> the ``(15, 3)`` mean over seeds and cases (NaN skipped)."""
    d = np.asarray(dice, dtype=np.float64)
    return _nanmean(d.reshape(-1, *d.shape[-2:]), axis=0)


def group_means(dice: np.ndarray, group: str = "all", regions: Sequence[str] = REGIONS) -> np.ndarray:
    """Each case's mean Dice over a subset group and some regions.

    ``dice``: ``(n_seeds, n_cases, 15, 3)`` (or ``(n_cases, 15, 3)`` for one seed) -> ``(n_seeds, n_cases)``.
    """
    d = np.asarray(dice, dtype=np.float64)
    if d.ndim == 3:
        d = d[None]
    if d.ndim != 4 or d.shape[2:] != (len(SUBSETS), len(REGIONS)):
        raise ValueError(f"expected per-case Dice (n_seeds, n_cases, 15, 3), got {d.shape}")
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; expected one of {sorted(GROUPS)}")
    r = [REGIONS.index(x) for x in regions]
    return _nanmean(d[:, :, GROUPS[group][1]][..., r], axis=(2, 3))


def bootstrap_interval(values: np.ndarray, level: float = 0.95, n_boot: int = 4000,
                       seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` ``(n_seeds, n_cases)`` and a percentile bootstrap interval for it.

    Resamples seeds with replacement, then cases with replacement within the drawn seeds (one seed:
    cases only). Returns ``(mean, low, high)``; with a single value the interval is that value.
    Deterministic (``seed``).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[None]
    mean = float(_nanmean(v))
    n_s, n_c = v.shape
    if n_s * n_c <= 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    s_idx = rng.integers(0, n_s, size=(n_boot, n_s)) if n_s > 1 else np.zeros((n_boot, 1), int)
    c_idx = rng.integers(0, n_c, size=(n_boot, n_s, n_c))
    draws = _nanmean(v[s_idx[..., None], c_idx], axis=(1, 2))
    a = (1 - level) / 2
    lo, hi = np.nanquantile(draws, [a, 1 - a])
    return mean, float(lo), float(hi)


@dataclass
class Comparison:
    """Model a vs model b on one subset group: means, the paired difference and its interval."""

    group: str
    regions: tuple[str, ...]
    a: float
    b: float | None
    diff: float | None = None
    low: float | None = None  # bounds of the bootstrap interval of ``diff`` (or of ``a`` alone)
    high: float | None = None
    level: float = 0.95
    n_seeds: int = 1
    n_cases: int = 1
    seed_diffs: list[float] = field(default_factory=list)

    @property
    def excludes_zero(self) -> bool:
        return self.diff is not None and (self.low > 0 or self.high < 0)


def compare(a: np.ndarray, b: np.ndarray | None, group: str = "all", regions: Sequence[str] = REGIONS,
            level: float = 0.95, seed: int = 0) -> Comparison:
    """Compare two models' per-case Dice ``(n_seeds, n_cases, 15, 3)``, paired by seed and case.

    With ``b`` None, the interval is that of model a's mean Dice.
    """
    pa = group_means(a, group, regions)
    if b is None:
        mean, lo, hi = bootstrap_interval(pa, level, seed=seed)
        return Comparison(group, tuple(regions), mean, None, None, lo, hi, level, *pa.shape)
    pb = group_means(b, group, regions)
    if pa.shape != pb.shape:
        raise ValueError(f"the two models were scored on different seeds / cases: {pa.shape} vs {pb.shape}")
    d = pa - pb
    diff, lo, hi = bootstrap_interval(d, level, seed=seed)
    return Comparison(group, tuple(regions), float(_nanmean(pa)), float(_nanmean(pb)), diff, lo, hi, level,
                      *d.shape, seed_diffs=[float(x) for x in _nanmean(d, axis=1)])


def num(x: float, signed: bool = False) -> str:
    """3 decimals, or 2 significant digits for tiny values (an interval of ±0.0004 is not ±0.000)."""
    if x != 0 and abs(x) < 0.005:
        return f"{x:+.1e}" if signed else f"{x:.1e}"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def describe(c: Comparison, what: str, labels: Sequence[str] = ("LCKD", "no-KD")) -> str:
    """One sentence about a :class:`Comparison` that says no more than its interval supports."""
    pct = f"{round(100 * c.level)} %"
    over = (f"{c.n_cases} held-out case(s) × {c.n_seeds} seed(s)")
    if c.diff is None:
        return f"{what}: mean Dice {num(c.a)}, {pct} interval [{num(c.low)}, {num(c.high)}] over {over}."
    head = f"{what}: {labels[0]} − {labels[1]} = {num(c.diff, True)}, {pct} interval [{num(c.low, True)}, {num(c.high, True)}] (bootstrap over {over}"
    head += (f"; per seed {', '.join(num(v, True) for v in c.seed_diffs)})" if c.n_seeds > 1 else ")")
    if c.n_cases * c.n_seeds < 2:
        return head + ": one case and one seed give no estimate of the noise."
    if c.excludes_zero:
        better = labels[0] if c.diff > 0 else labels[1]
        verdict = f": the interval excludes zero, so on these phantoms {better} scores higher"
    else:
        verdict = ": the interval includes zero, so this is not evidence of a difference"
    if c.n_seeds == 1:
        verdict += "; one seed says nothing about seed-to-seed variation (run more seeds)"
    return head + verdict + "."


def convention_cells(truth_empty: np.ndarray, a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Which cells of a 15-subset table rest on cases whose truth lacks the region.

    There, Dice is 1 or 0 by convention (empty vs empty, or stray voxels vs empty), not an overlap.

    Args:
        truth_empty: ``(n_cases, 3)`` bool, the region is absent from the case's ground truth.
        a, b: per-case Dice ``(n_seeds, n_cases, 15, 3)`` of one model, or of two compared models.

    Returns:
        ``(15, 3)`` bool: for one model, any such case; for a difference, any such case whose score
        differs between the models (it moves the difference by a whole 1/n_cases).
    """
    e = np.asarray(truth_empty, bool)  # (C, 3)
    a = np.asarray(a, np.float64)
    a = a[None] if a.ndim == 3 else a
    if b is None:
        return np.broadcast_to(e.any(0)[None, :], (len(SUBSETS), len(REGIONS))).copy()
    b = np.asarray(b, np.float64)
    b = b[None] if b.ndim == 3 else b
    moved = (np.abs(a - b) > 1e-9) & e[None, :, None, :]  # (S, C, 15, 3)
    return moved.any(axis=(0, 1))


__all__ = ["GROUPS", "mean_table", "group_means", "bootstrap_interval", "Comparison", "compare", "describe", "num",
           "convention_cells"]
