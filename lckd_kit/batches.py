"""Training batches as pure functions of the step: which cases, which crops, which modality subset.

Every step's batch depends on nothing but ``(config.seed, step)``:

* cases -- a walk through seeded per-epoch permutations (:func:`case_indices`);
* crops and augmentations -- the random part of the MONAI pipeline, re-seeded from
  ``(seed, step, case position)`` before each sample;
* the stage-2 modality subset -- the reference's draw (:func:`sample_subset`) from
  ``np.random.default_rng([seed, step, 2])``.

Nothing random carries over from one step to the next, so a run resumed from a checkpoint sees the
batches an uninterrupted run would (and under DDP, N ranks with batch B see exactly the samples of
one process with batch N·B).
"""
from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
from monai.transforms import Compose, Randomizable

from lckd_kit import ALL_PRESENT, MODALITIES, subset_name
from lckd_kit.data import Case, as_case, find_cases
from lckd_kit.transforms import resampling_for, train_transforms


def sample_subset(rng: np.random.Generator) -> tuple[bool, ...]:
    """The reference's random-missing draw: keep k ~ U{1,2,3} modalities, then a uniform k-subset.

    Each single has probability 1/12, each pair 1/18, each triple 1/12; never all four.
    """
    k = int(rng.integers(1, 4))
    keep = rng.choice(len(MODALITIES), size=k, replace=False)
    return tuple(m in keep for m in range(len(MODALITIES)))


def training_cases(data: str | os.PathLike | Sequence) -> list:
    """The labelled cases of ``data``: a folder gives ``Case`` objects (read when first drawn), a
    list of cases in any form ``data.as_case`` reads gives case dicts with raw images.
    Unlabelled cases cannot be trained on: they are left out with a warning naming them."""
    items = find_cases(data) if isinstance(data, (str, os.PathLike)) else [
        c if isinstance(c, Case) else as_case(c) for c in data]
    has_label = [c.labelled if isinstance(c, Case) else c["label"] is not None for c in items]
    labelled = [c for c, ok in zip(items, has_label) if ok]
    if not labelled:
        raise ValueError(f"no labelled cases {'under ' + str(data) if isinstance(data, (str, os.PathLike)) else 'given'}"
                         f": training needs label files")
    if len(labelled) < len(items):
        skipped = [case_name(c) for c, ok in zip(items, has_label) if not ok]
        warnings.warn(f"training on {len(labelled)} labelled cases; {len(skipped)} without a label are left out: "
                      f"{', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}", stacklevel=2)
    return labelled


def case_name(case) -> str:
    return case.name if isinstance(case, Case) else case["name"]


