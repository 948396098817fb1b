"""Time LCKDNet configs on CPU (or any device): forward, forward+backward incl. loss, no-grad inference.

    .venv/bin/python benchmarks/model_timing.py                  # all configs at their default sizes
    .venv/bin/python benchmarks/model_timing.py --configs small --ratio   # + work-sharing vs naive

"fwd" and "fwd+bwd" run in train mode with all four modalities available; fwd+bwd includes
segmentation_loss + 0.1 * distillation_loss (teachers FLAIR, T1ce) like a training step, without
the optimiser. "infer" is eval mode under torch.inference_mode. Times are the best of --repeats
runs after one warm-up (the best is the least disturbed by other processes on a shared machine).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lckd_kit.distill import KD_WEIGHT, distillation_loss, segmentation_loss
from lckd_kit.model import build_model, parameter_count

# batch and spatial size (kit layout) per config: what a training step uses
SIZES = {
    "paper": (1, (64, 64, 32)),  # the reference's 1x4x32x64x64 test size
    "small": (2, (64, 64, 64)),
    "small2d": (16, (96, 96)),
}
TEACHERS = (True, False, True, False)


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, thread pool)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _step(model, x, y, available, naive=False):
    logits, feats = model(x, available, naive=naive)
    total, _, _ = segmentation_loss(logits, y)
    loss = total + KD_WEIGHT * distillation_loss(feats, available, TEACHERS)
    loss.backward()
    model.zero_grad(set_to_none=True)


def time_config(name: str, batch: int, spatial, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    model = build_model(name).to(device)
    x = torch.randn(batch, 4, *spatial, device=device)
    y = (torch.rand(batch, 3, *spatial, device=device) > 0.9).float()
    allm = (True,) * 4
    model.train()
    fwd = _best_time(lambda: model(x, allm), repeats)  # train mode, keeping the autograd graph
    step = _best_time(lambda: _step(model, x, y, allm), repeats)
    model.eval()
    with torch.inference_mode():
        infer = _best_time(lambda: model(x, allm), repeats)
    return dict(config=name, params=parameter_count(model), input=f"{batch}x4x" + "x".join(map(str, spatial)),
                fwd=fwd, step=step, infer=infer)


def sharing_ratio(name: str, batch: int, spatial, repeats: int, device: str) -> list[dict]:
    """fwd+bwd time of work sharing vs naive (reference) encoding, one subset per size."""
    torch.manual_seed(0)
    model = build_model(name).to(device).train()
    x = torch.randn(batch, 4, *spatial, device=device)
    y = (torch.rand(batch, 3, *spatial, device=device) > 0.9).float()
    rows = []
    for subset in [(False, False, True, False), (True, False, True, False), (True, False, True, True), (True,) * 4]:
        shared = _best_time(lambda: _step(model, x, y, subset), repeats)
        naive = _best_time(lambda: _step(model, x, y, subset, naive=True), repeats)
        rows.append(dict(k=sum(subset), shared=shared, naive=naive, ratio=shared / naive))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(SIZES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ratio", action="store_true", help="also time work sharing vs naive on 'small'")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}")
    print(f"{'config':<8} {'params':>11} {'input':>16} {'fwd s':>7} {'fwd+bwd s':>9} {'infer s':>8}")
    for name in args.configs:
        batch, spatial = SIZES[name]
        r = time_config(name, batch, spatial, args.repeats, args.device)
        print(f"{r['config']:<8} {r['params']:>11,} {r['input']:>16} {r['fwd']:>7.3f} {r['step']:>9.3f}"
              f" {r['infer']:>8.3f}")
    if args.ratio:
        batch, spatial = SIZES["small"]
        print("\nwork sharing vs naive, 'small', fwd+bwd incl. loss, batch", batch)
        print(f"{'#avail':>6} {'shared s':>9} {'naive s':>8} {'ratio':>6}")
        for r in sharing_ratio("small", batch, spatial, args.repeats, args.device):
            print(f"{r['k']:>6} {r['shared']:>9.3f} {r['naive']:>8.3f} {r['ratio']:>6.2f}")


if __name__ == "__main__":
    main()
