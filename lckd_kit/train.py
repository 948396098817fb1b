"""The LCKD two-stage training loop, in one file.

    stage 1 (warm-up)   all four modalities present        loss = seg + kd_weight * KD
    stage 2 (missing)   a random 1-3 modality subset        loss = seg + kd_weight * KD
    every elect_every steps: teacher election on validation cases (+ all-modality val Dice)

``seg`` is Dice (mean of ET/TC/WT) + BCE (sum of ET/TC/WT); ``KD`` is the L1 distance of every
available modality's bottleneck feature to each available teacher's (teacher detached), summed
over pairs -- all as the reference (LCKD_SPEC sections 3-5). ``no_kd=True`` trains the same
model on the same schedule and batches without KD: the ablation baseline.

Determinism: every step is a pure function of ``(seed, step)`` -- which cases, which crops and
augmentations (MONAI ``set_random_state`` seeded from ``(seed, step)``), which modality subset
(``np.random.default_rng([seed, step, 2])``). Nothing random carries over from one step to the
next, so a run resumed from a checkpoint ends with bit-identical weights on the CPU.

Run folder (``out_dir``): ``config.json``, ``history.jsonl`` (one JSON record per line),
``last.pt`` (every ``checkpoint_every`` steps and at the end), ``final.pt`` (at the end).
Checkpoints hold plain types only and load with ``torch.load(..., weights_only=True)``.

Multi-GPU / multi-node: under ``torchrun`` (an initialised process group) the same loop runs with
the model in DistributedDataParallel; ``batch_size`` is per rank, each rank builds its slice of
the step's global batch, elections are sharded and reduced, and only rank 0 writes the run folder.
Semantics (global batch, lr, subsets) in :mod:`lckd_kit.distributed`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.transforms import Compose, Randomizable

from lckd_kit import ALL_PRESENT, MODALITIES, REGIONS, as_mask, subset_name
from lckd_kit import distributed as dist_utils
from lckd_kit.data import Case, find_cases, labels_to_regions, load_case, normalize_image, train_transforms
from lckd_kit.distill import distillation_loss, segmentation_loss
from lckd_kit.election import ElectionResult, elect_teachers
from lckd_kit.evaluate import SLICES_PER_WINDOW_2D, hard_dice, predict_subsets
from lckd_kit.model import CONFIGS, build_model, config_from_dict, config_to_dict

CHECKPOINT_FORMAT = "lckd_kit/1"


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in ``config.json`` and in checkpoints).

    Reference values (LCKD_SPEC 9.3) are the defaults where they make sense at any scale; the
    step counts / crop / batch of the reference are the ``"paper"`` entry of TRAIN_CONFIGS.
    """

    model: str | dict = "small2d"  # a model.CONFIGS name, or a model config dict (config_to_dict)
    roi_size: tuple[int, ...] | None = None  # training crop, kit layout (X, Y, Z) / (X, Y); None: model default
    batch_size: int = 2
    crops_per_case: int = 1  # crops taken from each drawn case (2-D: slices per case)
    pos_fraction: float = 0.375  # crops centred on tumour (reference ~0.375, see data.train_transforms)
    stage1_steps: int = 1000  # all modalities
    stage2_steps: int = 1000  # random missing modalities
    # -- teacher election
    elect_every: int = 500
    elect_on: str = "val"  # "val" (disjoint from training) | "train" (reference: its val list is inside train_all)
    elect_at_start: bool = False  # reference: also elects at step 0, on an untrained net
    elect_at_end: bool = True  # one more election + val Dice after the last step
    elect_metric: str = "hard"  # "hard" thresholded Dice | "soft" reference soft Dice
    elect_max_cases: int | None = None  # cap on election / validation cases (CPU budgets)
    initial_teachers: tuple[str, ...] = ("flair",)  # reference default: FLAIR
    stage2_reset_teachers: bool = False  # reference: teachers restart from FLAIR at stage 2
    val_fraction: float = 0.2
    n_val: int | None = None  # overrides val_fraction
    # -- loss
    kd_weight: float = 0.1
    kd_distance: str = "l1"
    kd_pairs: str = "all"
    kd_reduction: str = "sum"
    no_kd: bool = False  # ablation baseline: same everything, no distillation
    stage1_kd: bool = True  # reference: KD in both stages
    # -- optimiser and schedule
    optimizer: str = "sgd"  # reference: SGD | "adamw" (momentum/nesterov unused; betas (0.9, 0.999))
    lr: float = 1e-2
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 0.0  # reference parses 5e-4 but never applies it
    poly_power: float = 0.9
    stage2_schedule: str = "continue"  # reference: poly over s1+s2, counter continues (lr jumps up) | "restart"
    stage2_reset_momentum: bool = False  # clear SGD momentum at stage 2 (IM-Fuse's --restart also does)
    stage2_sampling: str = "batch"  # reference: one subset per batch | "sample": one per sample
    # -- bookkeeping
    seed: int = 0
    amp: str = "auto"  # "auto" (bf16 if supported, else fp16; CUDA only) | "off" | "bf16" | "fp16"
    checkpoint_every: int = 500
    log_every: int = 10
    num_workers: int = 0  # DataLoader workers building batches (each batch is still a function of the step)
    cache_cases: bool = True  # keep loaded, padded, normalised cases in memory
    sw_batch_size: int = 1  # sliding-window batch for election / validation
    infer_crop_foreground: bool = True  # election / validation only on the brain's bounding box (speed)
    infer_roi_size: tuple[int, ...] | None = None  # election / validation window; None: the training
    # crop (3-D) or (*crop, 16) slices (2-D); see evaluate.predict_subsets

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps

    def stage_of(self, step: int) -> int:
        """1 or 2 for the 0-based ``step``."""
        return 1 if step < self.stage1_steps else 2


