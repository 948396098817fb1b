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
``last.pt`` (every ``checkpoint_every`` steps and at the end) with the one before it kept as
``last.prev.pt`` until the run ends, ``final.pt`` (at the end, written before the last ``last.pt``);
see :mod:`lckd_kit.checkpoint`. Nothing a run writes is lost or silently wrong:

* one run per folder (``.lock``; the lock of a process that died is taken over);
* temporaries of killed runs are removed at the next start; ``resume=True`` falls back to
  ``last.prev.pt`` when ``last.pt`` is unreadable, and writes a missing ``final.pt``;
* Ctrl-C / SIGTERM (in the main thread) stop at the next step boundary with a checkpoint, then raise
  :class:`TrainingInterrupted` (a KeyboardInterrupt); a second one stops at once (:mod:`lckd_kit.train_stop`);
* a non-finite loss stops the run (:class:`TrainingDiverged`) before it reaches the weights, keeping
  a checkpoint of the last finite state.

Multi-GPU / multi-node: under ``torchrun`` (an initialised process group) the same loop runs with
the model in DistributedDataParallel; ``batch_size`` is per rank, each rank builds its slice of
the step's global batch, elections are sharded and reduced, and only rank 0 writes the run folder.
Semantics (global batch, lr, subsets) in :mod:`lckd_kit.distributed`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from lckd_kit import ALL_PRESENT, MODALITIES, REGIONS, as_mask
from lckd_kit import checkpoint as ckpt_io
from lckd_kit import distributed as dist_utils
from lckd_kit.batches import StepBatches, case_name, split_cases, training_cases
from lckd_kit.data import case_spacing
from lckd_kit.distill import distillation_loss, feature_probe, segmentation_loss
from lckd_kit.election import ElectionResult, elect_teachers, scoring_case
from lckd_kit.inference import predict_subsets
from lckd_kit.metrics import hard_dice
from lckd_kit.model import LCKDNet, config_to_dict
from lckd_kit.train_config import (TRAIN_CONFIGS, TrainConfig, get_train_config, lr_at,  # noqa: F401
                                    model_config_for, train_config_from_dict, train_config_to_dict,
                                    validate_train_config)
