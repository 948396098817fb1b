"""``lckd-kit`` command line (also ``python -m lckd_kit``).

Each sub-command is a thin layer over a package function, so that everything it does can also be
done from Python or a notebook:

    samples        phantom.generate          write N phantom cases in the BraTS 2020 layout
    train          train.train               the two-stage LCKD recipe (``--no-kd``: the baseline)
    elect          election.elect_teachers   print the 4x3 single-modality score table and teachers
    evaluate       evaluate.evaluate         Dice/HD95 over the 15 modality subsets, tables + heatmap
    predict        inference.predict_case    segment one case under a chosen set of modalities
    experiment     experiment.run_experiment LCKD vs no-KD on phantoms, with a report (``make demo``)
    compare        compare.compare           LCKD, no-KD, modality dropout, HeMIS, region fusion side by side
    workshop-prep  experiment.workshop_prep  generate and cache everything a workshop needs offline

``train`` also runs data-parallel on several GPUs or nodes when started by torchrun
(``torchrun --nproc_per_node=8 -m lckd_kit train ...``): see :mod:`lckd_kit.distributed`.

Every failure is one line on stderr, ``lckd-kit <command>: error: <what>: <problem>; <what to do>``,
with exit status 2 (``--debug`` or ``LCKD_KIT_DEBUG=1`` also prints the traceback). Arguments are
checked before torch and MONAI are imported (this module imports neither), so a mistyped option
fails at once. Outputs never overwrite inputs: ``predict``, ``evaluate`` and ``experiment`` refuse
an output inside the data (``--force`` to insist). Every command picks its torch thread count from
the cores that are free (``--threads auto``, :mod:`lckd_kit.runtime`) and says so in one line.

The CLI owns its process, so it also keeps freed memory for reuse (:func:`lckd_kit.runtime.retain_freed_memory`).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
import traceback
import warnings
from pathlib import Path

from lckd_kit import as_mask, subset_name
from lckd_kit.errors import CLIError, describe, expected, one_line
from lckd_kit.runtime import retain_freed_memory, user_tuned_malloc


# --------------------------------------------------------------------------------------------
# names checked before torch is imported; errors are one line each (lckd_kit.errors)


#: ``train.TRAIN_CONFIGS``'s names, here so that a wrong ``--config`` is refused before torch is
#: imported (tests/test_cli.py checks that the two agree)
TRAIN_CONFIG_NAMES = ("paper", "small", "small2d", "tiny",
                      *(f"{m}_{size}" for m in ("dropout", "hemis", "regionfusion") for size in ("small2d", "small")))
#: ``labels.CONVENTIONS``'s names (checked by the same test)
CONVENTION_NAMES = ("brats2018", "brats2023", "brats2024gli", "msd")
_NIFTI_NAME = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as :class:`CLIError` (one line) instead of printed with usage."""

    def error(self, message: str):
        raise CLIError(message, f"see `{self.prog} --help`")


# --------------------------------------------------------------------------------------------
# argument types: checked while parsing, before anything heavy is imported


