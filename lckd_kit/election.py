"""Teacher election: which single modality segments each region best?

LCKD's teachers are not fixed: every few thousand steps the network is asked to segment the
validation cases from ONE modality at a time. For each region (ET, TC, WT) the modality with the
highest Dice wins; the teachers are the union of the winners (1 to 3 modalities). The
distillation loss then pulls every available modality's bottleneck feature toward the teachers'.

Reference (``train.py:validate``): soft Dice on probabilities, summed over cases, argmax with ties
to the lowest modality index. Differences here, all documented options:

* ``metric="hard"`` (default) thresholds at 0.5 and scores empty-vs-empty as 1 -- the metric the
  model is finally judged on. ``metric="soft"`` is the reference's ``2Σpt/(Σp+Σt+1)``.
* Dice is averaged over cases (the reference sums; same argmax, readable numbers).
* The four single-modality predictions come from one encoding per window
  (:func:`lckd_kit.inference.predict_subsets`), much cheaper than four separate passes.
* The model is put in ``eval()`` mode (the reference never does; harmless for InstanceNorm).

Distributed (DDP) training: each rank scores its own shard of the cases and passes
``reduce=lckd_kit.distributed.all_reduce_sum``; the per-case Dice sums and the case count are
summed over ranks before dividing, so every rank gets the same scores and teachers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from lckd_kit import ALL_PRESENT, MODALITIES, REGIONS
from lckd_kit.inference import predict_subsets
from lckd_kit.metrics import hard_dice, soft_dice

#: the four single-modality subsets, in MODALITIES order
SINGLES: tuple[tuple[bool, ...], ...] = tuple(tuple(i == m for i in range(4)) for m in range(4))


@dataclass
class ElectionResult:
    """Outcome of one election.

    Attributes:
        scores: ``(4, 3)`` mean Dice, modality x region (MODALITIES x REGIONS order).
        winners: region name -> index of the winning modality.
        teachers: ``(4,)`` bool mask, the union of the winners.
        metric: ``"hard"`` or ``"soft"``.
        step: training step of the election (None outside training).
        all_dice: ``(3,)`` hard Dice of the all-modality prediction on the same cases, computed
            from the same encodings (free); None if not requested.
        n_cases: number of cases scored.
    """

    scores: np.ndarray
    winners: dict[str, int]
    teachers: tuple[bool, ...]
    metric: str = "hard"
    step: int | None = None
    all_dice: np.ndarray | None = None
    n_cases: int = 0

    @property
    def teacher_names(self) -> list[str]:
        return [m for m, on in zip(MODALITIES, self.teachers) if on]

    def to_record(self) -> dict:
        """JSON-able history record (``kind="election"``)."""
        rec = {
            "kind": "election",
            "step": self.step,
            "metric": self.metric,
            "n_cases": self.n_cases,
            "scores": [[round(float(v), 6) for v in row] for row in self.scores],
            "winners": {r: MODALITIES[i] for r, i in self.winners.items()},
            "teachers": self.teacher_names,
        }
        if self.all_dice is not None:
            rec["all_dice"] = {r: round(float(v), 6) for r, v in zip(REGIONS, self.all_dice)}
        return rec

    @classmethod
    def from_record(cls, rec: dict) -> "ElectionResult":
        """Inverse of :meth:`to_record` (e.g. elections stored in a checkpoint)."""
        teachers = tuple(m in rec["teachers"] for m in MODALITIES)
        all_dice = rec.get("all_dice")
        return cls(
            scores=np.asarray(rec["scores"], dtype=np.float64),
            winners={r: MODALITIES.index(m) for r, m in rec["winners"].items()},
            teachers=teachers,
            metric=rec.get("metric", "hard"),
            step=rec.get("step"),
            all_dice=None if all_dice is None else np.asarray([all_dice[r] for r in REGIONS]),
            n_cases=rec.get("n_cases", 0),
        )

    def __str__(self) -> str:
        head = f"election ({self.metric} Dice, {self.n_cases} cases" + (
            f", step {self.step})" if self.step is not None else ")")
        lines = [head, f"{'':>7}" + "".join(f"{r:>8}" for r in REGIONS)]
        for m, name in enumerate(MODALITIES):
            cells = "".join(
                f"{self.scores[m, r]:>7.3f}{'*' if self.winners[reg] == m else ' '}"
                for r, reg in enumerate(REGIONS))
            lines.append(f"{name:>7}{cells}")
        if self.all_dice is not None:
            lines.append(f"{'all':>7}" + "".join(f"{v:>7.3f} " for v in self.all_dice))
        lines.append("teachers: " + ", ".join(self.teacher_names) + "   (* = winner)")
        return "\n".join(lines)


def winners_from_scores(scores: np.ndarray) -> tuple[dict[str, int], tuple[bool, ...]]:
    """Per-region argmax over modalities (ties -> lowest index, as ``list.index(max)``) and their union.

    Args: scores ``(4, 3)`` modality x region. Returns (winners, teachers mask).
    """
    scores = np.asarray(scores)
    # np.argmax returns the first maximum, i.e. the reference's tie rule
    winners = {reg: int(np.argmax(scores[:, r])) for r, reg in enumerate(REGIONS)}
    teachers = tuple(m in winners.values() for m in range(len(MODALITIES)))
    return winners, teachers


def scoring_case(case, model_config) -> dict:
    """A whole case as :func:`elect_teachers` scores it: resampled to the model's voxel size
    (``model_config.spacing``, regions too), then normalised there as in training -- the order every
    other path takes (``inference.model_input``). ``case``: anything ``data.as_case`` reads; raw
    intensities, or a case that says it is ``"normalized"`` (left as it is, as ``model_input`` does).
    Returns ``{"name", "image" (4, *grid), "label" (3, *grid)}``."""
    from lckd_kit.batches import at_spacing
    from lckd_kit.data import as_case
    from lckd_kit.transforms import normalize_image

    d = at_spacing(as_case(case), model_config.spacing)
    image = d["image"] if d["normalized"] else normalize_image(d["image"], model_config.normalization)
    return {"name": d["name"], "image": image, "label": d["label"]}


def elect_teachers(
    model: torch.nn.Module,
    cases: Sequence[dict],
    roi_size: Sequence[int] | None = None,
    overlap: float = 1 / 3,
    metric: str = "hard",
    device: torch.device | str | None = None,
    progress: bool = False,
    step: int | None = None,
    average: str = "probs",
    include_all: bool = True,
    sw_batch_size: int = 1,
    amp: bool = False,
    crop_foreground: bool = True,
    reduce: Callable[[np.ndarray], np.ndarray] | None = None,
) -> ElectionResult:
    """Elect the teacher modalities of ``model`` on ``cases``.

    Args:
        model: an ``LCKDNet``; temporarily switched to ``eval()``, its mode is restored afterwards.
        cases: dicts with a normalised ``"image"`` ``(4, X, Y, Z)`` and a ``"label"`` ``(3, X, Y, Z)``
            (ET, TC, WT) on the model's grid: :func:`scoring_case` makes them from any case.
        roi_size, overlap, sw_batch_size, average, amp, crop_foreground: passed to
            :func:`predict_subsets` (the reference's election averaged logits: ``average="logits"``).
        metric: ``"hard"`` (thresholded Dice, empty-vs-empty = 1; default) or ``"soft"`` (reference).
        device: where the model runs (default: its device).
        progress: tqdm bar over cases.
        step: stored in the result (training step).
        include_all: also decode the all-modality subset from the same encodings and store its
            hard Dice in ``result.all_dice`` (training uses it as the validation score).
        reduce: sums a float64 array over processes (``lckd_kit.distributed.all_reduce_sum``);
            then ``cases`` is this process's shard (possibly empty) and the result covers all
            shards, identical on every process. Every process must call it (a collective).

    Returns:
        :class:`ElectionResult` with ``scores`` ``(4, 3)`` = mean Dice over cases.
    """
    if metric not in ("hard", "soft"):
        raise ValueError(f"metric must be 'hard' or 'soft', got {metric!r}")
    if not cases and reduce is None:
        raise ValueError("election needs at least one labelled case")
    subsets = list(SINGLES) + ([ALL_PRESENT] if include_all else [])
    was_training = model.training
    model.eval()
    scores = np.zeros((4, 3))
    all_dice = np.zeros(3)
    try:
        it = cases
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(cases, desc="election", leave=False)
        for case in it:
            if case.get("label") is None:
                raise ValueError(f"case {case.get('name', '?')} has no label; election needs labels")
            prob = predict_subsets(model, case["image"], subsets, roi_size=roi_size, overlap=overlap,
                                   sw_batch_size=sw_batch_size, device=device, average=average, amp=amp,
                                   crop_foreground=crop_foreground)
            target = torch.as_tensor(np.asarray(case["label"])).bool()[None]  # (1, 3, X, Y, Z)
            hard = hard_dice(prob > 0.5, target)  # (n_subsets, 3)
            per = soft_dice(prob, target) if metric == "soft" else hard
            scores += per[:4].double().numpy()
            if include_all:
                all_dice += hard[4].double().numpy()
    finally:
        model.train(was_training)
    n = len(cases)
    if reduce is not None:  # one reduction: [12 scores, 3 all-modality Dice, case count]
        total = reduce(np.concatenate([scores.ravel(), all_dice, [n]]))
        scores, all_dice, n = total[:12].reshape(4, 3), total[12:15], int(round(total[15]))
        if n == 0:  # the same on every rank, so all raise together
            raise ValueError("election needs at least one labelled case (none on any rank)")
    scores /= n
    winners, teachers = winners_from_scores(scores)
    return ElectionResult(scores=scores, winners=winners, teachers=teachers, metric=metric, step=step,
                          all_dice=all_dice / n if include_all else None, n_cases=n)
