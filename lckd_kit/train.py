"""The LCKD two-stage training loop, in one file.

    stage 1 (warm-up)   all four modalities present        loss = seg + kd_weight * KD
    stage 2 (missing)   a random 1-3 modality subset        loss = seg + kd_weight * KD
    every elect_every steps: teacher election on validation cases (+ all-modality val Dice)

``seg`` is Dice (mean of ET/TC/WT) + BCE (sum of ET/TC/WT); ``KD`` is the L1 distance of every
available modality's bottleneck feature to each available teacher's (teacher detached), summed
over pairs -- all as the reference's ``train.py``/``DualNet.py``. ``no_kd=True`` trains the same
model on the same schedule and batches without KD: the ablation baseline.

Determinism: every step's batch is a pure function of ``(seed, step)`` (:mod:`lckd_kit.batches`),
so a run resumed from a checkpoint ends with bit-identical weights on the CPU.

Run folder (``out_dir``): ``config.json``, ``history.jsonl`` (one JSON record per line),
``last.pt`` (every ``checkpoint_every`` steps and at the end), ``final.pt`` (at the end); see
:mod:`lckd_kit.checkpoint`.

Multi-GPU / multi-node: under ``torchrun`` (an initialised process group) the same loop runs with
the model in DistributedDataParallel; ``batch_size`` is per rank, each rank builds its slice of
the step's global batch, elections are sharded and reduced, and only rank 0 writes the run folder.
Semantics (global batch, lr, subsets) in :mod:`lckd_kit.distributed`.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from lckd_kit import ALL_PRESENT, MODALITIES, REGIONS, as_mask
from lckd_kit import checkpoint as ckpt_io
from lckd_kit import distributed as dist_utils
from lckd_kit.batches import StepBatches, at_spacing, case_name, split_cases, training_cases
from lckd_kit.data import as_case, case_spacing
from lckd_kit.distill import distillation_loss, feature_probe, segmentation_loss
from lckd_kit.election import ElectionResult, elect_teachers
from lckd_kit.inference import predict_subsets
from lckd_kit.metrics import hard_dice
from lckd_kit.model import CONFIGS, ModelConfig, build_model, config_from_dict, config_to_dict
from lckd_kit.transforms import normalize_image

# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in ``config.json`` and in checkpoints).

    The reference's values are the defaults where they make sense at any scale; the reference's
    step counts, crop and batch are the ``"paper"`` entry of TRAIN_CONFIGS.
    """

    model: str | dict = "small2d"  # a model.CONFIGS name, or a model config dict (config_to_dict)
    roi_size: tuple[int, ...] | None = None  # training crop, kit layout (X, Y, Z) / (X, Y); None: model default
    batch_size: int = 2
    crops_per_case: int = 1  # crops taken from each drawn case (2-D: slices per case)
    pos_fraction: float = 0.375  # crops centred on tumour (reference ~0.375, see transforms.train_transforms)
    stage1_steps: int = 1000  # all modalities
    stage2_steps: int = 1000  # random missing modalities
    # -- teacher election
    elect_every: int = 500
    elect_on: str = "val"  # "val" (disjoint from training) | "train" (reference: its val list is inside train_all)
    elect_at_start: bool = False  # reference: also elects at step 0, on an untrained net
    elect_at_end: bool = True  # one more election + val Dice after the last step
    elect_metric: str = "hard"  # "hard" thresholded Dice, mean over cases | "soft" reference soft Dice
    elect_average: str = "probs"  # windows averaged as "probs" | "logits" (the reference's election)
    elect_max_cases: int | None = None  # cap on election / validation cases (CPU budgets)
    initial_teachers: tuple[str, ...] = ("flair",)  # reference default: FLAIR
    stage2_reset_teachers: bool = False  # reference: teachers restart from FLAIR at stage 2
    validation: str = "holdout"  # validation cases left out of training | "within": trained on too (reference)
    val_fraction: float = 0.2  # share of the cases in the validation set (reference: 57 of 285)
    n_val: int | None = None  # overrides val_fraction
    val_cases: tuple[str, ...] | None = None  # the validation set by case name (e.g. the reference's list)
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
    # -- data
    augment: str = "light"  # transforms.AUGMENTATIONS: "none" | "light" | "reference" | "scanner"
    normalization: str = "zscore"  # transforms.NORMALIZATIONS: "zscore" | "clip_zscore" (reference tail clip)
    spacing: tuple[float, float, float] | None = None  # voxel size (mm) to train at; None: the first case's
    # -- bookkeeping
    seed: int = 0
    amp: str = "off"  # "off" (fp32, the reference) | "bf16" | "fp16" (+ GradScaler) | "auto": CUDA only
    checkpoint_every: int = 500
    log_every: int = 10
    num_workers: int = 0  # DataLoader workers building batches (each batch is still a function of the step)
    cache_cases: bool = True  # keep loaded, padded, normalised cases in memory ...
    cache_mb: float | None = None  # ... up to this many MB (least recently drawn dropped first); None: all
    sw_batch_size: int = 1  # sliding-window batch for election / validation
    infer_crop_foreground: bool = True  # election / validation only on the brain's bounding box (speed)
    infer_roi_size: tuple[int, ...] | None = None  # election / validation window; None: the model's
    # trained window (inference.default_roi)

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps

    def stage_of(self, step: int) -> int:
        """1 or 2 for the 0-based ``step``."""
        return 1 if step < self.stage1_steps else 2


