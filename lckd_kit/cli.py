"""``lckd-kit`` command line (also ``python -m lckd_kit``).

Each sub-command is a thin layer over a package function, so that everything it does can also be
done from Python or a notebook:

    samples        phantom.generate          write N phantom cases in the BraTS 2020 layout
    train          train.train               the two-stage LCKD recipe (``--no-kd``: the baseline)
    elect          election.elect_teachers   print the 4x3 single-modality score table and teachers
    evaluate       evaluate.evaluate         Dice/HD95 over the 15 modality subsets, tables + heatmap
    predict        inference.predict_case    segment one case under a chosen set of modalities
    experiment     experiment.run_experiment LCKD vs no-KD on phantoms, with a report (``make demo``)
    workshop-prep  experiment.workshop_prep  generate and cache everything a workshop needs offline

``train`` also runs data-parallel on several GPUs or nodes when started by torchrun
(``torchrun --nproc_per_node=8 -m lckd_kit train ...``): see :mod:`lckd_kit.distributed`.

The CLI owns its process, so it also keeps freed memory for reuse (:func:`retain_freed_memory`).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys

from lckd_kit import as_mask, subset_name


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def retain_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of handing it back to the OS (glibc only;
    returns False, changing nothing, elsewhere).

    glibc serves every allocation above its mmap threshold (adaptive, at most 32 MB) with fresh pages
    from mmap and unmaps them on free, so every large activation (a paper-size stem map is 113 MB)
    pays page faults and kernel zeroing again, step after step. With mmap and trimming off, freed
    blocks are reused, which makes the paper config's CPU training step faster (benchmarks/run.py,
    ``alloc`` section; docs/performance.md). The cost: the process keeps its peak
    memory (and some fragmentation) until it exits, which is why the library never does this by
    itself; the CLI does, for its own process. There is no undo: glibc's adaptive defaults cannot
    be restored once set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1


def user_tuned_malloc(environ=os.environ) -> bool:
    """Whether the environment already tunes glibc malloc (then the CLI leaves it alone)."""
    return any(k.startswith("MALLOC_") for k in environ) or "malloc" in environ.get("GLIBC_TUNABLES", "")


def _device(name: str | None):
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cmd_samples(args) -> int:
    from lckd_kit.phantom import generate

    paths = generate(args.out, args.n, seed=args.seed, grid=args.grid, difficulty=args.difficulty,
                     label_style=args.label_style)
    print(f"wrote {len(paths)} phantom cases to {args.out}")
    return 0


def cmd_train(args) -> int:
    from lckd_kit import distributed
    from lckd_kit.train import get_train_config, train

    overrides = {}
    for key in ("stage1_steps", "stage2_steps", "elect_every", "batch_size", "seed", "stage2_schedule",
                "stage2_sampling", "elect_on", "amp", "checkpoint_every", "kd_weight", "num_workers"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    if args.no_kd:
        overrides["no_kd"] = True
    if args.elect_at_start:
        overrides["elect_at_start"] = True
    config = get_train_config(args.config, **overrides)
    data = args.data
    if args.convention:
        from lckd_kit.data import find_cases

        data = find_cases(args.data, convention=args.convention)
    # under torchrun: join the process group (NCCL on cuda, gloo on cpu) for the run; else a no-op
    with distributed.launch(_device(args.device)) as (info, device):
        result = train(config, data, out_dir=args.out, device=device, resume=args.resume)
        if info.is_main:
            world = f" on {info.world_size} processes (global batch {info.world_size * config.batch_size})" \
                if info.world_size > 1 else ""
            print(f"finished {config.total_steps} steps{world}; teachers: {', '.join(result.teacher_names) or '-'}")
            print(f"run folder: {args.out}")
    return 0


def cmd_elect(args) -> int:
    from lckd_kit.checkpoint import load_model
    from lckd_kit.data import load_cases
    from lckd_kit.election import elect_teachers

    device = _device(args.device)
    model, _ = load_model(args.checkpoint, device)
    cases = load_cases(args.data, labelled=True, normalize=True, convention=args.convention, limit=args.max_cases)
    result = elect_teachers(model, cases, device=device, metric=args.metric, progress=True)
    print(result)
    return 0


def cmd_evaluate(args) -> int:
    from lckd_kit.checkpoint import load_model
    from lckd_kit.data import load_cases
    from lckd_kit.evaluate import evaluate

    device = _device(args.device)
    model, _ = load_model(args.checkpoint, device)
    cases = load_cases(args.data, labelled=True, normalize=True, convention=args.convention, limit=args.max_cases)
    result = evaluate(model, cases, device=device, postprocess=args.postprocess, progress=True)
    files = result.save(args.out)
    print(result.markdown())
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def cmd_predict(args) -> int:
    from lckd_kit.checkpoint import load_model
    from lckd_kit.data import find_cases
    from lckd_kit.inference import predict_case

    device = _device(args.device)
    cases = find_cases(args.case, convention=args.convention)
    if len(cases) != 1:
        raise ValueError(f"{args.case}: expected exactly one case, found {len(cases)}")
    model, _ = load_model(args.checkpoint, device)
    mask = as_mask(args.available)
    out = predict_case(model, cases[0], mask, out_path=args.out, device=device)
    print(f"segmented {cases[0].name} with {subset_name(mask)} -> {out}")
    return 0


def cmd_experiment(args) -> int:
    from lckd_kit.experiment import run_experiment

    report = run_experiment(out_dir=args.out, quick=args.quick, seeds=args.seeds, config=args.config,
                            n_cases=args.n_cases, device=_device(args.device))
    print(f"report: {report}")
    return 0


def cmd_workshop_prep(args) -> int:
    from lckd_kit.experiment import workshop_prep

    for line in workshop_prep():
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lckd-kit", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("samples", help="write phantom cases (BraTS 2020 layout)")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=24)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--grid", type=int, default=96, help="voxels per side (96 = 2 mm)")
    s.add_argument("--difficulty", default="standard", choices=["easy", "standard", "hard"])
    s.add_argument("--label-style", default="brats2018", choices=["brats2018", "brats2023"])
    s.set_defaults(func=cmd_samples)

    t = sub.add_parser("train", help="two-stage LCKD training")
    t.add_argument("--data", required=True, help="folder of cases (any supported layout)")
    t.add_argument("--config", default="small2d", help="paper | small | small2d | tiny")
    t.add_argument("--out", required=True, help="run folder (checkpoints, history.jsonl)")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--no-kd", action="store_true", help="baseline: same model and schedule, no distillation")
    t.add_argument("--elect-at-start", action="store_true", help="reference behaviour: elect at step 0")
    t.add_argument("--convention", default=None)
    for name, typ in (("stage1-steps", int), ("stage2-steps", int), ("elect-every", int), ("batch-size", int),
                      ("seed", int), ("checkpoint-every", int), ("kd-weight", float), ("num-workers", int)):
        t.add_argument(f"--{name}", type=typ, default=None)
    t.add_argument("--stage2-schedule", choices=["continue", "restart"], default=None)
    t.add_argument("--stage2-sampling", choices=["batch", "sample"], default=None)
    t.add_argument("--elect-on", choices=["val", "train"], default=None)
    t.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default=None)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("elect", help="teacher election with a trained checkpoint")
    e.add_argument("--data", required=True)
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--metric", default="hard", choices=["hard", "soft"])
    e.add_argument("--max-cases", type=int, default=None)
    e.add_argument("--convention", default=None)
    e.add_argument("--device", default="auto")
    e.set_defaults(func=cmd_elect)

    v = sub.add_parser("evaluate", help="Dice and HD95 over the 15 modality subsets")
    v.add_argument("--data", required=True)
    v.add_argument("--checkpoint", required=True)
    v.add_argument("--out", required=True)
    v.add_argument("--max-cases", type=int, default=None)
    v.add_argument("--postprocess", action="store_true", help="also report ET post-processing (small ET -> NCR)")
    v.add_argument("--convention", default=None)
    v.add_argument("--device", default="auto")
    v.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="segment one case with a chosen set of modalities")
    r.add_argument("--case", required=True, help="folder of one case")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--available", default="flair+t1+t1ce+t2", help='e.g. "flair+t1ce"')
    r.add_argument("--out", required=True, help="output .nii.gz")
    r.add_argument("--convention", default=None)
    r.add_argument("--device", default="auto")
    r.set_defaults(func=cmd_predict)

    x = sub.add_parser("experiment", help="LCKD vs no-KD baseline on phantoms, with a report")
    x.add_argument("--out", default="outputs/demo")
    x.add_argument("--quick", action="store_true", help="use the shipped checkpoint instead of training LCKD")
    x.add_argument("--seeds", type=int, nargs="+", default=[0])
    x.add_argument("--config", default="small2d")
    x.add_argument("--n-cases", type=int, default=None)
    x.add_argument("--device", default="auto")
    x.set_defaults(func=cmd_experiment)

    w = sub.add_parser("workshop-prep", help="generate and cache everything a workshop needs offline")
    w.set_defaults(func=cmd_workshop_prep)
    return p


def main(argv: list[str] | None = None, tune_process: bool | None = None) -> int:
    """Run one sub-command. ``tune_process`` (default: when run as a program, i.e. ``argv`` is None)
    calls :func:`retain_freed_memory` unless the user set MALLOC_* or GLIBC_TUNABLES themselves."""
    args = build_parser().parse_args(argv)
    if (argv is None if tune_process is None else tune_process) and not user_tuned_malloc():
        retain_freed_memory()
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:  # bad input: one clear line, no traceback
        print(f"lckd-kit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
