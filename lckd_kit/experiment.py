"""The experiment the kit exists for: LCKD against the same network trained without distillation.

    run_experiment()              per seed: train LCKD and the no-KD baseline (same seed, same
                                  schedule, same batches), evaluate both on held-out phantoms over
                                  the 15 modality subsets, write report.md + report.html
                                  (``lckd-kit experiment``, ``make demo``)
    run_experiment(quick=True)    no training: evaluate the shipped checkpoint, shorter report
    train_shipped_checkpoint()    the one function that makes checkpoints/lckd_small_phantom.pt
    workshop_prep()               cache what the notebooks need (a generator of progress lines)

Data. Training + validation cases are ``phantom.ensure_phantoms(24, seed=0)`` -- the set the
notebooks use -- split by ``batches.split_cases`` (the shipped checkpoint trains on the sets
of :data:`SHIPPED_DATA` instead). The held-out test cases are another phantom set,
``PhantomTest_000...`` made with seed 1000; every case seed is an independent SeedSequence
stream, and :func:`heldout_phantoms` checks that no test seed occurs in the training set.

Time budget: ``make demo`` must stay within 10 minutes on 2 CPU cores (phantoms, two trainings of
the small2d schedule, two 15-subset evaluations); the report's setup section records the wall and
CPU time of every phase, and docs/performance.md the measured figures.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
import os
import platform
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from lckd_kit import ALL_PRESENT, MODALITIES, REGIONS, SUBSETS
from lckd_kit import checkpoint as ckpt_io
from lckd_kit.data import load_cases
from lckd_kit.evaluate import evaluate
from lckd_kit.inference import predict_subsets
from lckd_kit.metrics import nest_regions
from lckd_kit.paths import default_cache_dir, shipped_checkpoint, source_checkout
from lckd_kit.report import NO_T1CE, ExperimentSummary, RunSummary, write_report
from lckd_kit.runtime import format_seconds, resolve_device

#: training + validation phantoms of the demo, the shipped checkpoint and the notebooks
TRAIN_SEED, DEMO_N_CASES = 0, 24
#: held-out test phantoms: another seed, another name prefix (never seen in training)
TEST_SEED, DEMO_N_TEST, TEST_PREFIX = 1000, 6, "PhantomTest"
#: the grid of all demo phantoms: 96^3 voxels of 2 mm
DEMO_GRID = 96
#: The shipped checkpoint's schedule: small2d with 5x the steps, and the "scanner" augmentation
#: (bias fields on top of the reference's) so that the model transfers better to real scans
#: (checkpoints/README.md). lckd_kit.calibration measures phantoms with the same schedule.
SHIPPED_TRAIN_OVERRIDES = dict(stage1_steps=1500, stage2_steps=1500, elect_every=500, augment="scanner")
#: ... and its data: DEMO_N_CASES phantoms per cue level, version 2's (cues 0: a tumour barely
#: darker than brain on T1ce) and the calibrated ones (cues 1), with BraTS 2018's share of low-grade
#: gliomas (75 of its 285 training cases) instead of the generator's 0.15. Trained on one cue level,
#: the model learns our phantoms' exact contrasts, finds a real tumour from FLAIR and T2 only, and
#: misses a non-enhancing core whenever T1ce is given (docs/phantoms.md, "The shipped model").
SHIPPED_DATA = dict(cues=(0.0, 1.0), no_et_fraction=0.26)

_MAKE_CHECKPOINT_HINT = ("make it with `python -c \"from lckd_kit.experiment import train_shipped_checkpoint; "
                         "train_shipped_checkpoint()\"` (minutes on a 2-core CPU), or run the full experiment "
                         "without --quick")


# --------------------------------------------------------------------------------------------
# data


def heldout_phantoms(n: int = DEMO_N_TEST, seed: int = TEST_SEED, grid: int = DEMO_GRID,
                     cache_dir: str | os.PathLike | None = None, progress: bool = True,
                     train_dir: str | os.PathLike | None = None, cues: float = 1.0) -> Path:
    """Folder of ``n`` held-out test phantoms ``PhantomTest_000...`` (generated once, cached).

    With ``train_dir`` (a folder made by ``phantom.generate`` / ``ensure_phantoms``), raises
    ``RuntimeError`` if any case seed occurs in both sets. ``cues``: see ``phantom.make_case``.
    """
    from lckd_kit import phantom

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"heldout_v{phantom.GENERATOR_VERSION}_g{grid}_standard_{phantom.cues_tag(cues)}_s{seed}_n{n}"
    phantom.generate(folder, n, seed=seed, grid=grid, prefix=TEST_PREFIX, progress=progress, cues=cues)
    if train_dir is not None:
        shared = _case_seeds(folder) & _case_seeds(Path(train_dir))
        if shared:
            raise RuntimeError(f"test and training phantoms share case seeds {sorted(shared)}: choose another seed")
    return folder


def shipped_training_sets(n_cases: int = DEMO_N_CASES, grid: int = DEMO_GRID,
                          cache_dir: str | os.PathLike | None = None, progress: bool = True) -> list[Path]:
    """The phantom sets the shipped checkpoint trains on (:data:`SHIPPED_DATA`), one folder per cue
    level in that order, generated on first use; their cases are ``PhantomCues0_...`` and
    ``PhantomBraTS_...`` so that names stay unique across the sets."""
    from lckd_kit.phantom import ensure_phantoms

    return [ensure_phantoms(n_cases, seed=TRAIN_SEED, grid=grid, cache_dir=cache_dir, progress=progress, cues=cues,
                            no_et_fraction=SHIPPED_DATA["no_et_fraction"],
                            prefix="PhantomBraTS" if cues == 1 else f"PhantomCues{cues:g}")
            for cues in SHIPPED_DATA["cues"]]


def _manifest_cases(folder: Path) -> dict[str, dict]:
    """Case name -> its manifest entry (seed, ...) of a folder written by ``phantom.generate``."""
    from lckd_kit.phantom import MANIFEST

    return json.loads((Path(folder) / MANIFEST).read_text())["cases"]


def case_folders(sets: Sequence[Path]) -> list[str]:
    """Every case folder of the given phantom sets, set by set, in name order (a training list)."""
    return [str(Path(s) / name) for s in sets for name in sorted(_manifest_cases(s))]


def _case_seeds(folder: Path) -> set[int]:
    return {int(c["seed"]) for c in _manifest_cases(folder).values()}


def load_eval_cases(folder: str | os.PathLike) -> list[dict]:
    """Labelled cases of ``folder``, loaded and normalised (what :func:`evaluate.evaluate` expects)."""
    return load_cases(folder, labelled=True, normalize=True)


def example_case(cases: list[dict]) -> dict:
    """The test case with the most enhancing tumour (the most to look at)."""
    return max(cases, key=lambda c: (int(np.asarray(c["label"])[0].sum()), int(np.asarray(c["label"])[2].sum())))


# --------------------------------------------------------------------------------------------
# pieces of the report


def machine_info(device: torch.device) -> str:
    """One line: CPU model, cores, torch threads, versions, device, load average."""
    import monai

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, MONAI {monai.__version__}, Python {platform.python_version()}, device {device}{gpu}{load}")


def _examples(model, case: dict, device) -> dict:
    """The model's nested regions of the example case with all modalities and without T1ce."""
    prob = predict_subsets(model, case["image"], [ALL_PRESENT, NO_T1CE], device=device)
    pred = nest_regions(prob > 0.5).numpy()
    return {ALL_PRESENT: pred[0], NO_T1CE: pred[1]}