TRAIN_CONFIGS: dict[str, TrainConfig] = {
    # The reference recipe: crop 80x160x160 (D,H,W) = (160,160,80) in kit layout, batch 2, SGD
    # Nesterov 0.99, 80k + 35k steps, election every 5000 on the validation list.
    "paper": TrainConfig(model="paper", roi_size=(160, 160, 80), batch_size=2, stage1_steps=80_000,
                         stage2_steps=35_000, elect_every=5_000, checkpoint_every=5_000, log_every=50,
                         num_workers=4),
    # CPU configurations for 96^3 phantoms (2 mm). Two deliberate deviations, measured on phantoms:
    # AdamW 3e-3 instead of SGD momentum 0.99 (which needs thousands of steps: after 600 steps SGD
    # reached all-modality val Dice ~0.3 where AdamW reached ~0.8 in 300), and elections on 2
    # validation cases only (a 2-D election costs ~10 CPU-seconds per case).
    # 2-D, the demo default: axial 64x64 crops, 2 cases x 4 slices per step; ~0.37 CPU-s/step,
    # i.e. roughly 3-4 minutes on 2 cores including 4 elections.
    "small2d": TrainConfig(model="small2d", roi_size=(64, 64), batch_size=8, crops_per_case=4,
                           optimizer="adamw", lr=3e-3, stage1_steps=300, stage2_steps=300,
                           elect_every=150, checkpoint_every=50, log_every=10, elect_max_cases=2),
    # 3-D: 64^3 crops, batch 2 (slower per step; not tuned as far as small2d).
    "small": TrainConfig(model="small", roi_size=(64, 64, 64), batch_size=2, optimizer="adamw", lr=3e-3,
                         stage1_steps=300, stage2_steps=300, elect_every=150, checkpoint_every=50,
                         log_every=10, elect_max_cases=2),
    # seconds-long, for tests (reference optimiser, tiny crops)
    "tiny": TrainConfig(model="small2d", roi_size=(32, 32), batch_size=4, crops_per_case=2,
                        stage1_steps=4, stage2_steps=4, elect_every=4, checkpoint_every=2, log_every=1,
                        elect_max_cases=1, n_val=1),
}


def _plain(value):
    """Tuples -> lists recursively (JSON and weights_only-friendly)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def train_config_to_dict(config: TrainConfig) -> dict:
    """TrainConfig -> plain dict (lists instead of tuples)."""
    return _plain(dataclasses.asdict(config))


def train_config_from_dict(d: dict) -> TrainConfig:
    """Inverse of :func:`train_config_to_dict`; unknown keys (e.g. ``model_config``) are ignored."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in d.items() if k in names}
    for key in ("roi_size", "initial_teachers", "infer_roi_size"):
        if kw.get(key) is not None:
            kw[key] = tuple(kw[key])
    return TrainConfig(**kw)


