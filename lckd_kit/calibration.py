"""How close is a phantom-trained model to a model trained on real scans? The 15-subset Dice table.

A missing-modality model's Dice over the 15 subsets of {FLAIR, T1, T1ce, T2} says how much each
modality reveals about each region. On real BraTS scans the pattern is well known (published
tables of RFNet and mmFormer, bundled as ``resources/published_dice_brats2018.csv``): T1ce carries
the enhancing tumour, FLAIR the whole tumour, and every other modality still finds a good part of
each region. Phantoms that reveal too little (or too much) outside their "teacher" modality teach
a model a different table. This module measures that:

    ref = published_table("mmFormer")                 # (15, 3) fractions, SUBSETS x REGIONS
    cmp = compare(my_table, ref)                      # per-cell differences, Spearman, MAE, summary
    print(cmp.markdown())
    res = calibrate(steps=600, cues=1.0)              # train the demo schedule on phantoms, compare
    print(res.markdown())

Tables are ``(15, 3)`` arrays of Dice in [0, 1]: rows in :data:`lckd_kit.SUBSETS` order, columns
:data:`lckd_kit.REGIONS` (ET, TC, WT).
"""
from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Mapping

import numpy as np

from lckd_kit import MODALITIES, REGIONS, SUBSETS, subset_name

__all__ = [
    "PUBLISHED_FILE",
    "SUMMARY_ROWS",
    "published_methods",
    "published_table",
    "summary",
    "Comparison",
    "compare",
    "side_by_side_markdown",
    "CalibrationResult",
    "calibrate",
    "demo_recipe",
]

#: bundled published tables (BraTS 2018, RFNet and mmFormer; source in the file's header)
PUBLISHED_FILE = "published_dice_brats2018.csv"

_T1CE = MODALITIES.index("t1ce")
_NO_T1CE = [i for i, s in enumerate(SUBSETS) if not s[_T1CE]]


def _single(mod: str) -> int:
    return SUBSETS.index(tuple(m == mod for m in MODALITIES))


#: the "what does a model learn from the other modalities" rows: name -> (region, subset rows).
#: ET / TC without T1ce average the 7 subsets that lack T1ce; the WT rows are single modalities.
SUMMARY_ROWS: dict[str, tuple[str, list[int]]] = {
    "ET without T1ce (mean of 7 subsets)": ("ET", _NO_T1CE),
    "TC without T1ce (mean of 7 subsets)": ("TC", _NO_T1CE),
    "WT from T1 alone": ("WT", [_single("t1")]),
    "WT from T1ce alone": ("WT", [_single("t1ce")]),
    "WT from FLAIR alone": ("WT", [_single("flair")]),
}


def _read_published() -> list[dict]:
    text = (resources.files("lckd_kit") / "resources" / PUBLISHED_FILE).read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return list(csv.DictReader(io.StringIO("\n".join(lines))))


def published_methods(dataset: str = "BraTS2018") -> list[str]:
    """Methods with a table in the bundled file for ``dataset``, in file order."""
    return list(dict.fromkeys(r["method"] for r in _read_published() if r["dataset"] == dataset))


def published_table(method: str = "mmFormer", dataset: str = "BraTS2018") -> np.ndarray:
    """Published mean Dice of ``method`` on real ``dataset`` scans: ``(15, 3)`` float, SUBSETS x REGIONS.

    The file's percentages become fractions, and its rows (any subset order, regions as rows) are
    put in the kit's order. Raises ValueError for an unknown method/dataset or an incomplete table.
    """
    out = np.full((len(SUBSETS), len(REGIONS)), np.nan)
    for r in _read_published():
        if r["dataset"] == dataset and r["method"] == method:
            mask = tuple(r[m] == "1" for m in MODALITIES)
            out[SUBSETS.index(mask), REGIONS.index(r["region"])] = float(r["dice_percent"]) / 100.0
    if np.isnan(out).all():
        known = sorted({(r["dataset"], r["method"]) for r in _read_published()})
        raise ValueError(f"no published table for {method!r} on {dataset!r}; known: {known}")
    if np.isnan(out).any():
        raise ValueError(f"published table for {method!r} on {dataset!r} is incomplete")
    return out