TRAIN_CONFIGS: dict[str, TrainConfig] = {
    # The reference run (its run.sh + train.py): crop 80x160x160 (D,H,W) = (160,160,80) in kit
    # layout, batch 2, SGD Nesterov 0.99, lr 1e-2 poly 0.9, 80k + 35k steps, election every 5000 on
    # a 20 % validation list that is also trained on, soft Dice on window-averaged logits, fp32,
    # its tail clip and augmentation, seed 999. docs/reference_recipe.md lists what still differs.
    "paper": TrainConfig(model="paper", roi_size=(160, 160, 80), batch_size=2, stage1_steps=80_000,
                         stage2_steps=35_000, elect_every=5_000, checkpoint_every=5_000, log_every=50,
                         num_workers=4, validation="within", elect_metric="soft", elect_average="logits",
                         augment="reference", normalization="clip_zscore", seed=999, cache_mb=2048),
    # CPU configurations for 96^3 phantoms (2 mm). Two deliberate deviations from the reference:
    # AdamW 3e-3 instead of SGD momentum 0.99, which needs thousands of steps to get anywhere (a
    # CPU budget has hundreds; docs/instructor_guide.md), and elections on 2 validation cases only.
    # 2-D, the demo default: axial 64x64 crops, 2 cases x 4 slices per step.
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
    for key in ("roi_size", "initial_teachers", "infer_roi_size", "val_cases", "spacing"):
        if kw.get(key) is not None:
            kw[key] = tuple(kw[key])
    return TrainConfig(**kw)


def get_train_config(name_or_config: str | TrainConfig, **overrides) -> TrainConfig:
    """A TRAIN_CONFIGS entry (copied) or a given config, with field overrides."""
    if isinstance(name_or_config, str) and name_or_config not in TRAIN_CONFIGS:
        raise ValueError(f"unknown train config {name_or_config!r}; expected one of {sorted(TRAIN_CONFIGS)}")
    base = TRAIN_CONFIGS[name_or_config] if isinstance(name_or_config, str) else name_or_config
    return dataclasses.replace(base, **overrides)


def model_config_for(config: TrainConfig, spacing: Sequence[float] | None = None) -> ModelConfig:
    """The network a run trains: ``config.model`` with its input contract set from the run -- the
    window (the training crop), the voxel size (``config.spacing``, else ``spacing``, the data's) and
    the normalisation -- so the checkpoint records what every later inference must do
    (``inference.model_input``)."""
    if isinstance(config.model, dict):
        base = config_from_dict(config.model)
    elif config.model in CONFIGS:
        base = CONFIGS[config.model]
    else:
        raise ValueError(f"unknown model config {config.model!r}; expected one of {sorted(CONFIGS)} or a dict")
    voxel = config.spacing or spacing
    return dataclasses.replace(base, roi_size=tuple(config.roi_size or base.roi_size), normalization=config.normalization,
                               spacing=tuple(float(v) for v in voxel) if voxel is not None else None)


def _validate_config(config: TrainConfig) -> None:
    from lckd_kit.transforms import AUGMENTATIONS, NORMALIZATIONS

    choices = dict(elect_on=("val", "train"), elect_metric=("hard", "soft"), elect_average=("probs", "logits"),
                   validation=("holdout", "within"), stage2_schedule=("continue", "restart"),
                   stage2_sampling=("batch", "sample"), amp=("auto", "off", "bf16", "fp16"), optimizer=("sgd", "adamw"),
                   augment=AUGMENTATIONS, normalization=NORMALIZATIONS)
    for key, allowed in choices.items():
        if getattr(config, key) not in allowed:
            raise ValueError(f"TrainConfig.{key} must be one of {allowed}, got {getattr(config, key)!r}")
    if config.stage1_steps < 0 or config.stage2_steps < 0 or config.total_steps == 0:
        raise ValueError("stage1_steps and stage2_steps must be >= 0 and not both 0")
    for key in ("batch_size", "crops_per_case", "elect_every", "checkpoint_every", "log_every"):
        if getattr(config, key) < 1:
            raise ValueError(f"TrainConfig.{key} must be >= 1, got {getattr(config, key)}")
    as_mask(list(config.initial_teachers))


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of the 0-based ``step`` (poly decay, power ``poly_power``).

    Stage 1: ``lr (1 - step / s1)^p``, down to ~0 at its end. Stage 2, ``"continue"`` (reference):
    the counter keeps running under the total length, ``lr (1 - step / (s1 + s2))^p`` -- so the lr
    jumps from ~0 back up to ``lr (s2 / (s1 + s2))^p`` at the boundary. ``"restart"`` (IM-Fuse): a
    fresh poly over stage 2, ``lr (1 - (step - s1) / s2)^p``.
    """
    s1, s2, p = config.stage1_steps, config.stage2_steps, config.poly_power
    if step < s1:
        return config.lr * (1 - step / s1) ** p
    if config.stage2_schedule == "continue":
        return config.lr * (1 - step / (s1 + s2)) ** p
    return config.lr * (1 - (step - s1) / s2) ** p


# --------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def validate(model, cases: Sequence[dict], roi_size=None, device=None, sw_batch_size: int = 1,
             crop_foreground: bool = True, reduce: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
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
# the pieces of a run: optimiser, AMP, resume, one step


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD Nesterov (the reference) or AdamW; the lr is set every step by :func:`lr_at`."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of a run: None (fp32) off CUDA or with ``amp="off"``; ``"auto"``: bf16 where
    the GPU has it, else fp16 (with a GradScaler)."""
    if device.type != "cuda" or config.amp == "off":
        return None
    if config.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if config.amp == "bf16" else torch.float16


def check_resume(path: Path, ckpt: dict, config: TrainConfig, model_dict: dict, world_size: int = 1) -> None:
    """Refuse a checkpoint of another network; warn when training settings changed."""
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


def train_step(net, batch: dict, teachers: Sequence[bool], optimizer, scaler, config: TrainConfig,
               device: torch.device, dtype: torch.dtype | None) -> dict[str, float]:
    """One optimiser step on ``batch`` (under DDP, backward averages the gradients over ranks).

    loss = Dice + BCE + kd_weight * KD, KD on in stage 2 and (``stage1_kd``) in stage 1, off for
    ``no_kd``. Returns the step's loss terms as floats."""
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True).float()
    available = batch["available"].to(device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits, feats = net(image, available)
    seg, dice, bce = segmentation_loss(logits.float(), label)
    # a model without per-modality features (another method, lckd_kit.methods) has nothing to distil
    use_kd = not config.no_kd and feats is not None and (batch["step"] >= config.stage1_steps or config.stage1_kd)
    kd = distillation_loss(feats.float(), available, torch.tensor(teachers, device=device), distance=config.kd_distance,
                           pairs=config.kd_pairs, reduction=config.kd_reduction) if use_kd else seg.new_zeros(())
    loss = seg + config.kd_weight * kd
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return {"loss": loss.item(), "dice_loss": dice.item(), "bce": bce.item(), "kd": kd.item()}


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


class _Run:
    """The state of one training run and what it writes: teachers, elections, history, checkpoints.

    ``safe`` is the last step whose update AND bookkeeping are complete (None while the weights
    change): what an interruption may save."""

    def __init__(self, config, model, net, optimizer, scaler, out_dir, world, split, elect_cases, val_cases,
                 device, callback):
        self.config, self.model, self.net, self.optimizer, self.scaler = config, model, net, optimizer, scaler
        self.out_dir, self.world, self.split, self.device, self.callback = out_dir, world, split, device, callback
        self.elect_cases, self.val_cases = elect_cases, val_cases
        self.teachers = as_mask(list(config.initial_teachers))
        self.elections: list[ElectionResult] = []
        self.main = world.is_main
        self.saved_config = {**train_config_to_dict(config), "model_config": config_to_dict(model.config),
                             "world_size": world.world_size}
        self.history = ckpt_io.HistoryWriter(None)  # replaced by the run folder's once it is known
        self.safe: int | None = 0

    @property
    def distributed(self) -> bool:
        return self.world.world_size > 1

    def emit(self, record: dict, completes: bool = False) -> None:
        self.history.add(record)
        if completes:  # the last record of this step is written: the state is consistent again
            self.safe = record["step"]
        if self.callback is not None and self.main:
            self.callback(record["step"], record)

    def save(self, step: int, *names: str, sync: bool = True) -> None:
        if self.out_dir is not None and self.main:
            ckpt = ckpt_io.checkpoint_dict(
                self.model, self.saved_config, optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                step=step, teachers=list(self.teachers), elections=[e.to_record() for e in self.elections],
                split=self.split)
            for name in names:
                ckpt_io.save(ckpt, self.out_dir / name)
        if sync and self.distributed:  # nobody can go on to read (resume from) a half-written checkpoint
            dist_utils.barrier()

    def elect(self, step: int) -> None:
        c = self.config
        reduce = dist_utils.all_reduce_sum if self.distributed else None
        res = elect_teachers(self.model, self.elect_cases, roi_size=c.infer_roi_size, metric=c.elect_metric,
                             average=c.elect_average, device=self.device, step=step, include_all=c.elect_on == "val",
                             sw_batch_size=c.sw_batch_size, crop_foreground=c.infer_crop_foreground, reduce=reduce)
        self.teachers = res.teachers
        self.elections.append(res)
        self.emit(res.to_record())
        # the mechanism: how close each modality's features are to the others', and how far the
        # mean fill is from a missing modality's own feature (docs/instructor_guide.md)
        if hasattr(self.model, "encode"):  # models with per-modality bottleneck features
            self.emit({"kind": "features", "step": step, **feature_probe(self.model, self.elect_cases, self.device,
                                                                            reduce)})
        dice = res.all_dice if res.all_dice is not None else validate(
            self.model, self.val_cases, roi_size=c.infer_roi_size, device=self.device, sw_batch_size=c.sw_batch_size,
            crop_foreground=c.infer_crop_foreground, reduce=reduce)
        self.emit({"kind": "val", "step": step, "dice": {r: round(float(v), 6) for r, v in zip(REGIONS, dice)}},
                  completes=True)

    def resume(self, path: Path) -> int:
        """Load model, optimiser, scaler, teachers, elections and history from ``path``; returns its step."""
        ckpt = ckpt_io.load_checkpoint(path, self.device)
        with warnings.catch_warnings():
            if not self.main:  # one warning per run, not one per rank
                warnings.simplefilter("ignore")
            check_resume(path, ckpt, self.config, self.saved_config["model_config"], self.world.world_size)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.teachers = tuple(bool(t) for t in ckpt["teachers"])
        self.elections = [ElectionResult.from_record(r) for r in ckpt["elections"]]
        self.safe = int(ckpt["step"])
        return self.safe


def _resume_path(resume, out_dir: Path | None, world) -> Path | None:
    path = None
    if resume is True and out_dir is not None and (out_dir / "last.pt").is_file():
        path = out_dir / "last.pt"
    elif resume not in (False, True, None):
        path = Path(resume)
    if world.world_size > 1:  # all ranks must resume from the same file, or none
        seen = int(dist_utils.all_reduce_sum(np.array([path is not None and path.is_file()]))[0])
        if 0 < seen < world.world_size:
            raise ValueError(f"checkpoint {path or out_dir / 'last.pt'} is visible to {seen} of "
                             f"{world.world_size} ranks: out_dir must be on a filesystem all nodes share")
    return path


def _batches(source: StepBatches, config: TrainConfig):
    """Iterate the batches of ``source.steps``, built ahead by DataLoader workers if configured."""
    if config.num_workers == 0:
        return (source[k] for k in range(len(source)))
    if config.cache_cases:  # fill the cache before the workers fork: shared, not copied
        for i in range(len(source.cases)):
            source.prepared(i)
    return torch.utils.data.DataLoader(source, batch_size=None, num_workers=config.num_workers,
                                       persistent_workers=False, prefetch_factor=2)


# --------------------------------------------------------------------------------------------
# the loop


def train(
    config: TrainConfig | str,
    data: str | Path | Sequence,
    out_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    resume: bool | str | Path = False,
    callback: Callable[[int, dict], Any] | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    ddp: bool | None = None,
) -> TrainResult:
    """Train LCKD (or the no-KD baseline) with the two-stage recipe.

    Args:
        config: a TrainConfig or a TRAIN_CONFIGS name.
        data: a folder of cases (any layout ``data.find_cases`` reads) or a list of cases in any
            form ``data.as_case`` reads (raw intensities).
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
    out_dir = Path(out_dir) if out_dir is not None else None

    # -- data, split and the model's input contract (a function of the case list and the seed)
    cases = training_cases(data)
    model_cfg = model_config_for(config, case_spacing(cases[0]))
    config = dataclasses.replace(config, roi_size=tuple(model_cfg.roi_size))
    train_idx, val_idx = split_for(cases, config)
    split = {"train": [case_name(cases[i]) for i in train_idx], "val": [case_name(cases[i]) for i in val_idx]}
    source = StepBatches([cases[i] for i in train_idx], config, model_cfg.spatial_dims, spacing=model_cfg.spacing,
                         rank=world.rank, world_size=world.world_size)
    # election / validation: each rank loads and scores only its shard; the sums are reduced
    own = lambda idx: dist_utils.shard(idx[:config.elect_max_cases], world.rank, world.world_size)  # noqa: E731
    scored = lambda idx: [_scoring_case(cases[i], model_cfg) for i in own(idx)]  # noqa: E731
    elect_cases = scored(val_idx if config.elect_on == "val" else train_idx)
    val_cases = elect_cases if config.elect_on == "val" else scored(val_idx)

    # -- model and optimiser; the same seed on every rank gives the same initial weights
    torch.manual_seed(config.seed)
    model = build_model(model_cfg).to(device)
    optimizer = build_optimizer(model, config)
    dtype = amp_dtype(config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    resume_from = _resume_path(resume, out_dir, world)
    records = []
    if resume_from is not None and out_dir is not None:  # keep the records up to the checkpoint
        records = ckpt_io.read_history(out_dir)
    # The parameters and the set of those that get a gradient are the same in every step: the
    # encoder is shared by all modalities (a missing one removes no path) and the only unused ones,
    # ASPP branch5_conv.weight and branch5_norm.weight, never are (the global branch is a constant,
    # model.ASPP.global_branch). So static_graph: DDP learns them in step 1 and leaves their grads
    # None, without find_unused_parameters' graph walk every step (tests/test_distributed.py pins it).
    net = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True) if distributed else model
    run = _Run(config, model, net, optimizer, scaler, out_dir, world, split, elect_cases, val_cases, device, callback)
    start = run.resume(resume_from) if resume_from is not None else 0
    kept = [r for r in records if r.get("step", 0) <= start]  # records after the checkpoint are redone
    if distributed:  # every rank has read the old history before rank 0 rewrites it
        dist_utils.barrier()
    writes = out_dir is not None and run.main
    if writes:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps({**run.saved_config, "split": split}, indent=1) + "\n")
    run.history = ckpt_io.HistoryWriter(out_dir / "history.jsonl" if writes else None, kept)

    end = config.total_steps if max_steps is None else min(config.total_steps, max_steps)
    source.steps = list(range(start, end))
    # Bit-identical resume needs deterministic kernels; on the CPU they cost nothing.
    det_before = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    bar = None
    if progress and run.main:
        from tqdm.auto import tqdm
        bar = tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True)
    try:
        if start == 0 and config.elect_at_start:
            run.elect(0)
        net.train()
        window: list[dict] = []
        for batch in _batches(source, config):
            step = batch["step"]
            if step == config.stage1_steps:  # entering stage 2
                if config.stage2_reset_teachers:
                    run.teachers = as_mask(list(config.initial_teachers))
                if config.stage2_reset_momentum:
                    optimizer.state.clear()
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = train_step(net, batch, run.teachers, optimizer, scaler, config, device, dtype)
            run.safe = None  # the weights moved on; the step's bookkeeping is still owed
            window.append(losses)
            done = step + 1
            elect_due = done % config.elect_every == 0 or (done == config.total_steps and config.elect_at_end)
            if done % config.log_every == 0 or done == end:
                run.emit(_step_record(window, done, config, lr, batch, run), completes=not elect_due)
                window = []
            if elect_due:
                run.elect(done)
            if done % config.checkpoint_every == 0 and done < end:
                run.save(done, "last.pt")
            run.safe = done
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses['loss']:.3f}", teachers="+".join(
                    m for m, t in zip(MODALITIES, run.teachers) if t))
        if end > start:
            run.save(end, "last.pt", *(("final.pt",) if end == config.total_steps else ()))
    except KeyboardInterrupt:
        # Interrupted (e.g. a notebook's stop button): keep what is consistent so resume=True
        # continues from there. Not possible in the middle of an update or its bookkeeping.
        if run.safe is not None and run.safe > start and run.main:
            run.save(run.safe, "last.pt", sync=False)  # no barrier: the other ranks may not be interrupted
            warnings.warn(f"interrupted: saved {out_dir / 'last.pt' if out_dir else 'nothing'} at step {run.safe}")
        raise
    finally:
        if bar is not None:
            bar.close()
        run.history.close()
        torch.use_deterministic_algorithms(det_before)
    model.eval()
    return TrainResult(model=model, history=run.history.records, teachers=run.teachers, elections=run.elections,
                       out_dir=out_dir, config=config, split=split, step=max(end, start))


def split_for(cases: list, config: TrainConfig) -> tuple[list[int], list[int]]:
    """(training, validation) case indices: ``val_cases`` by name, else a seeded draw; with
    ``validation="within"`` every case is trained on, the validation ones too (the reference)."""
    n = len(cases)
    if config.val_cases:
        names = [case_name(c) for c in cases]
        missing = sorted(set(config.val_cases) - set(names))
        if missing:
            raise ValueError(f"validation cases {missing[:5]} are not among the {n} training cases")
        val = sorted(names.index(v) for v in config.val_cases)
        rest = [i for i in range(n) if i not in set(val)]
    else:
        n_val = config.n_val if config.n_val is not None else int(round(config.val_fraction * n))
        rest, val = split_cases(n, n_val, config.seed)
    return (list(range(n)) if config.validation == "within" else rest), val


def _scoring_case(case, model_cfg: ModelConfig) -> dict:
    """A whole-volume case for election / validation, at the model's voxel size: name, normalised
    image, regions."""
    d = at_spacing(as_case(case), model_cfg.spacing)
    return {"name": d["name"], "image": normalize_image(d["image"], model_cfg.normalization), "label": d["label"]}


def _step_record(window: list[dict], done: int, config: TrainConfig, lr: float, batch: dict, run: _Run) -> dict:
    """The ``"step"`` history record: mean losses over the last ``log_every`` steps (over all ranks)."""
    mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
    if run.distributed:  # equal local batches: the global batch's loss is the mean of the ranks'
        mean = dict(zip(mean, (dist_utils.all_reduce_sum(np.array(list(mean.values()))) / run.world.world_size).tolist()))
    return {"kind": "step", "step": done, "stage": 1 if done <= config.stage1_steps else 2,
            **{k: round(v, 6) for k, v in mean.items()}, "lr": lr, "subset": batch["subset"],
            "teachers": [m for m, t in zip(MODALITIES, run.teachers) if t]}


__all__ = ["TrainConfig", "TRAIN_CONFIGS", "TrainResult", "train", "train_step", "get_train_config",
           "train_config_to_dict", "train_config_from_dict", "model_config_for", "lr_at", "validate",
           "build_optimizer", "amp_dtype", "check_resume", "split_for"]