def get_train_config(name_or_config: str | TrainConfig, **overrides) -> TrainConfig:
    """A TRAIN_CONFIGS entry (copied) or a given config, with field overrides."""
    base = TRAIN_CONFIGS[name_or_config] if isinstance(name_or_config, str) else name_or_config
    if isinstance(name_or_config, str) and name_or_config not in TRAIN_CONFIGS:
        raise ValueError(f"unknown train config {name_or_config!r}; expected one of {sorted(TRAIN_CONFIGS)}")
    return dataclasses.replace(base, **overrides)


def _model_config(config: TrainConfig):
    if isinstance(config.model, dict):
        return config_from_dict(config.model)
    if config.model not in CONFIGS:
        raise ValueError(f"unknown model config {config.model!r}; expected one of {sorted(CONFIGS)} or a dict")
    return CONFIGS[config.model]


def infer_roi_size(config: TrainConfig, spatial_dims: int) -> tuple[int, int, int]:
    """Sliding window used for election / validation (and a sensible default for evaluation)."""
    if config.infer_roi_size is not None:
        return tuple(config.infer_roi_size)
    if spatial_dims == 2:
        return (*config.roi_size, SLICES_PER_WINDOW_2D)
    return tuple(config.roi_size)


def _validate_config(config: TrainConfig) -> None:
    choices = dict(elect_on=("val", "train"), elect_metric=("hard", "soft"),
                   stage2_schedule=("continue", "restart"), stage2_sampling=("batch", "sample"),
                   amp=("auto", "off", "bf16", "fp16"), optimizer=("sgd", "adamw"))
    for key, allowed in choices.items():
        if getattr(config, key) not in allowed:
            raise ValueError(f"TrainConfig.{key} must be one of {allowed}, got {getattr(config, key)!r}")
    if config.stage1_steps < 0 or config.stage2_steps < 0 or config.total_steps == 0:
        raise ValueError("stage1_steps and stage2_steps must be >= 0 and not both 0")
    for key in ("batch_size", "crops_per_case", "elect_every", "checkpoint_every", "log_every"):
        if getattr(config, key) < 1:
            raise ValueError(f"TrainConfig.{key} must be >= 1, got {getattr(config, key)}")
    as_mask(list(config.initial_teachers))