def _setup_bullets(cfg, n_cases, grid: int, test_cases, hd95: bool, machine: str, phases: dict, total: float,
                   cpu_seconds: float, baseline: bool = True) -> list[str]:
    from lckd_kit.model import build_model, parameter_count
    from lckd_kit.train import model_config_for

    mcfg = model_config_for(cfg)
    return [
        f"Training config `{cfg.model if isinstance(cfg.model, str) else mcfg.name}` model "
        f"({parameter_count(build_model(mcfg)):,} parameters, {mcfg.spatial_dims}-D), "
        f"{cfg.stage1_steps} steps with all modalities + {cfg.stage2_steps} steps with random missing "
        f"modalities, batch {cfg.batch_size}, crop {tuple(mcfg.roi_size)}, {cfg.optimizer} lr {cfg.lr:g}, "
        f"KD weight {cfg.kd_weight:g}{' (LCKD) / 0 (no-KD)' if baseline else ''}, election every "
        f"{cfg.elect_every} steps on at most {cfg.elect_max_cases or 'all'} validation case(s).",
        f"Data: {n_cases} phantom cases (seed {TRAIN_SEED}) split into training and validation, {len(test_cases)} "
        f"held-out test phantoms (seed {TEST_SEED}, names `{TEST_PREFIX}_*`), {grid}³ voxels of {192.0 / grid:g} mm.",
        "Evaluation: sliding window over each held-out volume (its brain bounding box) with the model's trained "
        "window, probabilities averaged, threshold 0.5, regions nested (ET ⊂ TC ⊂ WT), Dice per case and region"
        + (", HD95 (MONAI, mm)" if hd95 else " (HD95 off: `hd95=True` adds it)")
        + "; empty-region convention `brats2018`; all 15 subsets decoded from one encoding per window.",
        f"Machine: {machine}.",
        f"Wall time: {format_seconds(total)} in all — " + ", ".join(f"{k} {format_seconds(v)}" for k, v in phases.items())
        + f". CPU time of this process: {format_seconds(cpu_seconds)} (CPU time / wall time ≈ {cpu_seconds / max(total, 1e-9):.1f}"
        f" of {torch.get_num_threads()} threads: much less means other processes took the CPUs).",
    ]


