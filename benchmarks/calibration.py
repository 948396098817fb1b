#!/usr/bin/env python
"""Phantom calibration: does a model trained on phantoms learn the 15-subset Dice table of real scans?

Trains the kit's small2d LCKD recipe on 24 phantoms made with ``--cues``, evaluates it on the 6
held-out phantoms (seed 1000) for every subset of modalities, and prints its Dice next to the
published mmFormer and RFNet tables on real BraTS 2018 scans, with the Spearman correlation and
mean absolute difference over the 45 cells, the "what a model learns" summary rows, the elected
teachers and the all-modality Dice (``lckd_kit.calibration``; ``docs/phantoms.md``).

Usage::

    python benchmarks/calibration.py                       # the shipped schedule: 1500 + 1500 steps
    python benchmarks/calibration.py --steps 600           # the demo's recipe: 300 + 300 steps
    python benchmarks/calibration.py --demo-steps 1200     # the demo's recipe run longer: 600 + 600 steps
    python benchmarks/calibration.py --cues 0              # the previous generator's contrasts
    python benchmarks/calibration.py --checkpoint shipped  # no training: the shipped checkpoint's table
    python benchmarks/calibration.py --json out.json       # also write the numbers

It uses one CPU thread unless told otherwise (``--threads``): the machine it was calibrated on
is shared, and one thread keeps the runs comparable.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, choices=(3000, 600),
                        help="3000: the shipped checkpoint's recipe; 600: the demo's (default 3000)")
    parser.add_argument("--demo-steps", type=int, default=None,
                        help="the demo's recipe run for this many steps, half per stage (overrides --steps)")
    parser.add_argument("--cues", type=float, default=1.0, help="phantom cue strength (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", type=Path, default=None, help="phantom cache (default: the kit's)")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers to this JSON file")
    parser.add_argument("--save-model", type=Path, default=None, help="save the trained model's state_dict here")
    parser.add_argument("--checkpoint", default=None,
                        help="calibrate this trained checkpoint instead of training ('shipped': the kit's own)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    import torch

    from lckd_kit import calibration

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.checkpoint:
        from lckd_kit.checkpoint import load_model
        from lckd_kit.paths import shipped_checkpoint

        path = shipped_checkpoint() if args.checkpoint == "shipped" else Path(args.checkpoint)
        model, ckpt = load_model(path, args.device)
        steps = ckpt.get("step", "?")
        res = calibration.calibrate_model(model, cues=args.cues, cache_dir=args.cache_dir, device=args.device,
                                          progress=not args.quiet, elections=ckpt.get("elections", ()),
                                          params=dict(checkpoint=path.name, steps=steps),
                                          label=f"{path.name} ({steps} steps)")
        what = f"{path.name} on the held-out phantoms of cues {args.cues:g}"
    else:
        overrides, steps = None, args.steps
        if args.demo_steps is not None:
            try:
                overrides, steps = calibration.demo_recipe(args.demo_steps), args.demo_steps
            except ValueError as err:
                parser.error(f"--demo-steps: {err}")
        res = calibration.calibrate(steps=steps, cues=args.cues, seed=args.seed, cache_dir=args.cache_dir,
                                    device=args.device, progress=not args.quiet, train_overrides=overrides)
        what = f"Phantom model (cues {args.cues:g}, {steps} steps, seed {args.seed})"
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
               f"torch {torch.__version__}, Python {platform.python_version()}")
    print(f"\n## {what} vs real BraTS 2018\n")
    print(res.markdown())
    print("\nElections: " + "; ".join(f"step {e['step']}: " + ", ".join(f"{r}->{m}" for r, m in e["winners"].items())
                                      for e in res.elections))
    print(f"\nWall time {time.perf_counter() - t0:.0f} s on {machine}.")
    if args.save_model:
        args.save_model.parent.mkdir(parents=True, exist_ok=True)
        torch.save(res.model.state_dict(), args.save_model)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**res.to_dict(), "machine": machine}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
