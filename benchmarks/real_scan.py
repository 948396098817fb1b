#!/usr/bin/env python
"""A real-size scan through the shipped model: the 15-subset evaluation and one `predict`, timed.

    python benchmarks/real_scan.py                       # a 240x240x155, 1 mm phantom (BraTS geometry)
    python benchmarks/real_scan.py --case /data/BraTS2021/BraTS2021_00000   # your own case
    python benchmarks/real_scan.py --checkpoint runs/lckd/final.pt --threads 2

Three ways to get the 15 subsets' probabilities of one case, timed in the same run, interleaved:

* ``kit``: what `evaluate` and `predict` do -- resample to the model's voxel size, crop to the
  brain, encode each window once and decode it for every subset, map back onto the case's grid;
* ``native grid``: the same without the resampling, at the scan's own 1 mm (the kit's path before
  checkpoints recorded their voxel size: a model trained at 2 mm then sees 1-mm voxels);
* ``native, per subset``: also one full forward pass per subset and window (the reference's way).

For a 2-D model the native variants are timed on a slab of ``--slab`` axial slices in the middle of
the volume and scaled to all of them (a 2-D model's work is proportional to the slice count; the
table says so). Then the whole `evaluate` (with Dice) and a one-subset `predict_case` are timed as
a user runs them. Figures from one machine go to docs/performance.md with the machine named.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default=None, help="a case folder (default: a BraTS-geometry phantom)")
    ap.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    ap.add_argument("--threads", default="auto", help="torch threads: auto or a number")
    ap.add_argument("--slab", type=int, default=31, help="slices the native variants of a 2-D model are timed on")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from lckd_kit import ALL_PRESENT, SUBSETS, paths, runtime
    from lckd_kit.checkpoint import load_model
    from lckd_kit.data import as_case, find_cases
    from lckd_kit.evaluate import evaluate
    from lckd_kit.inference import model_config, per_subset_reference, predict_case, predict_subsets, predict_volume
    from lckd_kit.transforms import normalize_image

    print(runtime.set_threads(args.threads)[1])
    model, _ = load_model(args.checkpoint or paths.shipped_checkpoint())
    cfg = model_config(model)
    tmp = tempfile.TemporaryDirectory()
    if args.case:
        case = as_case(find_cases(args.case)[0])
    else:
        from lckd_kit import phantom

        folder = phantom.generate(tmp.name, 1, seed=11, geometry="brats", progress=False)[0]
        case = as_case(find_cases(folder)[0])
    shape = tuple(case["image"].shape[1:])
    print(f"case {case['name']}: {shape} voxels of {tuple(round(float(s), 2) for s in case['spacing'])} mm; "
          f"model {cfg.name}, trained at {cfg.spacing} mm, window {cfg.roi_size}")

    native = normalize_image(torch.as_tensor(case["image"]), cfg.normalization)
    scale = 1.0
    if cfg.spatial_dims == 2 and args.slab < shape[2]:
        z0 = (shape[2] - args.slab) // 2
        native = native[..., z0:z0 + args.slab]
        scale = shape[2] / args.slab

    def kit():
        pred = predict_volume(model, case, SUBSETS)
        return [pred[i] for i in range(len(SUBSETS))]  # every subset mapped back onto the case's grid

    variants = {
        "kit (resampled to the model, shared encoding)": kit,
        "native grid, shared encoding": lambda: predict_subsets(model, native, SUBSETS),
        "native grid, per subset": lambda: per_subset_reference(model, native, SUBSETS),
    }
    times = {k: [] for k in variants}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, fn in variants.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] * (1.0 if k.startswith("kit") else scale) for k, v in times.items()}
    base = med["native grid, per subset"]
    print(f"\n| 15 subsets' probabilities, one case | seconds | speed vs native per subset |\n|---|--:|--:|")
    for name, s in med.items():
        note = f" (timed on {args.slab} of {shape[2]} slices, scaled)" if scale != 1.0 and not name.startswith("kit") else ""
        print(f"| {name}{note} | {s:.1f} | {base / s:.1f}x |")

    t = time.perf_counter()
    ev = evaluate(model, [case], hd95=False)
    t_eval = time.perf_counter() - t
    out = Path(tmp.name) / "pred" / "pred.nii.gz"
    t = time.perf_counter()
    predict_case(model, case, ALL_PRESENT, out)
    t_pred = time.perf_counter() - t
    dice = ev.dice_table()[SUBSETS.index(ALL_PRESENT)]
    print(f"\n| as a user runs it | seconds |\n|---|--:|\n| evaluate: 15 subsets with Dice | {t_eval:.1f} |\n"
          f"| predict_case: one subset, written as NIfTI | {t_pred:.1f} |")
    print(f"\nall-modality Dice (ET, TC, WT): {', '.join(f'{v:.3f}' for v in dice)}; {torch.get_num_threads()} torch "
          f"thread(s)")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