def _check_table(table, what: str = "table") -> np.ndarray:
    t = np.asarray(table, dtype=float)
    if t.shape != (len(SUBSETS), len(REGIONS)):
        raise ValueError(f"{what} must be (15, 3) (SUBSETS x ET/TC/WT), got {t.shape}")
    return t


def summary(table) -> dict[str, float]:
    """The :data:`SUMMARY_ROWS` of a ``(15, 3)`` table: name -> Dice."""
    t = _check_table(table)
    return {name: float(np.mean(t[rows, REGIONS.index(region)])) for name, (region, rows) in SUMMARY_ROWS.items()}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


@dataclass
class Comparison:
    """A Dice table against a reference table (both ``(15, 3)``, SUBSETS x REGIONS).

    ``difference`` = table - reference per cell; ``spearman``: rank correlation over the 45 cells;
    ``mae``: mean absolute difference over the 45 cells; ``summary`` / ``reference_summary``: the
    :data:`SUMMARY_ROWS` of each. The 45-cell Spearman is mostly the regions' order (WT above TC
    above ET in any sensible table), so two numbers put it in scale: ``spearman_within``, the mean
    over ET, TC and WT of the rank correlation over that region's 15 subsets (what a model learned
    about the modalities), and ``spearman_regions_only``, the 45-cell Spearman that a table knowing
    only which region a cell is in would score against this reference. A region whose 15 values are
    all equal (a model that never predicts it) has no rank order: ``spearman_within`` is then NaN.
    """

    table: np.ndarray
    reference: np.ndarray
    name: str = "phantom"
    reference_name: str = "reference"
    difference: np.ndarray = field(init=False)
    spearman: float = field(init=False)
    spearman_within: float = field(init=False)
    spearman_regions_only: float = field(init=False)
    mae: float = field(init=False)
    summary: dict = field(init=False)
    reference_summary: dict = field(init=False)

    def __post_init__(self):
        self.table = _check_table(self.table, "table")
        self.reference = _check_table(self.reference, "reference")
        self.difference = self.table - self.reference
        self.spearman = _spearman(self.table.ravel(), self.reference.ravel())
        self.spearman_within = float(np.mean([_spearman(self.table[:, r], self.reference[:, r])
                                              for r in range(len(REGIONS))]))
        regions_only = np.broadcast_to(self.reference.mean(axis=0), self.reference.shape)
        self.spearman_regions_only = _spearman(regions_only.ravel(), self.reference.ravel())
        self.mae = float(np.mean(np.abs(self.difference)))
        self.summary = summary(self.table)
        self.reference_summary = summary(self.reference)

    def to_dict(self) -> dict:
        """JSON-able: tables as nested lists, the scores and both summaries."""
        return dict(name=self.name, reference_name=self.reference_name, spearman=self.spearman, mae=self.mae,
                    spearman_within=self.spearman_within, spearman_regions_only=self.spearman_regions_only,
                    table=np.round(self.table, 4).tolist(), reference=np.round(self.reference, 4).tolist(),
                    summary=self.summary, reference_summary=self.reference_summary)

    def markdown(self, extra: Mapping[str, np.ndarray] | None = None) -> str:
        """Side-by-side table (reference, any ``extra`` tables, this table, difference) + summary."""
        tables = {self.reference_name: self.reference, **dict(extra or {}), self.name: self.table}
        lines = [side_by_side_markdown(tables, diff=(self.name, self.reference_name)), "",
                 f"Spearman over the 45 cells: {self.spearman:.3f}; mean absolute difference: {self.mae:.3f}",
                 f"(For scale: within a region, over its 15 subsets, mean of ET, TC, WT: {self.spearman_within:.3f}; "
                 f"a table that knows only each cell's region: {self.spearman_regions_only:.3f} over the 45 cells.)",
                 "",
                 f"| what a model learns | {' | '.join(tables)} |",
                 "|---|" + "--:|" * len(tables)]
        sums = {k: summary(v) for k, v in tables.items()}
        for row in SUMMARY_ROWS:
            lines.append(f"| {row} | " + " | ".join(f"{sums[k][row]:.3f}" for k in tables) + " |")
        return "\n".join(lines)


def compare(table, reference=None, name: str = "phantom", reference_name: str | None = None) -> Comparison:
    """Compare a ``(15, 3)`` Dice table with ``reference``: a method name of the bundled published
    tables (default ``"mmFormer"``, BraTS 2018) or a ``(15, 3)`` array."""
    if reference is None or isinstance(reference, str):
        method = reference or "mmFormer"
        return Comparison(table, published_table(method), name, reference_name or f"{method} (BraTS 2018)")
    return Comparison(table, reference, name, reference_name or "reference")