def _number(kind=float, lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo:g}, got {text}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi:g}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _subset(text: str) -> tuple[bool, ...]:
    try:
        return as_mask(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} (e.g. \"flair+t1ce\")") from None


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _device_name(text: str) -> str:
    if not _DEVICE.match(text.strip().lower()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    return text.strip().lower()


def _threads(text: str) -> str:
    from lckd_kit.runtime import parse_threads

    try:
        parse_threads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _case_list(text: str) -> tuple[str, ...]:
    path = Path(text)
    try:
        names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"{text}: no such file (one case name per line)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"{text}: cannot be read as a text file ({type(e).__name__})") from None
    if not names:
        raise argparse.ArgumentTypeError(f"{text}: names no case (one case name per line)")
    return tuple(names)


# --------------------------------------------------------------------------------------------
# paths: inputs exist, outputs never land on them


def _inside(path: Path, folder: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def _check_folder_input(path: str, option: str) -> None:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{p}: no such folder", f"check {option}")
    if not p.is_dir():
        raise CLIError(f"{p}: is a file, not a folder", f"{option} takes a folder of cases")


def _check_out_folder(out: Path, option: str = "--out") -> None:
    """``out`` can become a folder: it is one already, or it and the folders above it are free."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"{out}: is a file, not a folder", f"choose another {option}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CLIError(f"{out}: {parent} is a file, not a folder", f"choose another {option}")
            break


def _refuse_inputs(out: Path, inputs: list[Path], force: bool, what: str = "the data") -> None:
    """Refuse ``out`` inside any of ``inputs`` (folders or files) unless ``force``."""
    if force:
        return
    for src in inputs:
        if _inside(out, src):
            raise CLIError(f"{out}: is inside {what} ({src}); writing there could overwrite inputs or be read as "
                           f"one later", "write elsewhere, or pass --force")


def _device(name: str | None):
    import torch

    from lckd_kit.runtime import resolve_device

    if name in (None, "auto"):
        return resolve_device(name)
    device = torch.device(name)
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise CLIError(f"--device {name}: this torch ({torch.__version__}) is built without CUDA",
                           "use --device cpu (or auto), or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: torch sees no CUDA GPU", "use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible",
                           f"use cuda:0 ... cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise CLIError(f"--device {name}: MPS is not available here", "use --device cpu (or auto)")
    return device


# --------------------------------------------------------------------------------------------
# the commands


def cmd_samples(args) -> int:
    import inspect

    from lckd_kit.phantom import generate

    extra = {}
    accepted = inspect.signature(generate).parameters
    for key in ("geometry", "cues"):
        value = getattr(args, key)
        if value is not None:
            if key not in accepted:
                raise CLIError(f"--{key}: this version of lckd_kit.phantom.generate has no {key!r} option",
                               f"leave --{key} out")
            extra[key] = value
    paths = generate(args.out, args.n, seed=args.seed, grid=args.grid, difficulty=args.difficulty,
                     label_style=args.label_style, **extra)
    print(f"wrote {len(paths)} phantom cases to {args.out}")
    return 0


_TRAIN_FIELDS = ("stage1_steps", "stage2_steps", "elect_every", "batch_size", "seed", "stage2_schedule", "stage2_sampling",
                 "elect_on", "amp", "checkpoint_every", "kd_weight", "num_workers", "normalization", "augment",
                 "cache_mb", "val_cases")
_ELECTION_SCORES = {"reference": {"elect_metric": "soft", "elect_average": "logits"},
                    "hard": {"elect_metric": "hard", "elect_average": "probs"}}


def cmd_train(args) -> int:
    from lckd_kit import distributed
    from lckd_kit.train import get_train_config, train

    overrides = {key: getattr(args, key) for key in _TRAIN_FIELDS if getattr(args, key, None) is not None}
    if args.no_kd:
        overrides["no_kd"] = True
    if args.elect_at_start:
        overrides["elect_at_start"] = True
    if args.holdout_val:
        overrides["validation"] = "holdout"
    if args.election_score:
        overrides.update(_ELECTION_SCORES[args.election_score])
    config = get_train_config(args.config, **overrides)
    data = args.data
    if args.convention:
        from lckd_kit.data import find_cases

        data = find_cases(args.data, convention=args.convention)
    # under torchrun: join the process group (NCCL on cuda, gloo on cpu) for the run; else a no-op
    with distributed.launch(_device(args.device)) as (info, device):
        result = train(config, data, out_dir=args.out, device=device, resume=args.resume)
        if info.is_main:
            if result.start_step >= config.total_steps and args.resume:
                print(f"nothing to train: the run in {args.out} had already finished its {config.total_steps} steps")
            else:
                world = f" on {info.world_size} processes (global batch {info.world_size * config.batch_size})" \
                    if info.world_size > 1 else ""
                print(f"finished {config.total_steps} steps{world}; teachers: {', '.join(result.teacher_names) or '-'}")
            print(f"run folder: {args.out}")
    return 0


def cmd_elect(args) -> int:
    from lckd_kit.checkpoint import load_model
    from lckd_kit.data import load_cases
    from lckd_kit.election import elect_teachers, scoring_case
    from lckd_kit.inference import model_config

    device = _device(args.device)
    model, _ = load_model(args.checkpoint, device)
    cases = [scoring_case(c, model_config(model))
             for c in load_cases(args.data, labelled=True, convention=args.convention, limit=args.max_cases)]
    result = elect_teachers(model, cases, device=device, metric=args.metric, progress=True)
    print(result)
    return 0


def _names(items, n: int = 5) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def cmd_evaluate(args) -> int:
    from lckd_kit.checkpoint import load_model
    from lckd_kit.data import find_cases, load_cases
    from lckd_kit.evaluate import evaluate

    out = Path(args.out)
    cases = find_cases(args.data, convention=args.convention)
    _refuse_inputs(out, [Path(args.data)] + sorted({c.folder for c in cases}), args.force)
    device = _device(args.device)
    model, ckpt = load_model(args.checkpoint, device)
    labelled = [c for c in cases if c.labelled]
    if not labelled:
        raise CLIError(f"{args.data}: no labelled case (scoring needs label files)", "point --data to labelled cases")
    trained = set((ckpt.get("split") or {}).get("train", []))
    seen = [c for c in labelled if c.name in trained]
    if seen and not args.include_training:
        kept = [c for c in labelled if c.name not in trained]
        if not kept:
            raise CLIError(f"{args.data}: all {len(labelled)} labelled cases were used to train {args.checkpoint}, so "
                           f"their scores would overstate the model", "score held-out cases, or pass --include-training")
        note = f"; left out {len(seen)} the checkpoint trained on ({_names(c.name for c in seen)}; --include-training " \
               f"scores them too)"
    else:
        kept, note = labelled, ""
        if seen:
            warnings.warn(f"{len(seen)} of the scored cases were used to train {args.checkpoint} "
                          f"({_names(c.name for c in seen)}): their scores overstate the model")
    kept = kept[:args.max_cases]
    print(f"scoring {len(kept)} case(s) of {args.data}: {_names(c.name for c in kept)}{note}")
    loaded = load_cases(kept, labelled=True)  # raw: evaluate resamples to the model's grid, then normalises
    result = evaluate(model, loaded, device=device, postprocess=args.postprocess, progress=True)
    _check_out_folder(out)
    files = result.save(out)
    print(result.markdown())
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def cmd_predict(args) -> int:
    from lckd_kit.checkpoint import load_model
    from lckd_kit.data import as_case, find_cases
    from lckd_kit.inference import predict_case

    cases = find_cases(args.case, convention=args.convention)
    out, mask = Path(args.out), args.available
    as_folder = out.is_dir() or args.out.endswith(("/", os.sep)) or (len(cases) > 1 and not _NIFTI_NAME.search(out.name))
    if len(cases) > 1 and not as_folder:
        raise CLIError(f"{out}: {args.case} holds {len(cases)} cases, so --out must be a folder "
                       f"(one <case>_{subset_name(mask)}.nii.gz each)", "pass a folder as --out")
    if not as_folder and not _NIFTI_NAME.search(out.name):
        raise CLIError(f"{out}: prediction files must end in .nii or .nii.gz",
                       "name the file <name>.nii.gz, or pass a folder (end it with /)")
    if as_folder:
        _check_out_folder(out)
    else:
        _check_out_folder(out.parent)
    targets = [out / f"{c.name}_{subset_name(mask)}.nii.gz" if as_folder else out for c in cases]
    for target in targets:
        _refuse_inputs(target, [Path(args.case)] + sorted({c.folder for c in cases}), args.force,
                       what="the case folder(s)")
    device = _device(args.device)
    model, _ = load_model(args.checkpoint, device)
    if as_folder:
        out.mkdir(parents=True, exist_ok=True)
    for case, target in zip(cases, targets):
        written = predict_case(model, as_case(case), mask, out_path=target, device=device, force=args.force)
        print(f"segmented {case.name} with {subset_name(mask)} -> {written}")
    return 0


def cmd_experiment(args) -> int:
    from lckd_kit.paths import checkpoints_dir, data_samples_dir, default_cache_dir

    out = Path(args.out)
    _check_out_folder(out)
    _refuse_inputs(out, [default_cache_dir(), data_samples_dir(), checkpoints_dir()], args.force,
                   what="the kit's data")
    from lckd_kit.experiment import run_experiment

    report = run_experiment(out_dir=args.out, quick=args.quick, seeds=args.seeds, config=args.config,
                            n_cases=args.n_cases, device=_device(args.device))
    print(f"report: {report}")
    return 0


def cmd_compare(args) -> int:
    _check_out_folder(Path(args.out))
    from lckd_kit import compare

    return compare.run(args)


def cmd_workshop_prep(args) -> int:
    from lckd_kit.experiment import workshop_prep

    for line in workshop_prep():
        print(line)
    return 0


def _common() -> argparse.ArgumentParser:
    """Options of every command."""
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("--threads", type=_threads, default="auto",
                   help="torch threads: auto (the cores free right now, the default) or a number")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="on an error, also print the Python traceback (or set LCKD_KIT_DEBUG=1)")
    return c


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lckd-kit", description=__doc__.split("\n\n")[0])
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    common = [_common()]
    positive, count = _number(int, lo=1), _number(int, lo=0)
    device_help = "auto | cpu | cuda | cuda:N | mps"

    s = sub.add_parser("samples", parents=common, help="write phantom cases (BraTS 2020 layout)")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=positive, default=24)
    s.add_argument("--seed", type=count, default=0)
    s.add_argument("--grid", type=_number(int, lo=16, hi=512), default=96, help="voxels per side (96 = 2 mm)")
    s.add_argument("--difficulty", default="standard", choices=["easy", "standard", "hard"])
    s.add_argument("--label-style", default="brats2018", choices=["brats2018", "brats2023"])
    s.add_argument("--geometry", default=None, choices=["mni", "brats"],
                   help="mni: the template's grid; brats: BraTS's 240x240x155 1 mm grid and orientation")
    s.add_argument("--cues", type=_number(float, lo=0.0), default=None,
                   help="strength of the modality-specific tumour cues (1 = standard)")
    s.set_defaults(func=cmd_samples)

    t = sub.add_parser("train", parents=common, help="two-stage LCKD training")
    t.add_argument("--data", required=True, help="folder of cases (any supported layout)")
    t.add_argument("--config", default="small2d", choices=TRAIN_CONFIG_NAMES, metavar="{" + ",".join(TRAIN_CONFIG_NAMES[:4]) + ",...}",
                   help="training configuration: " + ", ".join(TRAIN_CONFIG_NAMES))
    t.add_argument("--out", required=True, help="run folder (checkpoints, history.jsonl)")
    t.add_argument("--device", type=_device_name, default="auto", help=device_help + " (under torchrun: cuda:LOCAL_RANK)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (or last.prev.pt)")
    t.add_argument("--no-kd", action="store_true", help="baseline: same model and schedule, no distillation")
    t.add_argument("--elect-at-start", action="store_true", help="reference behaviour: elect at step 0")
    t.add_argument("--convention", default=None, choices=CONVENTION_NAMES)
    for name, typ in (("stage1-steps", count), ("stage2-steps", count), ("elect-every", positive),
                      ("batch-size", positive), ("seed", count), ("checkpoint-every", positive),
                      ("kd-weight", _number(float, lo=0.0)), ("num-workers", count)):
        t.add_argument(f"--{name}", type=typ, default=None)
    t.add_argument("--stage2-schedule", choices=["continue", "restart"], default=None)
    t.add_argument("--stage2-sampling", choices=["batch", "sample"], default=None)
    t.add_argument("--elect-on", choices=["val", "train"], default=None)
    t.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default=None,
                   help="mixed precision on CUDA (default: the config's, fp32)")
    t.add_argument("--holdout-val", action="store_true",
                   help="leave the validation cases out of training (paper: they are trained on too)")
    t.add_argument("--election-score", choices=["hard", "reference"], default=None,
                   help="teacher election by hard Dice, or the reference's soft Dice on averaged logits")
    t.add_argument("--normalization", choices=["zscore", "clip_zscore"], default=None)
    t.add_argument("--augment", choices=["none", "light", "reference", "scanner"], default=None)
    t.add_argument("--cache-mb", type=_number(float, lo=0.0, lo_open=True), default=None,
                   help="memory for cached cases (least recently drawn dropped first)")
    t.add_argument("--val-cases", type=_case_list, default=None, metavar="FILE",
                   help="validation cases: a text file with one case name per line")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("elect", parents=common, help="teacher election with a trained checkpoint")
    e.add_argument("--data", required=True)
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--metric", default="hard", choices=["hard", "soft"])
    e.add_argument("--max-cases", type=positive, default=None)
    e.add_argument("--convention", default=None, choices=CONVENTION_NAMES)
    e.add_argument("--device", type=_device_name, default="auto", help=device_help)
    e.set_defaults(func=cmd_elect)

    v = sub.add_parser("evaluate", parents=common, help="Dice and HD95 over the 15 modality subsets")
    v.add_argument("--data", required=True)
    v.add_argument("--checkpoint", required=True)
    v.add_argument("--out", required=True, help="folder for results.json/.csv, table.md, heatmap.png")
    v.add_argument("--max-cases", type=positive, default=None)
    v.add_argument("--postprocess", action="store_true", help="also report ET post-processing (small ET -> NCR)")
    v.add_argument("--include-training", action="store_true",
                   help="also score the cases the checkpoint trained on (left out by default)")
    v.add_argument("--force", action="store_true", help="write --out even inside the data folder")
    v.add_argument("--convention", default=None, choices=CONVENTION_NAMES)
    v.add_argument("--device", type=_device_name, default="auto", help=device_help)
    v.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", parents=common, help="segment cases with a chosen set of modalities")
    r.add_argument("--case", required=True, help="folder of one case, or a folder of cases")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--available", type=_subset, default=_subset("flair+t1+t1ce+t2"), help='e.g. "flair+t1ce"')
    r.add_argument("--out", required=True,
                   help="output .nii.gz, or a folder (one <case>_<subset>.nii.gz per case; needed for several cases)")
    r.add_argument("--force", action="store_true", help="write even inside the case folder")
    r.add_argument("--convention", default=None, choices=CONVENTION_NAMES)
    r.add_argument("--device", type=_device_name, default="auto", help=device_help)
    r.set_defaults(func=cmd_predict)

    x = sub.add_parser("experiment", parents=common, help="LCKD vs no-KD baseline on phantoms, with a report")
    x.add_argument("--out", default="outputs/demo")
    x.add_argument("--quick", action="store_true", help="use the shipped checkpoint instead of training LCKD")
    x.add_argument("--seeds", type=count, nargs="+", default=[0])
    x.add_argument("--config", default="small2d", choices=TRAIN_CONFIG_NAMES,
                   metavar="{" + ",".join(TRAIN_CONFIG_NAMES[:4]) + ",...}")
    x.add_argument("--n-cases", type=_number(int, lo=3), default=None)
    x.add_argument("--force", action="store_true", help="write --out even inside the kit's data folders")
    x.add_argument("--device", type=_device_name, default="auto", help=device_help)
    x.set_defaults(func=cmd_experiment)

    from lckd_kit import compare  # numpy only: torch is still not imported while arguments are checked

    k = sub.add_parser("compare", parents=common, help="several missing-modality methods side by side on phantoms")
    compare.add_arguments(k)
    k.set_defaults(func=cmd_compare)

    w = sub.add_parser("workshop-prep", parents=common, help="generate and cache everything a workshop needs offline")
    w.set_defaults(func=cmd_workshop_prep)
    # further commands: add a sub-parser with parents=common and a cmd_<name>(args) -> int
    return p


def _check_inputs(args) -> None:
    """What can be checked without torch: input folders and files exist, outputs are not files."""
    if getattr(args, "data", None) is not None:
        _check_folder_input(args.data, "--data")
    if getattr(args, "checkpoint", None) is not None:
        ckpt = Path(args.checkpoint)
        if not ckpt.exists():
            raise CLIError(f"{ckpt}: no such checkpoint", "check --checkpoint (a run folder holds final.pt)")
        if ckpt.is_dir():
            raise CLIError(f"{ckpt}: is a folder, not a checkpoint file", f"pass {ckpt / 'final.pt'} or another .pt")
    if args.command == "predict":
        case = Path(args.case)
        if not case.exists():
            raise CLIError(f"{case}: no such case folder", "check --case")
    if args.command in ("samples", "train", "evaluate"):
        _check_out_folder(Path(args.out))


_warning_prefix: list[str] = []  # set while main runs: warnings become one "<prefix>: warning: ..." line
_original_showwarning = warnings.showwarning


def _showwarning(message, category, filename, lineno, file=None, line=None):
    # Libraries imported during a command may wrap this function (MONAI keeps the handler it finds
    # at import), so it stays in place and passes warnings on unchanged once main has returned.
    if not _warning_prefix:
        return _original_showwarning(message, category, filename, lineno, file, line)
    text = f"{_warning_prefix[-1]}: warning: {one_line(message)}"
    try:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr)  # on a line of its own, also under a progress bar
    except ImportError:
        print(text, file=sys.stderr)


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop: unwind like Ctrl-C (locks released, temporaries removed)."""

    signum = 15


def _on_sigterm(signum, frame):
    raise _Terminated("SIGTERM")


def _resume_command(argv: list[str]) -> str:
    words = ["lckd-kit", *argv]
    if "--resume" not in argv:
        words.append("--resume")
    return " ".join(shlex.quote(w) for w in words)


def main(argv: list[str] | None = None, tune_process: bool | None = None) -> int:
    """Run one sub-command. ``tune_process`` (default: when run as a program, i.e. ``argv`` is None)
    calls :func:`retain_freed_memory` unless the user set MALLOC_* or GLIBC_TUNABLES themselves.

    Returns the exit status: 0, 2 for a failure (one line on stderr), 1 for a bug of the kit, 128 +
    the signal for an interrupted ``train`` (which says how to resume)."""
    program = argv is None if tune_process is None else tune_process
    words = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in words or os.environ.get("LCKD_KIT_DEBUG", "") not in ("", "0")
    command = next((w for w in words if not w.startswith("-")), None) or "lckd-kit"
    prefix = f"lckd-kit {command}" if command != "lckd-kit" else command
    threads_before = None
    shown = warnings.showwarning
    _warning_prefix.append(prefix)
    import signal
    import threading

    sigterm_before = signal.signal(signal.SIGTERM, _on_sigterm) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        try:
            args = build_parser().parse_args(words)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        if program and not user_tuned_malloc():
            retain_freed_memory()
        warnings.showwarning = _showwarning
        _check_inputs(args)
        from lckd_kit.runtime import set_threads

        import torch

        threads_before = torch.get_num_threads()
        _, message = set_threads(args.threads)
        if os.environ.get("RANK", "0") == "0":
            print(f"{prefix}: {message}")
        return args.func(args)
    except KeyboardInterrupt as exc:
        if debug:
            traceback.print_exc()
        signum = getattr(exc, "signum", None) or signal.SIGINT
        path, step = getattr(exc, "path", None), getattr(exc, "step", None)
        if command == "train" and path is not None:
            print(f"{prefix}: stopped by {signal.Signals(signum).name}: {path} holds step {step}; continue with: "
                  f"{_resume_command(words)}", file=sys.stderr)
        else:
            print(f"{prefix}: interrupted{f' ({one_line(exc)})' if str(exc) else ''}", file=sys.stderr)
        return 128 + int(signum)
    except Exception as exc:  # one line, no traceback (unless --debug)
        if debug:
            traceback.print_exc()
        if expected(exc):
            print(f"{prefix}: error: {describe(exc, command)}", file=sys.stderr)
            return 2
        print(f"{prefix}: error: internal error ({type(exc).__name__}: {one_line(exc)[:300]}); rerun with --debug "
              f"and report the traceback", file=sys.stderr)
        return 1
    finally:
        if sigterm_before is not None:
            signal.signal(signal.SIGTERM, sigterm_before)
        _warning_prefix.pop()
        if warnings.showwarning is _showwarning:
            warnings.showwarning = shown
        if threads_before is not None and not program:  # a Python caller keeps its own setting
            import torch

            torch.set_num_threads(threads_before)


if __name__ == "__main__":
    raise SystemExit(main())