from lckd_kit.train_stop import StopNow, StopRequest, TrainingDiverged, TrainingInterrupted

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
               device: torch.device, dtype: torch.dtype | None,
               agree: Callable[[bool], bool] | None = None) -> dict[str, float]:
    """One optimiser step on ``batch`` (under DDP, backward averages the gradients over ranks).

    loss = Dice + BCE + kd_weight * KD, KD on in stage 2 and (``stage1_kd``) in stage 1, off for
    ``no_kd``. Returns the step's loss terms as floats. A non-finite loss raises
    :class:`TrainingDiverged` before anything is updated (with fp16 the GradScaler skips such steps
    itself); ``agree(bad) -> bad on any rank`` makes that decision the same on every rank."""
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
    if not scaler.is_enabled():
        value = loss.item()
        bad = not math.isfinite(value)
        if agree is not None:
            bad = agree(bad)
        if bad:
            terms = ", ".join(f"{k} {v.item():.4g}" for k, v in (("dice", dice), ("bce", bce), ("kd", kd)))
            raise TrainingDiverged(f"the loss became non-finite at step {batch['step'] + 1} ({value} on this "
                                   f"process: {terms}; lr {optimizer.param_groups[0]['lr']:.3g}, subset "
                                   f"{batch.get('subset', '?')})")
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
    start_step: int = 0  # the step it started (resumed) from
    notes: list[str] = field(default_factory=list)  # what a resume repaired or fell back to

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
        self.saved_step: int | None = None  # the step of the checkpoint this process wrote last

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
        """Write the run's state at ``step`` as each of ``names`` (``last.pt`` keeps its predecessor
        as ``last.prev.pt``). Non-finite weights are never written over a good checkpoint."""
        if self.out_dir is not None and self.main:
            bad = [n for n, p in self.model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
            if bad:
                raise TrainingDiverged(f"the weights became non-finite by step {step} (e.g. {bad[0]}); "
                                       f"{self.out_dir / 'last.pt'} keeps the last finite state")
            ckpt = ckpt_io.checkpoint_dict(
                self.model, self.saved_config, optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                step=step, teachers=list(self.teachers), elections=[e.to_record() for e in self.elections],
                split=self.split)
            for name in names:
                if name == "last.pt":
                    ckpt_io.save_rotating(ckpt, self.out_dir / name)
                else:
                    ckpt_io.save(ckpt, self.out_dir / name)
        self.saved_step = step  # on every rank, so they all agree on what is saved
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

    def resume(self, path: Path, ckpt: dict | None = None) -> int:
        """Load model, optimiser, scaler, teachers, elections and history from ``path`` (or the
        already loaded ``ckpt`` read from it); returns its step."""
        ckpt = ckpt if ckpt is not None else ckpt_io.load_checkpoint(path, self.device)
        with warnings.catch_warnings():
            if not self.main:  # one warning per run, not one per rank
                warnings.simplefilter("ignore")
            check_resume(path, ckpt, self.config, self.saved_config["model_config"], self.world.world_size)
        ckpt_io.fit_state_dict(self.model, ckpt["model"], path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.teachers = tuple(bool(t) for t in ckpt["teachers"])
        self.elections = [ElectionResult.from_record(r) for r in ckpt["elections"]]
        self.safe = int(ckpt["step"])
        return self.safe


def _resume_path(resume, out_dir: Path | None, world, device, notes: list[str]) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its contents: ``resume`` itself when it is a path; for
    ``True``, ``out_dir/last.pt``, or ``last.prev.pt`` when ``last.pt`` is missing or unusable
    (saying so in ``notes``); (None, None) for a fresh start."""
    path, ckpt = None, None
    if resume is True and out_dir is not None:
        last = out_dir / "last.pt"
        prev = ckpt_io.previous_path(last)
        problem = None
        if last.is_file():
            try:
                path, ckpt = last, ckpt_io.load_checkpoint(last, device)
            except ckpt_io.CheckpointError as e:
                problem = str(e)
        elif prev.is_file():
            problem = f"{last} is missing"
        if problem is not None:
            if not prev.is_file():
                raise ckpt_io.CheckpointError(f"cannot resume: {problem}; there is no {prev.name} to fall back to: "
                                              f"start over without resume (or --resume) in another folder")
            path, ckpt = prev, ckpt_io.load_checkpoint(prev, device)
            notes.append(f"{problem.rstrip('.')}; resumed from {prev} (step {ckpt['step']}) instead")
    elif resume not in (False, True, None):
        path = Path(resume)
    if world.world_size > 1:  # all ranks must resume from the same file, or none
        seen = int(dist_utils.all_reduce_sum(np.array([path is not None and path.is_file()]))[0])
        if 0 < seen < world.world_size:
            raise ValueError(f"checkpoint {path or out_dir / 'last.pt'} is visible to {seen} of "
                             f"{world.world_size} ranks: out_dir must be on a filesystem all nodes share")
    return path, ckpt


def _batches(source: StepBatches, config: TrainConfig):
    """Iterate the batches of ``source.steps``, built ahead by DataLoader workers if configured."""
    if config.num_workers == 0:
        return (source[k] for k in range(len(source)))
    # fill the cache before the workers fork (they share its pages), then freeze it so that no
    # worker grows a cache of its own: the budget then holds for all processes together
    source.fill_cache()
    source.freeze()
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
    validate_train_config(config)
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
    notes: list[str] = []
    # one writer per run folder; what killed runs left behind goes before anything is read
    lock = ckpt_io.RunLock(out_dir) if out_dir is not None and world.is_main else None
    if lock is not None:
        lock.acquire()
        if lock.took_over is not None:
            notes.append(f"{out_dir}: took over the lock of a run that is no longer running "
                         f"(PID {lock.took_over.get('pid', '?')}, since {lock.took_over.get('since', '?')})")
        ckpt_io.remove_orphans(out_dir)
    try:
        return _train(config, data, out_dir, device, resume, callback, progress, max_steps, world, notes)
    finally:
        if lock is not None:
            lock.release()


def _train(config: TrainConfig, data, out_dir: Path | None, device: torch.device, resume, callback, progress: bool,
           max_steps: int | None, world, notes: list[str]) -> TrainResult:
    """:func:`train` once the run folder is locked."""
    distributed = world.world_size > 1
    for note in notes:
        warnings.warn(note, stacklevel=3)

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
    scored = lambda idx: [scoring_case(cases[i], model_cfg) for i in own(idx)]  # noqa: E731
    elect_cases = scored(val_idx if config.elect_on == "val" else train_idx)
    val_cases = elect_cases if config.elect_on == "val" else scored(val_idx)

    # -- model and optimiser; the same seed on every rank gives the same initial weights
    torch.manual_seed(config.seed)
    from lckd_kit import methods

    model = methods.build(model_cfg).to(device)  # LCKDNet, or another registered method's model
    optimizer = build_optimizer(model, config)
    dtype = amp_dtype(config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    n_notes = len(notes)
    resume_from, resumed = _resume_path(resume, out_dir, world, device, notes)
    for note in notes[n_notes:]:
        warnings.warn(note, stacklevel=3)
    records = []
    if resume_from is not None and out_dir is not None:  # keep the records up to the checkpoint
        records = ckpt_io.read_history(out_dir)
    # LCKD: the parameters and the set of those that get a gradient are the same in every step: the
    # encoder is shared by all modalities (a missing one removes no path) and the only unused ones,
    # ASPP branch5_conv.weight and branch5_norm.weight, never are (the global branch is a constant,
    # model.ASPP.global_branch). So static_graph: DDP learns them in step 1 and leaves their grads
    # None, without find_unused_parameters' graph walk every step (tests/test_distributed.py pins it).
    # Methods with one encoder per modality leave a missing modality's encoder unused, a set that
    # changes with the subset: they need DDP's search for unused parameters.
    shared = isinstance(model, LCKDNet)
    net = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, static_graph=shared,
        find_unused_parameters=not shared) if distributed else model
    run = _Run(config, model, net, optimizer, scaler, out_dir, world, split, elect_cases, val_cases, device, callback)
    start = run.resume(resume_from, resumed) if resume_from is not None else 0
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
    stop = StopRequest().install()

    def agree(bad: bool) -> bool:
        """Whether any rank's loss is non-finite; under DDP the stop request is shared too, so
        every rank stops at the same step boundary (one small all-reduce per step)."""
        if not distributed:
            return bad
        flags = dist_utils.all_reduce_sum(np.array([float(bad), float(stop.signum is not None)]))
        if flags[1] > 0 and stop.signum is None:
            stop.signum = signal.SIGTERM  # another rank was asked to stop
        return bool(flags[0] > 0)

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
            losses = train_step(net, batch, run.teachers, optimizer, scaler, config, device, dtype, agree=agree)
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
            if stop.signum is not None and done < end:  # asked to stop: at this boundary all is consistent
                if run.saved_step != done:
                    run.save(done, "last.pt")  # every rank got here: the barrier is safe
                name = signal.Signals(stop.signum).name
                where = f"saved {out_dir / 'last.pt'} at step {done}" if out_dir is not None else \
                    f"stopped at step {done} (no out_dir: nothing saved)"
                raise TrainingInterrupted(f"{name}: {where}", step=done,
                                          path=out_dir / "last.pt" if out_dir is not None else None, signum=stop.signum)
        if end > start:
            # final.pt first: a kill between the two files leaves last.pt one checkpoint back, and
            # resuming from it redoes the last steps and writes both again
            run.save(end, *(("final.pt",) if end == config.total_steps else ()), "last.pt")
        elif start == config.total_steps and out_dir is not None and run.main and not (out_dir / "final.pt").is_file():
            run.save(start, "final.pt", sync=False)
            notes.append(f"{out_dir / 'final.pt'} was missing: written from the finished run's "
                         f"{resume_from.name} (step {start})")
            warnings.warn(notes[-1], stacklevel=2)
        if distributed and start == config.total_steps:
            dist_utils.barrier()
        if end == config.total_steps and out_dir is not None and run.main:
            ckpt_io.previous_path(out_dir / "last.pt").unlink(missing_ok=True)  # finished: final.pt is the fallback
    except TrainingInterrupted:
        raise
    except StopNow as e:  # a second interrupt: out at once, the last regular checkpoint stays
        last = out_dir / "last.pt" if out_dir is not None and (out_dir / "last.pt").is_file() else None
        raise TrainingInterrupted(str(e), step=run.saved_step, path=last, signum=stop.signum) from None
    except KeyboardInterrupt:
        # Interrupted (e.g. a notebook's stop button): keep what is consistent so resume=True
        # continues from there. Not possible in the middle of an update or its bookkeeping.
        if run.safe is not None and run.safe > start and run.main:
            run.save(run.safe, "last.pt", sync=False)  # no barrier: the other ranks may not be interrupted
            warnings.warn(f"interrupted: saved {out_dir / 'last.pt' if out_dir else 'nothing'} at step {run.safe}")
        raise
    except TrainingDiverged as e:
        # the weights of the last complete step are still finite (the bad step changed nothing)
        saved = ""
        if run.safe is not None and run.safe > start and run.main and out_dir is not None:
            try:
                run.save(run.safe, "last.pt", sync=False)
                saved = f"; saved the last finite state to {out_dir / 'last.pt'} (step {run.safe})"
            except TrainingDiverged:
                pass
        if not saved and out_dir is not None and (out_dir / "last.pt").is_file():
            saved = f"; {out_dir / 'last.pt'} holds the last checkpoint"
        raise TrainingDiverged(f"training stopped: {e}{saved}; lower the learning rate or check the data, then "
                               f"resume (resume=True / --resume) or start over") from None
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        run.history.close()
        torch.use_deterministic_algorithms(det_before)
    model.eval()
    return TrainResult(model=model, history=run.history.records, teachers=run.teachers, elections=run.elections,
                       out_dir=out_dir, config=config, split=split, step=max(end, start), start_step=start,
                       notes=notes)


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