# --------------------------------------------------------------------------------------------
# pure functions of the step: learning rate, modality subset


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of the 0-based ``step`` (poly decay, power ``poly_power``).

    Stage 1: ``lr (1 - step / s1)^p``. Stage 2, ``"continue"`` (reference): the counter keeps
    running under the total length, ``lr (1 - step / (s1 + s2))^p`` -- so the lr jumps from ~0 back
    up to ``lr (s2 / (s1 + s2))^p`` at the boundary. ``"restart"`` (IM-Fuse): a fresh poly over
    stage 2, ``lr (1 - (step - s1) / s2)^p``.
    """
    s1, s2, p = config.stage1_steps, config.stage2_steps, config.poly_power
    if step < s1:
        return config.lr * (1 - step / s1) ** p
    if config.stage2_schedule == "continue":
        return config.lr * (1 - step / (s1 + s2)) ** p
    return config.lr * (1 - (step - s1) / s2) ** p


def sample_subset(rng: np.random.Generator) -> tuple[bool, ...]:
    """The reference's random-missing draw: keep k ~ U{1,2,3} modalities, then a uniform k-subset.

    Each single has probability 1/12, each pair 1/18, each triple 1/12; never all four.
    """
    k = int(rng.integers(1, 4))
    keep = rng.choice(len(MODALITIES), size=k, replace=False)
    return tuple(m in keep for m in range(len(MODALITIES)))


# --------------------------------------------------------------------------------------------
# data: cases, split, per-step batches


def _case_dict(item) -> dict:
    """A loaded case (``data.load_case`` dict, ``phantom.make_case`` dict or a ``Case``) -> {name, image, label}.

    Images stay raw (the training pipeline and :func:`_normalised` z-score them); integer label
    maps (phantom.make_case) become (3, X, Y, Z) region masks.
    """
    if isinstance(item, Case):
        item = load_case(item)
    label = item.get("label")
    if label is not None and np.ndim(label) == 3:  # integer label map
        label = labels_to_regions(np.asarray(label), item.get("label_style", item.get("convention", "brats2018")))
    name = item.get("name")
    if name is None and "params" in item:
        name = f"case_seed{item['params'].get('seed')}"
    return {"name": name, "image": np.asarray(item["image"], dtype=np.float32),
            "label": None if label is None else np.asarray(label, dtype=np.uint8)}


def load_cases(data: str | os.PathLike | Sequence) -> list:
    """``data`` (a folder of cases, or a list of loaded dicts / Case objects) -> list of labelled cases.

    A folder gives ``data.Case`` objects (loaded lazily or cached by :func:`train`); dicts are
    converted with :func:`_case_dict`. Unlabelled cases are dropped.
    """
    if isinstance(data, (str, os.PathLike)):
        cases = [c for c in find_cases(data) if c.labelled]
        if not cases:
            raise ValueError(f"no labelled cases under {data}")
        return cases
    out = [c if isinstance(c, Case) else _case_dict(c) for c in data]
    out = [c for c in out if (c.labelled if isinstance(c, Case) else c["label"] is not None)]
    if not out:
        raise ValueError("no labelled cases given")
    return out


def _name(case) -> str:
    return case.name if hasattr(case, "name") else case["name"]


def split_cases(n: int, config: TrainConfig) -> tuple[list[int], list[int]]:
    """Deterministic train / validation split of ``n`` cases (a permutation seeded by ``config.seed``).

    Returns (train indices, val indices), each sorted. With a single case it is used for both.
    """
    n_val = config.n_val if config.n_val is not None else int(round(config.val_fraction * n))
    n_val = min(max(n_val, 1 if n > 1 else 0), n - 1) if n > 1 else 0
    perm = np.random.default_rng([config.seed, 7919]).permutation(n)
    val, rest = sorted(perm[:n_val].tolist()), sorted(perm[n_val:].tolist())
    return rest, (val if val else rest)


def split_transforms(transform):
    """Split a MONAI Compose at its first random transform: (deterministic prefix, random suffix).

    The prefix (pad, fg/bg indices, z-score) is run once per case and cached, as MONAI's
    CacheDataset does; the suffix runs every step with a step-seeded random state.
    """
    ts = list(transform.transforms)
    i = next((k for k, t in enumerate(ts) if isinstance(t, Randomizable)), len(ts))
    return Compose(ts[:i]), Compose(ts[i:])


class StepBatches(torch.utils.data.Dataset):
    """``batches[step]`` is the training batch of ``step`` -- see :func:`make_batch`.

    A Dataset over steps, so a DataLoader with workers can build batches ahead while the batch
    content stays a pure function of the step.
    """

    def __init__(self, cases: list, config: TrainConfig, spatial_dims: int, steps: Sequence[int],
                 rank: int = 0, world_size: int = 1):
        self.config, self.steps, self.rank, self.world_size = config, list(steps), rank, world_size
        transform = train_transforms(config.roi_size, spatial_dims=spatial_dims, num_samples=config.crops_per_case,
                                     pos_fraction=config.pos_fraction)
        self.prefix, self.suffix = split_transforms(transform)
        self.cases = cases
        self._cache: dict[int, dict] = {}

    def prepared(self, i: int) -> dict:
        """Case ``i`` after the deterministic prefix (cached if ``config.cache_cases``)."""
        if i in self._cache:
            return self._cache[i]
        case = self.cases[i]
        d = _case_dict(case) if not isinstance(case, dict) else case
        # a copy: the prefix z-scores in place (MONAI NormalizeIntensityd), which without the cache
        # would change the case under the next step (and under every DDP rank differently)
        out = self.prefix({"image": np.array(d["image"], dtype=np.float32), "label": d["label"]})
        if self.config.cache_cases:
            self._cache[i] = out
        return out

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, k: int) -> dict:
        return make_batch(self.steps[k], self, self.config, rank=self.rank, world_size=self.world_size)


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


def _plain_tensor(x, dtype) -> torch.Tensor:
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.to(dtype)


def make_batch(step: int, source: StepBatches, config: TrainConfig, rank: int = 0, world_size: int = 1) -> dict:
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

    if config.stage_of(step) == 1:
        available, name = torch.tensor(ALL_PRESENT), subset_name(ALL_PRESENT)
    elif config.stage2_sampling == "batch":  # the reference: one subset per step, shared by all ranks
        mask = sample_subset(np.random.default_rng([config.seed, step, 2]))
        available, name = torch.tensor(mask), subset_name(mask)
    else:
        b0 = rank * config.batch_size
        masks = [sample_subset(np.random.default_rng([config.seed, step, 2, b0 + k])) for k in range(len(samples))]
        available, name = torch.tensor(masks), "per-sample"
    return {"image": image, "label": label, "available": available, "subset": name, "step": step}


def _normalised(case) -> dict:
    """Whole-volume case for election / validation: z-scored image, region label."""
    d = case if isinstance(case, dict) else _case_dict(case)
    return {"name": d["name"], "image": normalize_image(np.asarray(d["image"], dtype=np.float32)),
            "label": d["label"]}


# --------------------------------------------------------------------------------------------
# checkpoints and history


def _atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    """Read a kit checkpoint safely (``weights_only=True``: plain types and tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an lckd_kit checkpoint (format {CHECKPOINT_FORMAT!r})")
    return ckpt


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """Rebuild the trained model from a checkpoint -> ``(model in eval mode, checkpoint dict)``."""
    ckpt = load_checkpoint(path, device)
    model = build_model(config_from_dict(ckpt["config"]["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def read_history(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``<run_dir>/history.jsonl`` (or of that file itself), in order."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _History:
    """Records in memory + appended (and flushed) to history.jsonl."""

    def __init__(self, path: Path | None, records: list[dict]):
        self.records, self.path = records, path
        self._file = None
        if path is not None:  # rewrite what is kept (resume truncation), then append
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
            os.replace(tmp, path)
            self._file = open(path, "a")

    def add(self, record: dict) -> None:
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _check_resume(path: Path, ckpt: dict, config: TrainConfig, model_dict: dict, world_size: int = 1) -> None:
    stored = ckpt["config"]
    if stored["model_config"] != model_dict:
        raise ValueError(
            f"cannot resume from {path}: it was trained with model config\n  {stored['model_config']}\n"
            f"but this run asks for\n  {model_dict}\nuse a new out_dir, or resume=False to start over")
    differ = [k for k, v in train_config_to_dict(config).items() if stored.get(k) != v]
    if stored.get("world_size", 1) != world_size:  # batch_size is per rank: the global batch changes
        differ.append(f"world_size ({stored.get('world_size', 1)} -> {world_size})")
    if differ:
        warnings.warn(f"resuming {path} with changed training settings {differ}: the run will differ "
                      f"from an uninterrupted one", stacklevel=3)


# --------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def validate(model, cases: Sequence[dict], roi_size=None, device=None, sw_batch_size: int = 1,
             crop_foreground: bool = False, reduce: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Mean hard Dice ``(3,)`` (ET, TC, WT) of the all-modality prediction on normalised ``cases``.

    ``reduce`` (e.g. ``distributed.all_reduce_sum``): ``cases`` is this rank's shard and the mean is
    over all ranks' cases, the same on every rank (see ``election.elect_teachers``)."""
    was_training = model.training
    model.eval()
    total = np.zeros(3)
    try:
        for case in cases:
            prob = predict_subsets(model, case["image"], [ALL_PRESENT], roi_size=roi_size, device=device,
                                   sw_batch_size=sw_batch_size, crop_foreground=crop_foreground)
            total += hard_dice(prob[0] > 0.5, torch.as_tensor(case["label"])).double().numpy()
    finally:
        model.train(was_training)
    n = len(cases)
    if reduce is not None:
        total = reduce(np.append(total, n))
        total, n = total[:3], int(round(total[3]))
    return total / max(n, 1)


# --------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    model: torch.nn.Module
    history: list[dict]
    teachers: tuple[bool, ...]
    elections: list[ElectionResult]
    out_dir: Path | None
    config: TrainConfig = None
    split: dict = field(default_factory=dict)  # {"train": [names], "val": [names]}
    step: int = 0  # steps completed

    @property
    def teacher_names(self) -> list[str]:
        return [m for m, on in zip(MODALITIES, self.teachers) if on]


def _amp_dtype(config: TrainConfig, device: torch.device):
    if device.type != "cuda" or config.amp == "off":
        return None
    if config.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if config.amp == "bf16" else torch.float16


def train(
    config: TrainConfig | str,
    data: str | os.PathLike | Sequence,
    out_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    resume: bool | str | os.PathLike = False,
    callback: Callable[[int, dict], Any] | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    ddp: bool | None = None,
) -> TrainResult:
    """Train LCKD (or the no-KD baseline) with the two-stage recipe.

    Args:
        config: a TrainConfig or a TRAIN_CONFIGS name.
        data: a folder of cases (any layout ``data.find_cases`` reads) or a list of loaded case
            dicts (``data.load_case`` / ``phantom.make_case`` output, raw intensities).
        out_dir: run folder for config.json, history.jsonl and checkpoints; None keeps everything
            in memory.
        device: where to train. AMP (``config.amp``) is used on CUDA only.
        resume: True resumes from ``out_dir/last.pt`` when it exists (else starts fresh); a path
            resumes from that checkpoint. A checkpoint of another model config raises ValueError.
        callback: ``callback(step, record)`` after every history record (live plots).
        progress: tqdm progress bar.
        max_steps: stop once this many steps are done (saving ``last.pt``), as an interruption would.
        ddp: None (default) trains data-parallel when a torch.distributed process group of more
            than one process is initialised (torchrun; see :mod:`lckd_kit.distributed`), False
            ignores any group, True requires one. Every rank calls ``train`` with the same
            arguments; ``device="cuda"`` means ``cuda:LOCAL_RANK``. Only rank 0 writes ``out_dir``,
            shows progress and calls ``callback``; every rank returns the same model and teachers.

    Returns:
        :class:`TrainResult`. ``history`` holds records of kinds ``"step"`` (mean losses over the
        last ``log_every`` steps), ``"election"`` and ``"val"``; their ``step`` is the number of
        steps completed when they were written.
    """
    config = get_train_config(config) if isinstance(config, str) else config
    model_cfg = _model_config(config)
    if config.roi_size is None:
        config = dataclasses.replace(config, roi_size=tuple(model_cfg.roi_size))
    _validate_config(config)
    world = dist_utils.current() if ddp is not False else dist_utils.DistInfo()
    if ddp and world.world_size == 1:
        raise ValueError("train(ddp=True) needs an initialised process group of more than one process "
                         "(start with torchrun, see lckd_kit.distributed)")
    distributed = world.world_size > 1
    device = dist_utils.local_device(device, world.local_rank) if distributed else torch.device(device)
    if distributed and torch.distributed.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError(f"the process group uses NCCL, which reduces CUDA tensors only, but device is {device}: "
                         f"train on cuda, or init the group with backend 'gloo' for the CPU")
    reduce = dist_utils.all_reduce_sum if distributed else None
    main = world.is_main
    model_dict = config_to_dict(model_cfg)
    out_dir = Path(out_dir) if out_dir is not None else None

    # -- data and split (a function of the case list and the seed)
    cases = load_cases(data)
    train_idx, val_idx = split_cases(len(cases), config)
    split = {"train": [_name(cases[i]) for i in train_idx], "val": [_name(cases[i]) for i in val_idx]}
    source = StepBatches([cases[i] for i in train_idx], config, model_cfg.spatial_dims, steps=[],
                         rank=world.rank, world_size=world.world_size)
    # election / validation: each rank loads and scores only its shard; the sums are reduced
    own = lambda idx: dist_utils.shard(idx[:config.elect_max_cases], world.rank, world.world_size)  # noqa: E731
    elect_pool = val_idx if config.elect_on == "val" else train_idx
    elect_cases = [_normalised(cases[i]) for i in own(elect_pool)]
    val_cases = elect_cases if config.elect_on == "val" else [_normalised(cases[i]) for i in own(val_idx)]
    infer_roi = infer_roi_size(config, model_cfg.spatial_dims)

    # -- model, optimiser (SGD Nesterov as the reference; lr set every step by lr_at); the same
    # seed on every rank gives the same initial weights (DDP also broadcasts rank 0's)
    torch.manual_seed(config.seed)
    model = build_model(model_cfg).to(device)
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    nesterov=config.nesterov, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    amp_dtype = _amp_dtype(config, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    teachers = as_mask(list(config.initial_teachers))
    elections: list[ElectionResult] = []
    records: list[dict] = []
    start = 0

    # -- resume
    ckpt_path = None
    if resume is True and out_dir is not None and (out_dir / "last.pt").is_file():
        ckpt_path = out_dir / "last.pt"
    elif resume not in (False, True, None):
        ckpt_path = Path(resume)
    if distributed:  # all ranks must resume from the same file, or none
        seen = int(reduce(np.array([ckpt_path is not None and ckpt_path.is_file()]))[0])
        if 0 < seen < world.world_size:
            raise ValueError(f"checkpoint {ckpt_path or out_dir / 'last.pt'} is visible to {seen} of "
                             f"{world.world_size} ranks: out_dir must be on a filesystem all nodes share")
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, device)
        with warnings.catch_warnings():
            if not main:  # one warning per run, not one per rank
                warnings.simplefilter("ignore")
            _check_resume(ckpt_path, ckpt, config, model_dict, world.world_size)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if "torch_rng" in ckpt:  # nothing in the loop draws from it; kept for completeness
            torch.set_rng_state(ckpt["torch_rng"].cpu())
        start = int(ckpt["step"])
        teachers = tuple(bool(t) for t in ckpt["teachers"])
        elections = [ElectionResult.from_record(r) for r in ckpt["elections"]]
        if out_dir is not None:  # drop records written after the checkpoint (they will be redone)
            records = [r for r in read_history(out_dir) if r.get("step", 0) <= start]

    # The parameters and the set of those that get a gradient are the same in every step: the
    # encoder is shared by all modalities (a missing one removes no path) and the only unused ones,
    # ASPP branch5_conv.weight and branch5_norm.weight, never are (the global branch is a constant,
    # model.ASPP.global_branch). So static_graph: DDP learns them in step 1 and leaves their grads
    # None, without find_unused_parameters' graph walk every step (tests/test_distributed.py pins it).
    net = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True)

    saved_config = {**train_config_to_dict(config), "model_config": model_dict, "world_size": world.world_size}
    if distributed:  # every rank has read the old history before rank 0 rewrites it
        dist_utils.barrier()
    if out_dir is not None and main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps({**saved_config, "split": split}, indent=1) + "\n")
    history = _History(out_dir / "history.jsonl" if out_dir is not None and main else None, records)

    def emit(record: dict, completes: bool = False) -> None:
        nonlocal safe
        history.add(record)
        if completes:  # the last record of this step is written: the state is consistent again
            safe = record["step"]
        if callback is not None and main:
            callback(record["step"], record)

    def checkpoint(step: int, *names: str, sync: bool = True) -> None:
        if out_dir is not None and main:
            _save_checkpoint(step, names)
        if sync and distributed:  # nobody can go on to read (resume from) a half-written checkpoint
            dist_utils.barrier()

    def _save_checkpoint(step: int, names: Sequence[str]) -> None:
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),  # the bare module: no DDP "module." prefix
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": step,
            "config": saved_config,
            "teachers": list(teachers),
            "elections": [e.to_record() for e in elections],
            "split": split,
            "torch_rng": torch.get_rng_state(),
        }
        for name in names:
            _atomic_save(ckpt, out_dir / name)

    def elect(step: int) -> None:
        nonlocal teachers
        res = elect_teachers(model, elect_cases, roi_size=infer_roi, metric=config.elect_metric, device=device,
                             step=step, include_all=config.elect_on == "val", sw_batch_size=config.sw_batch_size,
                             crop_foreground=config.infer_crop_foreground, reduce=reduce)
        teachers = res.teachers
        elections.append(res)
        emit(res.to_record())
        dice = res.all_dice if res.all_dice is not None else validate(
            model, val_cases, roi_size=infer_roi, device=device, sw_batch_size=config.sw_batch_size,
            crop_foreground=config.infer_crop_foreground, reduce=reduce)
        emit({"kind": "val", "step": step, "dice": {r: round(float(v), 6) for r, v in zip(REGIONS, dice)}},
             completes=True)

    end = config.total_steps if max_steps is None else min(config.total_steps, max_steps)
    # Bit-identical resume needs deterministic kernels; on the CPU they cost nothing.
    det_before = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    bar = None
    safe = start  # steps whose update AND bookkeeping are complete; None while the weights change
    try:
        if start == 0 and config.elect_at_start and not elections:
            elect(0)
        source.steps = list(range(start, end))
        if config.num_workers > 0:
            if config.cache_cases:  # fill the cache before the workers fork: shared, not copied
                for i in range(len(source.cases)):
                    source.prepared(i)
            loader = torch.utils.data.DataLoader(source, batch_size=None, num_workers=config.num_workers,
                                                 persistent_workers=False, prefetch_factor=2)
        else:
            loader = (source[k] for k in range(len(source)))
        if progress and main:
            from tqdm.auto import tqdm
            bar = tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True)
        net.train()
        window: list[dict] = []
        for batch in loader:
            step = batch["step"]
            stage = config.stage_of(step)
            if stage == 2 and step == config.stage1_steps:  # entering stage 2
                if config.stage2_reset_teachers:
                    teachers = as_mask(list(config.initial_teachers))
                if config.stage2_reset_momentum:
                    optimizer.state.clear()
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True).float()
            available = batch["available"].to(device)
            use_kd = not config.no_kd and (stage == 2 or config.stage1_kd)

            # -- forward / loss
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits, feats = net(image, available)
            seg, dice_l, bce = segmentation_loss(logits.float(), label)
            if use_kd:
                kd = distillation_loss(feats.float(), available, torch.tensor(teachers, device=device),
                                       distance=config.kd_distance, pairs=config.kd_pairs,
                                       reduction=config.kd_reduction)
            else:
                kd = torch.zeros((), device=device)
            loss = seg + config.kd_weight * kd

            # -- the one optimiser step (under DDP, backward averages the gradients over ranks)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                safe = None
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                safe = None
                optimizer.step()
            done = step + 1

            # -- bookkeeping: log, elect, checkpoint (all keyed by the number of steps done)
            window.append({"loss": loss.item(), "dice_loss": dice_l.item(), "bce": bce.item(), "kd": kd.item()})
            elect_due = done % config.elect_every == 0 or (done == config.total_steps and config.elect_at_end)
            if done % config.log_every == 0 or done == end:
                mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                if distributed:  # the global batch's losses: equal local batches, so the mean of the ranks'
                    mean = dict(zip(mean, (reduce(np.array(list(mean.values()))) / world.world_size).tolist()))
                window = []
                emit({"kind": "step", "step": done, "stage": stage, **{k: round(v, 6) for k, v in mean.items()},
                      "lr": lr, "subset": batch["subset"], "teachers": [m for m, t in zip(MODALITIES, teachers) if t]},
                     completes=not elect_due)
            if elect_due:
                elect(done)
            if done % config.checkpoint_every == 0 and done < end:
                checkpoint(done, "last.pt")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", teachers="+".join(
                    m for m, t in zip(MODALITIES, teachers) if t))
            safe = done
        if end > start:
            finished = end == config.total_steps
            checkpoint(end, "last.pt", *(("final.pt",) if finished else ()))
    except KeyboardInterrupt:
        # Interrupted (e.g. a notebook's stop button): keep what is consistent so resume=True
        # continues from there. Not possible in the middle of an update or its bookkeeping.
        if safe is not None and safe > start and main:
            checkpoint(safe, "last.pt", sync=False)  # no barrier: the other ranks may not be interrupted
            warnings.warn(f"interrupted: saved {out_dir / 'last.pt' if out_dir else 'nothing'} at step {safe}")
        raise
    finally:
        if bar is not None:
            bar.close()
        history.close()
        torch.use_deterministic_algorithms(det_before)
    model.eval()
    return TrainResult(model=model, history=history.records, teachers=teachers, elections=elections,
                       out_dir=out_dir, config=config, split=split, step=max(end, start))
