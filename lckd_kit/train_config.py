"""What defines a training run: :class:`TrainConfig`, the named schedules and the learning rate.

``TRAIN_CONFIGS["paper"]`` is the reference's recipe (docs/reference_recipe.md); ``small2d`` and
``small`` are the CPU schedules of the teaching kit; ``tiny`` is for tests. The loop that runs a
config is :mod:`lckd_kit.train`, which re-exports everything here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from lckd_kit import as_mask
from lckd_kit.model import ModelConfig

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
# The other missing-modality methods (lckd_kit.methods, docs/methods.md) on small2d's / small's
# schedule, changed only in the model: "dropout_small2d", "hemis_small", "regionfusion_small2d", ...
TRAIN_CONFIGS.update({f"{m}_{size}": dataclasses.replace(TRAIN_CONFIGS[size], model=f"{m}_{size}")
                      for m in ("dropout", "hemis", "regionfusion") for size in ("small2d", "small")})


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
    from lckd_kit import methods  # every registered method's configs, LCKD's (model.CONFIGS) among them

    if isinstance(config.model, dict):
        base = methods.config_from_dict(config.model)
    elif config.model in methods.model_configs():
        base = methods.model_configs()[config.model]
    else:
        raise ValueError(f"unknown model config {config.model!r}; expected one of "
                         f"{sorted(methods.model_configs())} or a dict")
    voxel = config.spacing or spacing
    return dataclasses.replace(base, roi_size=tuple(config.roi_size or base.roi_size), normalization=config.normalization,
                               spacing=tuple(float(v) for v in voxel) if voxel is not None else None)


def validate_train_config(config: TrainConfig) -> None:
    """ValueError naming the field when a setting of ``config`` is not one the loop knows."""
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


__all__ = ["TrainConfig", "TRAIN_CONFIGS", "train_config_to_dict", "train_config_from_dict", "get_train_config",
           "model_config_for", "validate_train_config", "lr_at"]