def split_cases(n: int, n_val: int, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train / validation split of ``n`` cases (a permutation seeded by ``seed``).

    Returns (train indices, val indices), each sorted; ``n_val`` is clipped to [1, n - 1]. A single
    case is used for both.
    """
    n_val = min(max(n_val, 1), n - 1) if n > 1 else 0
    perm = np.random.default_rng([seed, 7919]).permutation(n)
    val, rest = sorted(perm[:n_val].tolist()), sorted(perm[n_val:].tolist())
    return rest, (val if val else rest)


def split_transforms(transform: Compose) -> tuple[Compose, Compose]:
    """Split a MONAI Compose at its first random transform: (deterministic prefix, random suffix).

    The prefix (pad, fg/bg indices, normalisation) runs once per case and can be cached, as MONAI's
    CacheDataset does; the suffix runs every step with a step-seeded random state.
    """
    ts = list(transform.transforms)
    i = next((k for k, t in enumerate(ts) if isinstance(t, Randomizable)), len(ts))
    return Compose(ts[:i]), Compose(ts[i:])


def case_indices(step: int, n_cases: int, per_step: int, seed: int) -> list[int]:
    """Which cases step ``step`` draws: walk through seeded per-epoch permutations.

    Position ``p = step * per_step + j`` lies in epoch ``p // n_cases``; every case is seen once
    per epoch, and the answer depends on nothing but the arguments.
    """
    out = []
    for p in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(p, n_cases)
        out.append(int(np.random.default_rng([seed, epoch, 1]).permutation(n_cases)[pos]))
    return out


def at_spacing(case: dict, spacing: Sequence[float] | None) -> dict:
    """A case dict resampled to ``spacing`` mm (image smoothed + bilinear, labels nearest), or the
    same dict when it already is (or ``spacing`` is None): training data of mixed voxel sizes is
    brought to the model's one."""
    affine = case.get("affine")
    if affine is None and case.get("spacing") is not None:
        affine = np.diag([*case["spacing"], 1.0])
    res = resampling_for(affine, np.shape(case["image"])[1:], spacing)
    if res is None:
        return case
    label = case["label"]
    return {**case, "image": res.to_model(case["image"]).numpy(), "spacing": tuple(spacing),
            "affine": res.dst_affine.numpy(), "label": None if label is None else
            res.to_model(label, mode="nearest").numpy().astype(np.uint8)}


def _nbytes(d: dict) -> int:
    return sum(v.nbytes for v in d.values() if hasattr(v, "nbytes"))


class StepBatches(torch.utils.data.Dataset):
    """``batches[k]`` is the training batch of ``steps[k]`` -- see :func:`make_batch`.

    A Dataset over steps, so a DataLoader with workers can build batches ahead while each batch
    stays a pure function of its step. ``config`` is a ``train.TrainConfig``; cases of another voxel
    size than ``spacing`` are resampled to it.

    Memory: prepared cases are kept (``config.cache_cases``) up to ``config.cache_mb`` MB, the least
    recently drawn dropped first (a 240x240x155 BraTS case takes ~180 MB prepared). With DataLoader
    workers the budget is for all processes together: the cache is filled before the workers fork
    (:meth:`fill_cache`; they share its pages) and frozen (:meth:`freeze`): a worker prepares a case
    outside it on demand and drops it after the batch, so workers never grow their own copies.
    """

    def __init__(self, cases: list, config, spatial_dims: int, steps: Sequence[int] = (),
                 spacing: Sequence[float] | None = None, rank: int = 0, world_size: int = 1):
        self.config, self.steps, self.rank, self.world_size = config, list(steps), rank, world_size
        self.spacing = spacing
        transform = train_transforms(config.roi_size, spatial_dims=spatial_dims, num_samples=config.crops_per_case,
                                     pos_fraction=config.pos_fraction, augment=config.augment,
                                     normalization=config.normalization)
        self.prefix, self.suffix = split_transforms(transform)
        self.cases = cases
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._cache_bytes = 0
        self._frozen = False

    def _over_budget(self) -> bool:
        budget = self.config.cache_mb
        return budget is not None and self._cache_bytes > budget * 2**20

    def fill_cache(self) -> int:
        """Prepare cases into the cache until it holds them all or the budget is spent; returns how
        many it holds."""
        if self.config.cache_cases:
            for i in range(len(self.cases)):
                held = len(self._cache)
                self.prepared(i)
                if len(self._cache) <= held:  # it had to drop one: the cache is full
                    break
        return len(self._cache)

    def freeze(self) -> None:
        """From now on the cache is read-only: cases outside it are prepared for one use."""
        self._frozen = True

    def prepared(self, i: int) -> dict:
        """Case ``i`` after the deterministic prefix (cached as ``config.cache_cases``/``cache_mb`` say)."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        d = at_spacing(as_case(self.cases[i]), self.spacing)
        # a copy: the prefix normalises in place, which without the cache would change the case
        # under the next step (and under every DDP rank differently)
        out = self.prefix({"image": np.array(d["image"], dtype=np.float32), "label": d["label"]})
        if self.config.cache_cases and not self._frozen:
            self._cache[i] = out
            self._cache_bytes += _nbytes(out)
            while self._over_budget() and len(self._cache) > 1:
                self._cache_bytes -= _nbytes(self._cache.popitem(last=False)[1])
        return out

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, k: int) -> dict:
        return make_batch(self.steps[k], self, self.config, rank=self.rank, world_size=self.world_size)


def _plain_tensor(x, dtype) -> torch.Tensor:
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.to(dtype)


def make_batch(step: int, source: StepBatches, config, rank: int = 0, world_size: int = 1) -> dict:
    """The training batch of the 0-based ``step``, a pure function of ``(config.seed, step)``.

    Returns ``{"image": (B, 4, *roi) float32, "label": (B, 3, *roi) uint8, "available": (4,) or
    (B, 4) bool, "subset": name, "step": step}``.

    Under DDP each of ``world_size`` ranks takes its own slice of the step's global case positions
    and builds ``batch_size`` samples from them (the global batch is ``world_size * batch_size``).
    Every random draw is keyed by the *global* position, never by the rank, so a 2-rank run sees
    exactly the samples a 1-rank run with twice the batch sees, and the stage-2 subset of a step is
    the same on every rank.
    """
    per_step = math.ceil(config.batch_size / config.crops_per_case)
    first = rank * per_step
    idx = case_indices(step, len(source.cases), per_step * world_size, config.seed)[first:first + per_step]
    samples = []
    for j, i in enumerate(idx):
        # One seed per (step, case position) for all random transforms (crops, flips, intensity):
        # MONAI's Compose hands each transform a seed drawn from it.
        source.suffix.set_random_state(seed=int(np.random.default_rng([config.seed, step, 1, first + j]).integers(2**31)))
        out = source.suffix(dict(source.prepared(i)))  # shallow copy: the cached arrays are not modified
        samples.extend(out if isinstance(out, list) else [out])
    samples = samples[:config.batch_size]
    # plain tensors: MONAI MetaTensors would route every op of the model through __torch_function__
    image = torch.stack([_plain_tensor(s["image"], torch.float32) for s in samples])
    label = torch.stack([_plain_tensor(s["label"], torch.uint8) for s in samples])

    if step < config.stage1_steps:
        available, name = torch.tensor(ALL_PRESENT), subset_name(ALL_PRESENT)
    elif config.stage2_sampling == "batch":  # the reference: one subset per step, shared by all ranks
        mask = sample_subset(np.random.default_rng([config.seed, step, 2]))
        available, name = torch.tensor(mask), subset_name(mask)
    else:
        b0 = rank * config.batch_size
        masks = [sample_subset(np.random.default_rng([config.seed, step, 2, b0 + k])) for k in range(len(samples))]
        available, name = torch.tensor(masks), "per-sample"
    return {"image": image, "label": label, "available": available, "subset": name, "step": step}


__all__ = ["sample_subset", "training_cases", "case_name", "split_cases", "split_transforms", "case_indices",
           "at_spacing", "StepBatches", "make_batch"]
