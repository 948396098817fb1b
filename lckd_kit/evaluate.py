"""The 15-subset evaluation: Dice and HD95 of a model for every set of available modalities.

    result = evaluate(model, cases)          # one sliding-window pass per case, all 15 subsets
    result.dice_table()                      # (15, 3) mean Dice, rows SUBSETS, columns ET, TC, WT
    result.save("runs/x/eval")               # results.json / .csv, table.md, heatmap.png

Predictions come from :func:`lckd_kit.inference.predict_subsets` (each window encoded once, every
subset decoded), scores from :mod:`lckd_kit.metrics`.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lckd_kit import MODALITIES, REGIONS, SUBSETS, as_mask, subset_name
from lckd_kit.data import as_case
from lckd_kit.inference import default_roi, model_config, predict_volume
from lckd_kit.metrics import (HD95_FLAVOUR, METRIC_CONVENTIONS, as_spacing, check_convention, missing_penalty,
                              postprocess_et, score_regions)

EVAL_FORMAT = "lckd_kit.eval/1"

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
            ``hd95`` (mm), ``postprocessed`` (bool), ``convention``, ``truth_empty`` (the region is
            absent from the case's ground truth).
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

    def truth_empty(self) -> np.ndarray:
        """``(n_cases, 3)`` bool: the region is absent from the case's ground truth (its Dice is then
        1 or 0 by convention, not an overlap; see ``stats.convention_cells``)."""
        cases = {c: i for i, c in enumerate(self.cases)}
        out = np.zeros((len(cases), len(REGIONS)), bool)
        for r in self.rows:
            out[cases[r["case"]], REGIONS.index(r["region"])] = bool(r.get("truth_empty", False))
        return out

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


def _spacing_of(case: dict, ndim: int) -> tuple[float, ...]:
    if case.get("spacing") is not None:
        return as_spacing(case["spacing"], ndim)
    warnings.warn(f"case {case.get('name', '?')}: no spacing or affine, HD95 assumes 1 mm voxels", stacklevel=3)
    return (1.0,) * ndim


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
    crop_foreground: bool = True,
    nested: bool = True,
    mode: str = "constant",
    average: str = "probs",
    amp: bool = False,
    hd95: bool = True,
) -> EvalResult:
    """Dice and HD95 of ``model`` on ``cases`` for every modality subset.

    Per case, ONE :func:`~lckd_kit.inference.predict_volume` call (the case resampled to the model's
    voxel size when it differs; each sliding window encoded once and every subset decoded);
    probabilities are averaged over windows (reference ``eval.py``), mapped back onto the case's
    grid, thresholded at 0.5, made nested (``nested``: TC |= ET, WT |= TC, as the label map the
    reference writes), and scored per region on the case's own grid with ``metrics.score_regions``.

    Args:
        model: an ``LCKDNet``; switched to ``eval()`` for the call, its mode restored afterwards.
        cases: labelled cases in any form ``data.as_case`` reads (``Case`` objects, folders, loaded
            dicts); images are normalised here unless the dict says they already are.
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
    check_convention(convention)
    masks = [as_mask(s) for s in subsets]
    if not masks:
        raise ValueError("no subsets to evaluate")
    if not len(cases):
        raise ValueError("no cases to evaluate")
    cfg = model_config(model)
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
            case = as_case(case)
            if case["label"] is None:
                raise ValueError(f"case {case['name']} has no label: evaluation needs one")
            pred = predict_volume(model, case, masks, roi_size=roi_size, overlap=overlap, sw_batch_size=sw_batch_size,
                                  device=device, mode=mode, average=average, amp=amp, crop_foreground=crop_foreground)
            truth = torch.as_tensor(np.asarray(case["label"])).bool()
            empty = [not bool(t.any()) for t in truth]
            spacing = _spacing_of(case, truth.ndim - 1)
            penalties.add(round(missing_penalty(truth.shape[1:], spacing, convention, penalty), 4))
            for i, m in enumerate(masks):  # one subset at a time: on a 1 mm scan each is ~100 MB
                # reference: np.around(prob), so exactly 0.5 -> 0; nested as the label map it writes
                p = pred.regions(i) if nested else pred[i] > 0.5
                variants = [(False, p)] + ([(True, postprocess_et(p, spacing, et_min_voxels))] if postprocess else [])
                for pp, v in variants:
                    dice, dist = score_regions(v[None], truth, spacing, convention, penalty, hd95=hd95)
                    for r, region in enumerate(REGIONS):
                        rows.append({"case": case["name"], "subset": subset_name(m), "mask": list(m), "region": region,
                                     "dice": float(dice[0, r]), "hd95": float(dist[0, r]), "postprocessed": pp,
                                     "convention": convention, "truth_empty": empty[r]})
            roi = roi_size or default_roi(model, pred.model_grid.shape[2:])
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