def rerun_command(out: Path, config, seeds, n_cases, n_test, grid, train_overrides) -> str:
    """What reruns this experiment: the CLI line when its options cover the call, else a Python call."""
    if isinstance(config, str) and not train_overrides and n_test == DEMO_N_TEST and grid == DEMO_GRID:
        return ("lckd-kit experiment --out " + out.as_posix()
                + (" --seeds " + " ".join(map(str, seeds)) if seeds != [0] else "")
                + (f" --config {config}" if config != "small2d" else "")
                + (f" --n-cases {n_cases}" if n_cases != DEMO_N_CASES else ""))
    if not isinstance(config, str):
        return "run_experiment(...) with a custom TrainConfig: its fields are in runs/*/config.json"
    kwargs = dict(config=config, seeds=tuple(seeds), n_cases=n_cases, n_test=n_test, grid=grid,
                  train_overrides=dict(train_overrides or {}))
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f'python -c "from lckd_kit.experiment import run_experiment; run_experiment({out.as_posix()!r}, {args})"'


# --------------------------------------------------------------------------------------------
# the experiment


def run_experiment(
    out_dir: str | os.PathLike = "outputs/demo",
    config="small2d",
    seeds: Sequence[int] | int = (0,),
    n_cases: int | None = None,
    n_test: int | None = None,
    quick: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    grid: int = DEMO_GRID,
    train_overrides: dict | None = None,
    checkpoint: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    hd95: bool = False,
) -> Path:
    """LCKD vs the no-KD baseline on phantoms, written up as a report.

    Args:
        out_dir: report folder: ``report.md``, ``report.html`` (self-contained), ``figures/``,
            ``runs/{lckd,nokd}_seed<s>/`` (training run folders, each with ``eval/``).
        config: a ``train.TRAIN_CONFIGS`` name or a ``TrainConfig``; ``train_overrides`` changes
            fields of it (e.g. ``{"stage1_steps": 100}`` on a slow laptop). The seed is set per run.
        seeds: one run pair per seed; with several, tables show mean and std across seeds and the
            intervals of the comparison resample seeds as well as cases.
        n_cases: training + validation phantoms (default 24, the notebooks' set).
        n_test: held-out test phantoms (default :data:`DEMO_N_TEST`).
        quick: train nothing -- evaluate ``checkpoint`` (default the shipped one) and write a
            shorter, single-model report. ``FileNotFoundError`` (saying how to make it) if missing.
        device: default CUDA if available, else CPU. grid: phantom grid (96 = 2 mm; 32 for tests).
        progress: progress bars and a line per phase.
        cache_dir: where phantoms are cached (default ``paths.default_cache_dir()``).
        hd95: also compute HD95 (off by default: on a CPU it can double the evaluation time;
            ``lckd-kit evaluate`` reports it).

    Returns:
        Path of ``report.md`` (``report.html`` is next to it).
    """
    from lckd_kit.phantom import ensure_phantoms
    from lckd_kit.train import get_train_config, train

    t_start, cpu_start = time.perf_counter(), time.process_time()
    say = print if progress else (lambda *a, **k: None)
    device = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(seeds)] if isinstance(seeds, int) else [int(s) for s in seeds]
    n_cases = DEMO_N_CASES if n_cases is None else int(n_cases)
    n_test = DEMO_N_TEST if n_test is None else int(n_test)
    phases: dict[str, float] = {}

    t = time.perf_counter()
    train_dir = ensure_phantoms(n_cases, seed=TRAIN_SEED, grid=grid, cache_dir=cache_dir, progress=progress)
    test_dir = heldout_phantoms(n_test, seed=TEST_SEED, grid=grid, cache_dir=cache_dir, progress=progress,
                                train_dir=train_dir)
    test_cases = load_eval_cases(test_dir)
    example = example_case(test_cases)
    phases["phantoms"] = time.perf_counter() - t
    say(f"[experiment] phantoms ready: {n_cases} training+validation cases in {train_dir}, {len(test_cases)} "
        f"held-out cases in {test_dir} ({format_seconds(phases['phantoms'])})")

    def summarise(model, label, seed, history, elections, run_dir: Path | None) -> RunSummary:
        t = time.perf_counter()
        ev = evaluate(model, test_cases, device=device, progress=progress, hd95=hd95)
        ev.meta.update(seed=seed, label=label, **({"run": str(run_dir)} if run_dir else {}))
        ev.save((run_dir or out) / "eval", title=f"{label}, seed {seed}: {len(test_cases)} held-out cases")
        phases[f"evaluate {label} seed {seed}"] = time.perf_counter() - t
        say(f"[experiment] {label} seed {seed}: mean Dice over 15 subsets {np.nanmean(ev.dice_table()):.3f} "
            f"(evaluate {format_seconds(phases[f'evaluate {label} seed {seed}'])})")
        return RunSummary(label, seed, ev, history, [e.to_record() for e in elections],
                          _examples(model, example, device))

    if quick:
        path = Path(checkpoint) if checkpoint is not None else shipped_checkpoint()
        if not path.is_file():
            raise FileNotFoundError(f"no shipped checkpoint at {path}: {_MAKE_CHECKPOINT_HINT}")
        from lckd_kit.election import ElectionResult
        from lckd_kit.train import train_config_from_dict

        model, ckpt = ckpt_io.load_model(path, device)
        cfg = train_config_from_dict(ckpt["config"])
        run = summarise(model, "LCKD", cfg.seed, ckpt.get("history", []),
                        [ElectionResult.from_record(r) for r in ckpt.get("elections", [])], None)
        made = ckpt.get("made_by", {})
        summary = ExperimentSummary(
            title="LCKD (shipped checkpoint) on phantoms: Dice for every set of available MRI modalities",
            runs=[run], example_case=example,
            intro=f"Quick mode: no training. `{path}` is evaluated on held-out phantoms; there is no no-KD baseline "
                  f"here — run `lckd-kit experiment` without `--quick` for the comparison.")
        summary.setup = _setup_bullets(cfg, made.get("data", {}).get("n_cases", "?"), grid, test_cases, hd95,
                                       machine_info(device), phases, time.perf_counter() - t_start,
                                       time.process_time() - cpu_start, baseline=False) + [
            f"Checkpoint: `{path}`" + (f", made by `{made.get('command')}` in {format_seconds(made['wall_time_s'])}"
                                       if made.get("wall_time_s") else "") + "."]
        report = write_report(summary, out)
        say(f"[experiment] report: {report} and {report.with_suffix('.html')}")
        return report

    base_cfg = get_train_config(config, **(train_overrides or {}))
    runs: dict[str, list[RunSummary]] = {"lckd": [], "nokd": []}
    for seed in seeds:
        for kind, no_kd, label in (("lckd", False, "LCKD"), ("nokd", True, "no-KD")):
            cfg = dataclasses.replace(base_cfg, seed=seed, no_kd=no_kd)
            run_dir = out / "runs" / f"{kind}_seed{seed}"
            say(f"[experiment] training {label}, seed {seed}: {cfg.total_steps} steps -> {run_dir}")
            t = time.perf_counter()
            result = train(cfg, train_dir, out_dir=run_dir, device=device, progress=progress)
            phases[f"train {label} seed {seed}"] = time.perf_counter() - t
            runs[kind].append(summarise(result.model, label, seed, result.history, result.elections, run_dir))

    command = rerun_command(out, config, seeds, n_cases, n_test, grid, train_overrides)
    summary = ExperimentSummary(
        title="LCKD vs no-KD on phantoms: Dice for every set of available MRI modalities",
        runs=runs["lckd"], baseline=runs["nokd"], example_case=example, command=command)
    summary.setup = _setup_bullets(base_cfg, n_cases, grid, test_cases, hd95, machine_info(device), phases,
                                   time.perf_counter() - t_start, time.process_time() - cpu_start) + [
        f"Seeds: {', '.join(map(str, seeds))}; LCKD and no-KD share seed, schedule, batches and subsets.",
        f"Run folders (config.json, history.jsonl, checkpoints, eval/): `{(out / 'runs').as_posix()}`."]
    report = write_report(summary, out)
    say(f"[experiment] report: {report} and {report.with_suffix('.html')} "
        f"(total {format_seconds(time.perf_counter() - t_start)})")
    return report