def side_by_side_markdown(tables: Mapping[str, np.ndarray], diff: tuple[str, str] | None = None) -> str:
    """One markdown row per subset and region: the Dice of every table in ``tables`` (name -> (15, 3)),
    and, with ``diff=(a, b)``, the difference a - b."""
    tables = {k: _check_table(v, k) for k, v in tables.items()}
    head = ["subset", "region", *tables] + ([f"{diff[0]} - {diff[1]}"] if diff else [])
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "--:|" * (len(head) - 2)]
    for r, region in enumerate(REGIONS):
        for s, mask in enumerate(SUBSETS):
            cells = [f"{t[s, r]:.3f}" for t in tables.values()]
            if diff:
                cells.append(f"{tables[diff[0]][s, r] - tables[diff[1]][s, r]:+.3f}")
            lines.append(f"| {subset_name(mask)} | {region} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# measuring a phantom set: train the shipped schedule, evaluate on held-out phantoms, compare
# --------------------------------------------------------------------------------------------
#: step count -> train config overrides of small2d: 3000 is the shipped checkpoint's schedule,
#: 600 the demo's (small2d's own schedule)
RECIPES: dict[int, dict] = {
    3000: dict(stage1_steps=1500, stage2_steps=1500, elect_every=500, augment="scanner"),
    600: dict(stage1_steps=300, stage2_steps=300, elect_every=150),
}


def demo_recipe(steps: int) -> dict:
    """The demo's recipe (``RECIPES[600]``) run for ``steps`` steps, half in each stage: what a longer
    (or shorter) training changes in the table (``docs/phantoms.md``, the steps table)."""
    if steps < 2 or steps % 2:
        raise ValueError(f"steps must be an even number >= 2 (half per stage), got {steps}")
    return dict(RECIPES[600], stage1_steps=steps // 2, stage2_steps=steps // 2)


@dataclass
class CalibrationResult:
    """What :func:`calibrate` measured: the phantom model's table, its comparison with the published
    tables, the elections (list of ``{"step", "winners", "teachers", "scores"}``), the per-case
    Dice ``(n_cases, 15, 3)`` with the case names, and the wall time (s)."""

    table: np.ndarray
    comparison: Comparison
    others: dict[str, Comparison]
    elections: list[dict]
    params: dict
    wall_s: float
    per_case: np.ndarray | None = None
    cases: list[str] = field(default_factory=list)
    model: object = field(default=None, repr=False)  # the trained network (not serialised)

    @property
    def final_winners(self) -> dict[str, str]:
        """Region -> modality elected at the last election."""
        return dict(self.elections[-1]["winners"]) if self.elections else {}

    @property
    def all_modalities(self) -> dict[str, float]:
        """Dice of the all-modality subset, region -> value."""
        return {r: float(v) for r, v in zip(REGIONS, self.table[-1])}

    def to_dict(self) -> dict:
        return dict(params=self.params, wall_s=round(self.wall_s, 1), spearman=self.comparison.spearman,
                    spearman_within=self.comparison.spearman_within, mae=self.comparison.mae,
                    summary=self.comparison.summary, elections=self.elections,
                    final_winners=self.final_winners, all_modalities=self.all_modalities,
                    table=np.round(self.table, 4).tolist(), cases=list(self.cases),
                    per_case=None if self.per_case is None else np.round(self.per_case, 4).tolist(),
                    others={k: dict(spearman=c.spearman, mae=c.mae) for k, c in self.others.items()})

    def markdown(self) -> str:
        extra = {c.reference_name: c.reference for c in self.others.values()}
        text = [self.comparison.markdown(extra=extra), ""]
        for c in self.others.values():
            text.append(f"Against {c.reference_name}: Spearman {c.spearman:.3f}, mean absolute difference {c.mae:.3f}.")
        text.append("Final election: " + ", ".join(f"{r} -> {m}" for r, m in self.final_winners.items())
                    + "; all modalities: " + ", ".join(f"{r} {v:.3f}" for r, v in self.all_modalities.items()) + ".")
        return "\n".join(text)


def calibrate(steps: int = 3000, cues: float = 1.0, seed: int = 0, n_train: int = 24, n_test: int = 6,
              grid: int = 96, cache_dir: str | os.PathLike | None = None, device="cpu", progress: bool = True,
              reference: str = "mmFormer", train_overrides: dict | None = None) -> CalibrationResult:
    """Train the kit's small2d LCKD recipe on phantoms made with ``cues`` and compare its held-out
    15-subset Dice table with the published real-scan tables.

    ``steps``: 3000 (the shipped checkpoint's schedule: 1500 + 1500 steps, election every 500) or
    600 (the demo's: 300 + 300, election every 150); ``train_overrides`` replaces the recipe.
    Training data: ``phantom.ensure_phantoms(n_train, seed=0, cues=cues)``; test data: the held-out
    set (seed 1000, ``experiment.heldout_phantoms``), evaluated on the brain's bounding box without
    HD95. The comparison is against ``reference`` (bundled published table); the other bundled
    methods come in ``others``. Takes minutes on a CPU (see ``docs/phantoms.md``).
    """
    from lckd_kit import phantom
    from lckd_kit.evaluate import evaluate
    from lckd_kit.experiment import heldout_phantoms, load_eval_cases
    from lckd_kit.train import get_train_config, train

    if train_overrides is None:
        if steps not in RECIPES:
            raise ValueError(f"steps must be one of {sorted(RECIPES)} (or pass train_overrides), got {steps}")
        train_overrides = RECIPES[steps]
    t0 = time.perf_counter()
    cfg = get_train_config("small2d", **{**train_overrides, "seed": seed})
    train_dir = phantom.ensure_phantoms(n_train, seed=0, grid=grid, cache_dir=cache_dir, cues=cues, progress=progress)
    result = train(cfg, train_dir, out_dir=None, device=device, progress=progress)
    params = dict(steps=cfg.total_steps, cues=float(cues), seed=seed, n_train=n_train, n_test=n_test, grid=grid,
                  train_overrides=dict(train_overrides), generator_version=phantom.GENERATOR_VERSION)
    out = calibrate_model(result.model, cues=cues, n_test=n_test, grid=grid, cache_dir=cache_dir, device=device,
                          progress=progress, reference=reference, elections=result.elections, params=params,
                          label=f"phantom model (cues {cues:g}, {cfg.total_steps} steps)", train_dir=train_dir)
    out.wall_s = time.perf_counter() - t0
    return out


def calibrate_model(model, cues: float = 1.0, n_test: int = 6, grid: int = 96,
                    cache_dir: str | os.PathLike | None = None, device="cpu", progress: bool = True,
                    reference: str = "mmFormer", elections=(), params: dict | None = None,
                    label: str = "phantom model", train_dir: str | os.PathLike | None = None) -> CalibrationResult:
    """The calibration of a model already trained (the shipped checkpoint, say): its 15-subset table
    on the held-out phantoms of ``cues`` (brain bounding box, no HD95) against the published tables.
    ``elections``: the training's :class:`~lckd_kit.election.ElectionResult` list or their records
    (e.g. a checkpoint's ``"elections"``); ``train_dir``: checked for shared case seeds."""
    from lckd_kit import phantom
    from lckd_kit.evaluate import evaluate
    from lckd_kit.experiment import heldout_phantoms, load_eval_cases

    t0 = time.perf_counter()
    test_dir = heldout_phantoms(n_test, grid=grid, cache_dir=cache_dir, progress=progress, train_dir=train_dir,
                                cues=cues)
    ev = evaluate(model, load_eval_cases(test_dir), device=device, crop_foreground=True, hd95=False)
    table = ev.dice_table()
    main = compare(table, reference, name=label)
    others = {m: compare(table, m, name=label) for m in published_methods() if m != reference}
    records = [e.to_record() if hasattr(e, "to_record") else dict(e) for e in elections]
    elections = [dict(step=e["step"], winners=dict(e["winners"]), teachers=e["teachers"],
                      scores=np.round(np.asarray(e["scores"]), 4).tolist()) for e in records]
    params = dict(params or {}, cues=float(cues), n_test=n_test, grid=grid, generator_version=phantom.GENERATOR_VERSION)
    return CalibrationResult(table, main, others, elections, params, time.perf_counter() - t0,
                             per_case=ev.per_case("dice"), cases=ev.cases, model=model)
