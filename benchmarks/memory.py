#!/usr/bin/env python
"""Peak memory of a BraTS-size `paper` run on the CPU, and whether it resumes bit-identically.

    python benchmarks/memory.py             # 30 phantoms at 240x240x155 (1 mm), 200 paper steps, 32^3 crop
    python benchmarks/memory.py --quick     # 4 phantoms, 20 steps: checks that the script works

The `paper` configuration (the reference recipe: its model, election, augmentation, 4 DataLoader
workers, a 2048 MB case cache) trains on phantoms written in the BraTS geometry, with a smaller
crop than the reference's 160x160x80 so that a CPU gets through the steps. Every process of the
run (the trainer and its workers) is sampled from /proc while it runs: the table gives the peak of
their summed RSS and of their summed PSS (shared pages counted once, the honest total), next to
what keeping every case in memory would take (the case count times the measured size of one
prepared case). A second run stops halfway, resumes from its checkpoint, and its final weights are
compared with the straight run's.

Figures from one machine go to docs/performance.md with the machine named.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys
from lckd_kit.train import get_train_config, train
args = json.loads(sys.argv[1])
cfg = get_train_config("paper", **args["overrides"])
train(cfg, args["data"], out_dir=args["out"], device="cpu", resume=args["resume"], progress=False,
      max_steps=args["max_steps"])
"""


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _kb(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_sampled(overrides: dict, data: Path, out: Path, resume: bool = False, max_steps: int | None = None,
                threads: int = 1) -> dict:
    """Run one training in a child process; sample the memory of its process tree every 0.2 s."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    payload = json.dumps({"overrides": overrides, "data": str(data), "out": str(out), "resume": resume,
                          "max_steps": max_steps})
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, payload], env=env)
    peak = {"rss_main_mb": 0.0, "rss_sum_mb": 0.0, "pss_sum_mb": 0.0, "processes": 1}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            pids = _tree(proc.pid)
            rss = [_kb(f"/proc/{p}/status", "VmRSS:") for p in pids]
            pss = sum(_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
            peak["rss_main_mb"] = max(peak["rss_main_mb"], rss[0] / 1024)
            peak["rss_sum_mb"] = max(peak["rss_sum_mb"], sum(rss) / 1024)
            peak["pss_sum_mb"] = max(peak["pss_sum_mb"], pss / 1024)
            peak["processes"] = max(peak["processes"], len(pids))
            stop.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    stop.set()
    th.join()
    if rc != 0:
        raise SystemExit(f"training failed (exit {rc}); see the output above")
    return {**peak, "wall_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-cases", type=int, default=30)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--crop", type=int, default=32, help="cubic training crop, a multiple of 32 (the reference's is 160x160x80)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the paper config's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the trainer")
    ap.add_argument("--data", default=None, help="folder for the phantoms (default: the kit's cache)")
    ap.add_argument("--quick", action="store_true", help="4 cases, 20 steps, 32^3 crop")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_cases, args.steps, args.crop = 4, 20, 32

    import numpy as np
    import torch

    from lckd_kit import phantom
    from lckd_kit.batches import StepBatches, _nbytes
    from lckd_kit.checkpoint import load_checkpoint
    from lckd_kit.data import find_cases
    from lckd_kit.paths import default_cache_dir
    from lckd_kit.train import get_train_config

    data = Path(args.data) if args.data else default_cache_dir() / f"brats_space_{args.n_cases}"
    t = time.perf_counter()
    phantom.generate(data, n=args.n_cases, seed=0, geometry="brats")
    print(f"phantoms: {args.n_cases} cases at 240x240x155 in {data} ({time.perf_counter() - t:.0f} s)")

    half = args.steps // 2
    overrides = dict(roi_size=(args.crop,) * 3, stage1_steps=half, stage2_steps=args.steps - half,
                     elect_every=10**9, elect_at_end=False, checkpoint_every=half, log_every=10)
    if args.workers is not None:
        overrides["num_workers"] = args.workers
    cfg = get_train_config("paper", **overrides)
    one = StepBatches(find_cases(data)[:1], cfg, 3)
    case_mb = _nbytes(one.prepared(0)) / 2**20

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        straight = run_sampled(overrides, data, tmp / "straight", threads=args.threads)
        first = run_sampled(overrides, data, tmp / "cut", max_steps=half, threads=args.threads)
        second = run_sampled(overrides, data, tmp / "cut", resume=True, threads=args.threads)
        a = load_checkpoint(tmp / "straight" / "final.pt")["model"]
        b = load_checkpoint(tmp / "cut" / "final.pt")["model"]
        identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    all_cached = case_mb * args.n_cases
    rows = [
        ("cases x steps x crop", f"{args.n_cases} x {args.steps} x {args.crop}^3"),
        ("DataLoader workers", str(cfg.num_workers)),
        ("case cache budget (all processes)", f"{cfg.cache_mb:.0f} MB"),
        ("one prepared case", f"{case_mb:.0f} MB"),
        ("every case in memory (estimate)", f"{all_cached:.0f} MB"),
        ("peak RSS, trainer process", f"{straight['rss_main_mb']:.0f} MB"),
        ("peak RSS, summed over processes", f"{straight['rss_sum_mb']:.0f} MB ({straight['processes']} processes)"),
        ("peak PSS, summed (shared pages once)", f"{straight['pss_sum_mb']:.0f} MB"),
        ("peak PSS / every case in memory", f"{straight['pss_sum_mb'] / all_cached:.2f}"),
        ("peak PSS, resumed half", f"{second['pss_sum_mb']:.0f} MB"),
        ("wall time, straight run", f"{straight['wall_s']:.0f} s"),
        ("resumed run == straight run (all weights)", "bit-identical" if identical else "DIFFERENT"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": dict(rows), "straight": straight, "first": first,
                                               "second": second, "case_mb": case_mb,
                                               "bit_identical": identical}, indent=1) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