# --------------------------------------------------------------------------------------------
# the shipped checkpoint


def _call_string(**kwargs) -> str:
    defaults = dict(out="checkpoints/lckd_small_phantom.pt", seed=0, config="small2d", n_cases=DEMO_N_CASES,
                    n_test=DEMO_N_TEST, grid=DEMO_GRID, train_overrides=SHIPPED_TRAIN_OVERRIDES)
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k in defaults and v != defaults[k])
    return f'python -c "from lckd_kit.experiment import train_shipped_checkpoint; train_shipped_checkpoint({args})"'


def train_shipped_checkpoint(
    out: str | os.PathLike | None = None,
    seed: int = 0,
    config="small2d",
    n_cases: int = DEMO_N_CASES,
    n_test: int = DEMO_N_TEST,
    grid: int = DEMO_GRID,
    device: torch.device | str | None = None,
    progress: bool = True,
    train_overrides: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Train the weights shipped as ``checkpoints/lckd_small_phantom.pt`` -- from a fixed seed.

    ``config`` LCKD (default small2d with :data:`SHIPPED_TRAIN_OVERRIDES` when ``train_overrides`` is
    None) on :func:`shipped_training_sets` (``n_cases`` per cue level); the slim checkpoint holds the model state_dict,
    the train + model config, teachers, elections and the training history (no optimizer), loads
    with ``checkpoint.load_model`` and is written atomically. Then it is evaluated on the held-out
    phantoms: ``<stem>_eval.json`` and ``README.md`` (command, wall time, machine, 15-subset table)
    are written next to it. ``out`` None: the shipped file, in a source checkout.

    Returns the checkpoint path.
    """
    from lckd_kit.train import get_train_config, train, train_config_to_dict
    from lckd_kit.model import config_to_dict
    from lckd_kit.viz import markdown_subset_table

    t0 = time.perf_counter()
    root = source_checkout()
    if out is None:
        if root is None:
            raise FileNotFoundError("the shipped checkpoint is written into a source checkout; pass out=")
        out = root / "checkpoints" / "lckd_small_phantom.pt"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    if train_overrides is None and config == "small2d":
        train_overrides = SHIPPED_TRAIN_OVERRIDES
    cfg = get_train_config(config, **{**(train_overrides or {}), "seed": seed, "no_kd": False})
    sets = shipped_training_sets(n_cases, grid=grid, cache_dir=cache_dir, progress=progress)
    result = train(cfg, case_folders(sets), out_dir=None, device=device, progress=progress)
    train_s = time.perf_counter() - t0
    shown = out.resolve().relative_to(root) if root is not None and out.resolve().is_relative_to(root) else out
    command = _call_string(out=str(shown), seed=seed, config=config if isinstance(config, str) else "custom",
                           n_cases=n_cases, n_test=n_test, grid=grid, train_overrides=train_overrides)
    ckpt = ckpt_io.checkpoint_dict(
        result.model, {**train_config_to_dict(result.config), "model_config": config_to_dict(result.model.config)},
        step=result.step, teachers=list(result.teachers), elections=[e.to_record() for e in result.elections],
        split=result.split, history=result.history,
        made_by={"command": command, "function": "lckd_kit.experiment.train_shipped_checkpoint", "seed": seed,
                 "data": {"n_cases": n_cases * len(sets), "seed": TRAIN_SEED, "grid": grid, **SHIPPED_DATA},
                 "wall_time_s": round(train_s, 1),
                 "torch": str(torch.__version__), "date": time.strftime("%Y-%m-%d")})
    ckpt_io.save(ckpt, out)

    test_dir = heldout_phantoms(n_test, grid=grid, cache_dir=cache_dir, progress=progress, train_dir=sets[-1])
    ev = evaluate(result.model, load_eval_cases(test_dir), device=device, progress=progress)
    ev.meta.update(checkpoint=out.name)
    ev.to_json(out.with_name(out.stem + "_eval.json"))
    total = time.perf_counter() - t0
    dice = ev.dice_table()
    full = dice[SUBSETS.index(ALL_PRESENT)]
    teachers = ", ".join(m for m, on in zip(MODALITIES, result.teachers) if on)
    name = config if isinstance(config, str) else "custom"
    readme = "\n".join([
        "# Shipped checkpoint", "",
        f"`{out.name}` ({out.stat().st_size / 1e6:.1f} MB): LCKD, train config `{name}`, "
        f"seed {seed}, {result.step} steps on {n_cases * len(sets)} phantom cases (seed {TRAIN_SEED}, {grid}³): "
        f"{n_cases} per cue level {', '.join(f'{c:g}' for c in SHIPPED_DATA['cues'])}, a share of "
        f"{SHIPPED_DATA['no_et_fraction']:g} low-grade-like cases (`experiment.SHIPPED_DATA`). "
        f"Final teachers: {teachers}. A slim checkpoint (weights, configs, elections, history; no optimizer): "
        "load it with `lckd_kit.checkpoint.load_model(path)`.", "",
        "Made by:", "", "```", command, "```", "",
        f"Wall time: training {format_seconds(train_s)}, with the evaluation {format_seconds(total)}, on "
        f"{machine_info(device)}.", "",
        f"All four modalities, mean Dice on {len(ev.cases)} held-out phantoms (seed {TEST_SEED}): "
        + ", ".join(f"{r} {v:.3f}" for r, v in zip(REGIONS, full)) + ".", "",
        markdown_subset_table(dice, ev.hd95_table(), title="Dice (and HD95, mm) for every subset of modalities"), "",
        f"Per-case scores: `{out.stem}_eval.json`. Synthetic phantoms, not patients; not for clinical use.", ""])
    # the section on a real scan is measured by hand (real scans cannot ship): a retraining keeps it,
    # marked as measured on earlier weights until someone measures again
    old = out.parent / "README.md"
    section = old.read_text().partition("\n## On a real scan\n")[2] if old.is_file() else ""
    if section:
        stale = "> Measured on earlier weights of this file; rerun the command below to update it.\n\n"
        readme += "\n## On a real scan\n\n" + (section if section.lstrip().startswith(stale.strip()) else stale + section.lstrip())
    old.write_text(readme)
    if progress:
        print(f"[shipped checkpoint] {out} ({format_seconds(total)}); all-modality Dice "
              + ", ".join(f"{r} {v:.3f}" for r, v in zip(REGIONS, full)))
    return out


# --------------------------------------------------------------------------------------------
# what a notebook needs before it starts


@dataclass
class NotebookSetup:
    """Device, training config, phantom folders and cached run folders of a teaching notebook.

    Made by :func:`notebook_setup`; ``run_dir(config, kind)`` names a run folder after everything
    that defines the run, so notebooks 02, 03 and 05 share runs and a second execution trains nothing.
    """

    device: torch.device
    config: "TrainConfig"
    train_dir: Path
    test_dir: Path
    n_test: int
    fast: bool

    def run_dir(self, config=None, kind: str = "lckd") -> Path:
        import hashlib

        from lckd_kit.train import train_config_to_dict

        config = config or self.config
        key = json.dumps([train_config_to_dict(config), self.train_dir.name], sort_keys=True)
        name = config.model if isinstance(config.model, str) else "custom"
        return default_cache_dir() / "notebook_runs" / f"{kind}_{name}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"

    def test_cases(self) -> list[dict]:
        """The held-out phantoms (never trained on), loaded: raw images, region masks."""
        return load_cases(self.test_dir, labelled=True)[:self.n_test]

    def __str__(self) -> str:
        c = self.config
        return (f"device {self.device}, {torch.get_num_threads()} torch thread(s); config '{c.model}': "
                f"{c.stage1_steps} + {c.stage2_steps} steps, election every {c.elect_every}\n"
                f"phantoms: {self.train_dir}\nheld-out: {self.test_dir} ({self.n_test} used)")


def notebook_setup(config: str = "auto", seed: int = 0, n_phantoms: int = DEMO_N_CASES, grid: int = DEMO_GRID,
                   n_test: int = 3, device: str = "auto", fast: bool = False, overrides: dict | None = None,
                   cues: float = 1.0) -> NotebookSetup:
    """The one call a notebook makes before training: choose the device and the config, make sure the
    phantoms and a held-out set exist (generated once, cached).

    ``config="auto"``: ``"small"`` (3-D) on a GPU, ``"small2d"`` (2-D) on a CPU. ``fast``: toy sizes
    (4 phantoms of 48^3 at 4 mm, the seconds-long ``"tiny"`` config, 2 held-out cases) to check that a
    notebook runs. ``overrides``: TrainConfig fields (e.g. a shorter schedule on a slow laptop).
    """
    from lckd_kit.phantom import ensure_phantoms
    from lckd_kit.train import get_train_config

    dev = resolve_device(device)
    if config == "auto":
        config = "small" if dev.type == "cuda" else "small2d"
    if fast:
        # 4 mm voxels: within a factor 2 of the bundled cases and the shipped model (2 mm), so no
        # prediction in a fast run resamples further than the kit considers safe
        n_phantoms, grid, config, n_test = 4, 48, "tiny", 2
    cfg = get_train_config(config, **{"seed": seed, **(overrides or {})})
    train_dir = ensure_phantoms(n_phantoms, seed=TRAIN_SEED, grid=grid, cues=cues, progress=False)
    test_dir = heldout_phantoms(max(n_test, 2) if fast else DEMO_N_TEST, grid=grid, progress=False,
                                train_dir=train_dir, cues=cues)
    return NotebookSetup(dev, cfg, train_dir, test_dir, n_test, fast)


# --------------------------------------------------------------------------------------------
# workshop preparation


def workshop_prep(checkpoint: str | os.PathLike | None = None,
                  cache_dir: str | os.PathLike | None = None) -> Iterator[str]:
    """Cache everything the notebooks need so a workshop runs offline; yields one line per step.

    Generates the notebooks' phantoms (``ensure_phantoms(24, seed=0)``) and the held-out test set,
    loads the tissue prior, checks the bundled demo cases and that the shipped checkpoint loads.
    """
    from lckd_kit import phantom
    from lckd_kit.data import find_cases
    from lckd_kit.paths import data_samples_dir

    t0 = time.perf_counter()
    yield "lckd-kit workshop-prep: caching what the notebooks need"
    prior = phantom.load_prior(DEMO_GRID)
    yield f"  tissue prior: {prior.probs.shape[1:]} voxels ok"
    demo = find_cases(data_samples_dir())
    yield f"  bundled demo cases: {len(demo)} in {data_samples_dir()}"
    root = phantom.ensure_phantoms(DEMO_N_CASES, seed=TRAIN_SEED, grid=DEMO_GRID, cache_dir=cache_dir, progress=False)
    yield f"  training phantoms: {DEMO_N_CASES} cases in {root}"
    test = heldout_phantoms(DEMO_N_TEST, grid=DEMO_GRID, cache_dir=cache_dir, progress=False, train_dir=root)
    yield f"  held-out phantoms: {DEMO_N_TEST} cases in {test}"
    path = Path(checkpoint) if checkpoint is not None else shipped_checkpoint()
    try:
        model, ckpt = ckpt_io.load_model(path, "cpu")
        teachers = [m for m, on in zip(MODALITIES, ckpt.get("teachers", [])) if on]
        yield (f"  shipped checkpoint: {path} loads ({model.config.name}, step {ckpt.get('step')}, "
               f"teachers {'+'.join(teachers) or '?'})")
    except FileNotFoundError:
        yield f"  shipped checkpoint MISSING at {path}: {_MAKE_CHECKPOINT_HINT}"
    missing = []
    for module in ("ipywidgets", "plotly", "jupyterlab"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    yield ("  notebook packages: ok" if not missing else
           f"  notebook packages MISSING: {', '.join(missing)} (pip install -e '.[notebooks]')")
    yield f"done in {time.perf_counter() - t0:.0f} s"


__all__ = ["run_experiment", "train_shipped_checkpoint", "workshop_prep", "heldout_phantoms", "load_eval_cases",
           "example_case", "machine_info", "rerun_command", "notebook_setup", "NotebookSetup", "TRAIN_SEED", "TEST_SEED", "DEMO_N_CASES", "DEMO_N_TEST",
           "SHIPPED_TRAIN_OVERRIDES"]
