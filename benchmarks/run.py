#!/usr/bin/env python
"""lckd_kit performance benchmark: work-sharing ratios, FLOP utilisation, profile, memory.

    python benchmarks/run.py                 # CPU default (~12 min on 2 idle cores)
    python benchmarks/run.py --quick         # smoke run, tiny sizes (< 1 min)
    python benchmarks/run.py --gpu-quick     # CUDA preset, < 5 min on an H200
    python benchmarks/run.py --big           # + the reference crop 2x4x80x160x160 on CPU (minutes per step)

Every figure is a median over repeats, and every comparison is a RATIO of two variants timed in
the same run, interleaved (A, B, B, A, ...), so that load from other processes hits both alike.
Sections (``--sections``):

train    training step (forward, Dice+BCE + 0.1 KD, backward, SGD step) of the kit -- which encodes
         only the available modalities + one all-zero volume -- vs the reference's way (zero the
         missing inputs, encode all four: ``model(x, mask, naive=True)``); all modalities and a
         random-missing mix drawn with ``train.sample_subset`` (the reference distribution, one subset
         per batch). Same loss checked in the same run. Model FLOPs (FlopCounterMode) / time =
         achieved FLOP/s, next to the machine's fp32 matmul rate.
eval     15-subset sliding-window evaluation of one case: ``predict_subsets`` (each window encoded
         once, every subset decoded) vs 15 separate sliding-window passes with ``model(x, mask)``
         (the kit's per-subset forward) and with ``naive=True`` (the reference's). Outputs compared.
         Election (the 4 single-modality subsets) shared vs per-subset comes from the same run.
caches   the inference cache of model.py (the zero-input response) on vs off, on the 15-subset
         prediction of one case, for small2d, small and paper.
decode   one window's 15 subsets after one encode: 15 ``decode`` calls vs ``decode_many`` (each
         modality's skips projected through the shortcut convs once) at 1, predict_subsets' and 15
         subsets per decoder call.
cpu      the CPU configurations (small, small2d) at their TRAIN_CONFIGS crop/batch: step time, time
         per training sample, FLOP/s relative to the paper config's.
kernels  (CPU) one training step with oneDNN's verbose log: time in the convolution kernels (and
         their FLOP rate), in oneDNN's layout conversions (reorders), and in everything else.
alloc    (CPU) the training step with glibc's default malloc vs freed memory retained
         (``runtime.retain_freed_memory``, what the lckd-kit CLI does), each measured in a fresh process:
         time, page faults per step, peak RSS.
profile  torch.profiler of the small configs' step (self time by op category, top ops), the cost of
         weight standardisation, and drop-in what-ifs timed against the stock step (torch's own
         InstanceNorm kernels instead of the kit's GroupNorm-based one, channels-last memory format,
         1 thread) with the loss checked equal.
gpu      (CUDA only) the paper step at 2x4x80x160x160: fp32 vs bf16 autocast vs bf16+channels_last_3d
         vs bf16+torch.compile; kit vs reference way; 15-subset evaluation of a 240x240x155 volume.

Writes everything to benchmarks/results.json (``--out``), section by section.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from monai.inferers import sliding_window_inference  # noqa: E402

from lckd_kit import ALL_PRESENT, SUBSETS, subset_name  # noqa: E402
from lckd_kit.batches import sample_subset  # noqa: E402
from lckd_kit.distill import KD_WEIGHT, distillation_loss, segmentation_loss  # noqa: E402
from lckd_kit.inference import predict_subsets  # noqa: E402
from lckd_kit.model import CONFIGS, InstanceNorm, build_model, parameter_count  # noqa: E402
from lckd_kit.train import TRAIN_CONFIGS  # noqa: E402

SINGLES = tuple(tuple(i == m for i in range(4)) for m in range(4))
TEACHERS = (True, False, True, False)  # FLAIR + T1ce, a typical election outcome
SEED = 2024

_T0 = time.perf_counter()
_DEADLINE = math.inf


_SAVE = None  # main() sets it: write the results gathered so far (after every measured row)


def checkpoint(partial=None) -> None:
    if _SAVE is not None:
        _SAVE(partial)


def past_deadline() -> bool:
    return time.perf_counter() > _DEADLINE


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# timing and memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


class Memory:
    """Peak memory of a block. CUDA: max_memory_allocated. CPU (Linux): the process's peak RSS
    (VmHWM), reset before the block through /proc/self/clear_refs, so the figure belongs to the
    block; elsewhere ru_maxrss, a high-water mark of the whole process (``exact`` False)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.exact = device.type == "cuda"
        if device.type != "cuda":
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.exact = self._status("VmHWM") is not None
            except OSError:
                self.exact = False

    @staticmethod
    def _status(key):
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return self._status("VmRSS") or 0

    def reset(self) -> None:
        """Start a block: the peak restarts from the current usage (kept as ``self.base``)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.exact:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        self.base = self.current()

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.exact:
            return self._status("VmHWM")
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        return "peak RSS (VmHWM, reset per block)" if self.exact else "ru_maxrss (process high-water mark)"


def run_interleaved(variants: dict, repeats: int, device, mem: Memory, deadline_ok=True) -> dict:
    """Time each variant ``repeats`` times, rotating the order every round (A B C, B C A, C A B, ...).
    Returns {name: {"times": [...], "outs": [...], "peak": max bytes, "grow": max bytes above the
    usage at the start of the call}}. Stops after the round in progress when the global deadline
    passes (at least one round is always run)."""
    names = list(variants)
    res = {n: {"times": [], "outs": [], "peak": 0, "grow": 0} for n in names}
    for r in range(repeats):
        k = r % len(names)
        order = names[k:] + names[:k]  # rotation: every variant takes every position in turn
        for n in order:
            mem.reset()
            t, out = timed(variants[n], device)
            res[n]["times"].append(t)
            res[n]["outs"].append(out)
            peak = mem.peak() or 0
            res[n]["peak"] = max(res[n]["peak"], peak)
            res[n]["grow"] = max(res[n]["grow"], peak - mem.base)
        if deadline_ok and past_deadline() and r + 1 < repeats:
            log(f"  deadline: stopping after {r + 1} repeats")
            break
    return res


def count_flops(fn) -> tuple[int, object]:
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    with fc:
        out = fn()
    return fc.get_total_flops(), out


def matmul_rate(device, n: int, repeats: int = 5, dtype=torch.float32) -> float:
    """Measured dense matmul rate (FLOP/s) of an n x n @ n x n product, median of ``repeats``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    ts = [timed(lambda: a @ b, device)[0] for _ in range(repeats)]
    return 2 * n**3 / statistics.median(ts)


# ---------------------------------------------------------------------------------------------
# the training step


def make_step(model, x, y, subset, device, naive=False, opt=None, amp=False):
    """One training step as ``train.train`` runs it; returns the loss (float)."""

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits, feats = model(x, subset, naive=naive)
        seg = segmentation_loss(logits.float(), y)[0]
        loss = seg + KD_WEIGHT * distillation_loss(feats.float(), subset, TEACHERS)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if opt is not None:
            opt.step()
        else:
            model.zero_grad(set_to_none=True)
        return loss.item()

    return step


def trained_like(model, seed: int = 0):
    """Move the InstanceNorm affine parameters off their init (weight 1, bias 0), as training does.

    At init, the all-zero volume that stands in for a missing modality gives EXACTLY constant
    feature maps all the way down the encoder (bias-free convs of zeros, IN bias 0). Each IN's
    backward then scales the gradient by 1/sqrt(eps) ~ 316, so the zero-volume gradients explode:
    measured at init, max |encoder grad| 7e5 (small), 3e14 (small2d), inf -> NaN (paper, 48 INs),
    for the kit and the reference way alike, versus ~0.1-6 with all modalities or with IN
    parameters N(1, 0.1) / N(0, 0.1). A NaN gradient makes even an lr=0 SGD step write NaN into the
    weights (0 * inf), which would poison every later timing. Missing-modality steps follow
    all-modality training (stage 1) in the reference recipe, so the benchmark times that regime."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, InstanceNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def all_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def make_optimizer(model, sgd: bool):
    # lr = 0: the optimiser's arithmetic runs (momentum, weight decay, update), the weights stay put,
    # so every variant sees the same model and the losses stay comparable across repeats
    if not sgd:
        return None
    return torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4, nesterov=True)


def train_inputs(spatial_dims, batch, spatial, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *spatial, generator=g)
    y = (torch.rand(batch, 3, *spatial, generator=g) > 0.9).float()
    return x.to(device), y.to(device)


def loss_close(a, b, device) -> bool:
    tol = 1e-3 if device.type == "cuda" else 1e-4  # CUDA convs default to TF32
    return abs(a - b) <= tol * max(1.0, abs(a))


def mix_draws(n_weight_draws: int = 30_000):
    """The missing-modality mix of the reference (``train.sample_subset``): the first subset of each
    size k in the sample_subset stream, and P(k) measured over ``n_weight_draws`` draws. The step's
    cost depends only on k (all modalities go through the same encoder), so sum_k P(k) t_k is the
    expected step time under the reference distribution -- with one timed subset per k instead of
    many random draws."""
    rng = np.random.default_rng(SEED)
    first: dict[int, tuple] = {}
    while len(first) < 3:
        s = sample_subset(rng)
        first.setdefault(sum(s), s)
    rng = np.random.default_rng(SEED + 1)
    ks = [sum(sample_subset(rng)) for _ in range(n_weight_draws)]
    weights = {k: ks.count(k) / len(ks) for k in sorted(first)}
    return [first[k] for k in sorted(first)], weights


def bench_train(cfg: str, batch: int, spatial, device, repeats: int, mem: Memory,
                sgd: bool = True, naive: bool = True, label: str | None = None) -> dict:
    """Kit step vs reference-way step for all modalities and the sample_subset mix."""
    label = label or cfg
    torch.manual_seed(0)
    model = trained_like(build_model(cfg)).to(device).train()
    opt = make_optimizer(model, sgd)
    x, y = train_inputs(model.config.spatial_dims, batch, spatial, device)
    draws, weights = mix_draws()
    shape = f"{batch}x4x" + "x".join(map(str, spatial))
    log(f"train {label}: {shape}, mix subsets {[subset_name(d) for d in draws]}, P(k) {weights}")
    rows, flops_seen = [], {}
    for case, subset in [("all", ALL_PRESENT)] + [(f"k={sum(d)}", d) for d in draws]:
        variants = {"kit": make_step(model, x, y, subset, device, opt=opt)}
        if naive:
            variants["ref"] = make_step(model, x, y, subset, device, naive=True, opt=opt)
        k = sum(subset)
        flops = {}
        for v, fn in variants.items():
            # first call per (variant, encoded shape): warm-up + FLOP count. The reference way always
            # encodes 4 volumes per sample whatever the subset (FlopCounterMode counts convs and
            # matmuls, so the subset-dependent KD pairs do not enter), so it is counted once.
            key = (v, k if v == "kit" else 4)
            if key not in flops_seen:
                flops_seen[key] = count_flops(fn)[0]
            flops[v] = flops_seen[key]
        reps = repeats if case == "all" else max(1, repeats - 1)
        res = run_interleaved(variants, reps, device, mem)
        row = dict(config=label, input=shape, case=case, subset=subset_name(subset), available=k,
                   weight=weights.get(k) if case != "all" else None)
        for v in variants:
            row[f"{v}_s"] = med(res[v]["times"])
            row[f"{v}_times"] = res[v]["times"]
            row[f"{v}_loss"] = res[v]["outs"][0]
            row[f"{v}_flops"] = flops[v]
            row[f"{v}_peak_bytes"] = res[v]["peak"]
            row[f"{v}_step_mem_bytes"] = res[v]["grow"]
        if naive:
            row["speedup"] = row["ref_s"] / row["kit_s"]
            row["flop_ratio"] = flops["ref"] / flops["kit"]
            row["loss_equal"] = all(loss_close(a, b, device) for a, b in zip(res["kit"]["outs"], res["ref"]["outs"]))
            row["loss_absdiff"] = max(abs(a - b) for a, b in zip(res["kit"]["outs"], res["ref"]["outs"]))
        rows.append(row)
        checkpoint(dict(config=label, input=shape, rows=rows, partial=True))
        log(f"  {case:<5} {row['subset']:<20} kit {row['kit_s']:.3f}s" + (
            f"  ref {row['ref_s']:.3f}s  speedup {row['speedup']:.2f}x  loss equal {row['loss_equal']}"
            if naive else ""))
        if past_deadline():
            log("  deadline: skipping the remaining subsets")
            break
    mix = [r for r in rows if r["case"] != "all"]
    summary = dict(config=label, input=shape, all=rows[0], mix_weights=weights, rows=rows,
                   mix_complete=len(mix) == len(draws))
    if mix:
        wsum = sum(r["weight"] for r in mix)
        wavg = lambda key: sum(r["weight"] * r[key] for r in mix) / wsum  # noqa: E731
        summary["mix_kit_s"] = wavg("kit_s")
        summary["mix_kit_flops"] = wavg("kit_flops")
        if naive:
            summary["mix_ref_s"] = wavg("ref_s")
            summary["mix_ref_flops"] = wavg("ref_flops")
            summary["mix_speedup"] = summary["mix_ref_s"] / summary["mix_kit_s"]
            summary["mix_flop_ratio"] = summary["mix_ref_flops"] / summary["mix_kit_flops"]
            summary["mix_loss_equal"] = all(r["loss_equal"] for r in mix)
    a = rows[0]
    summary["achieved_flops_per_s"] = a["kit_flops"] / a["kit_s"]
    summary["per_sample_s"] = a["kit_s"] / batch
    summary["params"] = parameter_count(model)
    summary["weights_finite_after"] = all_finite(model)
    if not summary["weights_finite_after"]:
        log("  WARNING: non-finite weights after the timed steps: the timings above are not trustworthy")
    del model, opt
    return summary


def bench_alloc(cfg: str, batch: int, spatial, device, repeats: int, sgd: bool = True) -> dict:
    """The kit's all-modality training step with glibc's default malloc vs freed memory kept for
    reuse (``runtime.retain_freed_memory``, what the lckd-kit CLI does). malloc's state is per process
    and sticky (a grown heap, glibc's adaptive mmap threshold), so every measurement is a fresh
    process: ``repeats`` pairs, alternating order, each running 3 warm-up + 5 timed steps."""
    shape = f"{batch}x4x" + "x".join(map(str, spatial))
    log(f"alloc {cfg}: {shape}, glibc default vs retained freed memory, one process per measurement")
    runs = {"default": [], "retained": []}
    for r in range(max(1, repeats)):
        for name in (("default", "retained") if r % 2 == 0 else ("retained", "default")):
            got = _alloc_child_run(cfg, batch, spatial, name == "retained", sgd)
            if got is None:
                return dict(config=cfg, input=shape, error="child failed")
            if not got["applied"]:
                log("  not glibc: skipped")
                return dict(config=cfg, input=shape, error="not glibc")
            runs[name].append(got)
    out = dict(config=cfg, input=shape, runs=runs)
    for name, rs in runs.items():
        out[f"{name}_s"] = med([x["step_s"] for x in rs])
        out[f"{name}_faults"] = int(med([x["faults_per_step"] for x in rs]))
        out[f"{name}_process_peak_bytes"] = max(x["peak_bytes"] for x in rs)
        out[f"{name}_losses"] = [x["loss"] for x in rs]
    out["flops"] = runs["default"][0]["flops"]
    out["speedup"] = out["default_s"] / out["retained_s"]
    out["loss_equal"] = all(loss_close(a, b, device) for a in out["default_losses"] for b in out["retained_losses"])
    log(f"  default {out['default_s']:.3f}s ({out['default_faults']} page faults/step), retained "
        f"{out['retained_s']:.3f}s ({out['retained_faults']}) -> {out['speedup']:.2f}x; loss equal {out['loss_equal']}; "
        f"peak RSS {fmt_bytes(out['default_process_peak_bytes'])} -> {fmt_bytes(out['retained_process_peak_bytes'])}")
    return out


def _alloc_child_run(cfg, batch, spatial, retained: bool, sgd: bool) -> dict | None:
    import subprocess
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import run; "
            f"run._alloc_child({cfg!r}, {batch}, {tuple(spatial)!r}, {retained}, {sgd}, {torch.get_num_threads()})")
    from lckd_kit.runtime import user_tuned_malloc

    env = {k: v for k, v in os.environ.items() if not user_tuned_malloc({k: v})}  # glibc's defaults
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, ValueError, IndexError) as exc:
        log(f"  child failed: {exc}")
        return None


def _libc():
    import ctypes
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _alloc_child(cfg, batch, spatial, retained, sgd, threads):
    """(subprocess) 3 warm-up + 5 timed training steps; prints one JSON line."""
    from lckd_kit.runtime import retain_freed_memory

    torch.set_num_threads(threads)
    # default: no mallopt call at all (setting any value would switch off glibc's adaptive threshold)
    applied = retain_freed_memory() if retained else hasattr(_libc(), "mallopt")
    torch.manual_seed(0)
    model = trained_like(build_model(cfg)).train()
    x, y = train_inputs(CONFIGS[cfg].spatial_dims, batch, spatial, torch.device("cpu"))
    step = make_step(model, x, y, ALL_PRESENT, torch.device("cpu"), opt=make_optimizer(model, sgd))
    flops = count_flops(step)[0]
    for _ in range(3):  # glibc adapts its mmap threshold to the sizes freed in the first steps
        step()
    times, faults = [], []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t, loss = timed(step, torch.device("cpu"))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        times.append(t)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over execve, so a child would report its parent's peak
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    print(json.dumps(dict(applied=applied, step_s=med(times), times=times, faults_per_step=med(faults), loss=loss,
                          flops=flops, peak_bytes=peak)))


def onednn_breakdown(step) -> dict:
    """Run ``step`` once with oneDNN's verbose log on (fd 1 captured to a file) and add up the
    primitives' own execution times (ms, the log's last field) by kind: what the convolution
    kernels cost vs the layout conversions ("reorder") torch runs around them."""
    import tempfile

    with tempfile.TemporaryFile(mode="w+") as log_file:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(log_file.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                start = time.perf_counter()
                step()
                wall = time.perf_counter() - start
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        log_file.seek(0)
        kinds: dict[str, float] = {}
        for line in log_file:
            f = line.strip().split(",")
            if len(f) > 6 and f[0] == "onednn_verbose" and f[3] == "exec":
                try:
                    kinds[f[5]] = kinds.get(f[5], 0.0) + float(f[-1]) / 1e3
                except ValueError:
                    pass
    return dict(wall_s=wall, primitive_s=kinds)


def bench_kernels(cfg: str, batch: int, spatial, device, sgd: bool = True) -> dict:
    """Where a CPU training step's time goes: oneDNN convolution kernels (and their FLOP rate),
    oneDNN reorders, and everything else (norms, activations, adds, pooling, optimiser, Python)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = trained_like(build_model(cfg)).to(device).train()
    x, y = train_inputs(CONFIGS[cfg].spatial_dims, batch, spatial, device)
    step = make_step(model, x, y, ALL_PRESENT, device, opt=make_optimizer(model, sgd))
    shape = f"{batch}x4x" + "x".join(map(str, spatial))
    log(f"kernels {cfg}: {shape}, one step with oneDNN verbose")
    step()
    step()
    fc = FlopCounterMode(display=False)
    with fc:
        step()
    conv_ops = ("convolution", "convolution_backward")
    counts = fc.get_flop_counts().get("Global", {})
    conv_flops = sum(v for k, v in counts.items() if any(str(k).endswith(c) or f".{c}." in str(k) for c in conv_ops))
    plain = med([timed(step, device)[0] for _ in range(3)])
    b = onednn_breakdown(step)
    prim = b["primitive_s"]
    conv_s = prim.get("convolution", 0.0) + prim.get("deconvolution", 0.0)
    out = dict(config=cfg, input=shape, step_s=plain, verbose_wall_s=b["wall_s"], primitive_s=prim,
               conv_s=conv_s, reorder_s=prim.get("reorder", 0.0), conv_flops=conv_flops,
               total_flops=fc.get_total_flops())
    out["other_s"] = max(plain - conv_s - out["reorder_s"], 0.0)
    out["conv_flops_per_s"] = conv_flops / conv_s if conv_s else None
    log(f"  step {plain:.3f}s: conv kernels {conv_s:.3f}s ({conv_flops / 1e9:.0f} GFLOP -> "
        f"{(out['conv_flops_per_s'] or 0) / 1e9:.0f} GFLOP/s), reorders {out['reorder_s']:.3f}s, rest {out['other_s']:.3f}s")
    del model
    return out


# ---------------------------------------------------------------------------------------------
# sliding-window evaluation: shared encoding vs per-subset passes


def bench_eval(cfg: str, image: torch.Tensor, roi, device, repeats: int, mem: Memory, amp=False,
               label: str | None = None, per_subset_kit=True) -> dict:
    label = label or cfg
    torch.manual_seed(0)
    model = trained_like(build_model(cfg)).to(device).eval()
    roi = tuple(roi)
    use_amp = amp and device.type == "cuda"
    calls = {"n": 0}

    def per_subset(naive):
        @torch.no_grad()
        def run():
            outs = []
            times = []
            for s in SUBSETS:
                def predictor(w, s=s):
                    calls["n"] += 1
                    w = w.as_tensor() if hasattr(w, "as_tensor") else w
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                        logits = model(w, s, naive=naive)[0]
                    return torch.sigmoid(logits.float())

                t, o = timed(lambda: sliding_window_inference(
                    image[None], roi, 1, predictor, overlap=1 / 3, mode="constant", sw_device=device,
                    device=device), device)
                o = o.as_tensor() if hasattr(o, "as_tensor") else o
                outs.append(o[0].float().cpu())
                times.append(t)
            return {"probs": torch.stack(outs), "times": times}
        return run

    def shared(subsets):
        def run():
            return {"probs": predict_subsets(model, image, subsets, roi_size=roi, overlap=1 / 3, device=device,
                                             amp=use_amp)}
        return run

    def keep_first(fn):  # later rounds drop the probabilities (15 x 3 volumes each) once timed
        state = {"calls": 0}

        def run():
            out = fn()
            state["calls"] += 1
            if state["calls"] > 1:
                out["probs"] = None
            return out
        return run

    variants = {"shared15": keep_first(shared(SUBSETS)), "shared4": keep_first(shared(SINGLES))}
    if per_subset_kit:
        variants["kit15"] = keep_first(per_subset(False))
    variants["ref15"] = keep_first(per_subset(True))

    # FLOPs of one window per variant (also the warm-up): what predict_subsets / the passes run per window
    w = image[None, :, :roi[0], :roi[1], :roi[2]].to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        model(w, SINGLES[0])  # fill the zero-response cache (once per window shape)

        def enc_dec(subs):  # predict_subsets' decoding (projected skips), whatever its chunk
            return model.decode_many(model.encode(w), subs)
        wflops = {"shared15": count_flops(lambda: enc_dec(SUBSETS))[0],
                  "shared4": count_flops(lambda: enc_dec(SINGLES))[0]}
        per = {nv: [count_flops(lambda s=s: model(w, s, naive=nv))[0] for s in SUBSETS] for nv in (False, True)}
    wflops["kit15"], wflops["ref15"] = sum(per[False]), sum(per[True])
    wflops["kit4"], wflops["ref4"] = sum(per[False][:4]), sum(per[True][:4])
    calls["n"] = 0
    log(f"eval {label}: volume {tuple(image.shape[1:])}, roi {roi}")
    res = run_interleaved(variants, repeats, device, mem)
    n_windows = calls["n"] // (len(SUBSETS) * len(res["ref15"]["times"]) * (2 if per_subset_kit else 1))
    ref = res["ref15"]["outs"][0]["probs"]
    out = dict(config=label, volume=list(image.shape[1:]), roi=list(roi), windows=n_windows, amp=use_amp,
               window_flops=wflops, tolerance=EVAL_TOL_AMP if use_amp else EVAL_TOL)
    for v in variants:
        out[f"{v}_s"] = med(res[v]["times"])
        out[f"{v}_times"] = res[v]["times"]
        out[f"{v}_peak_bytes"] = res[v]["peak"]
        out[f"{v}_call_mem_bytes"] = res[v]["grow"]
    for v in [v for v in variants if v not in ("shared4", "ref15")]:
        out[f"{v}_maxdiff_vs_ref15"] = (res[v]["outs"][0]["probs"] - ref).abs().max().item()
    out["shared4_maxdiff_vs_ref4"] = (res["shared4"]["outs"][0]["probs"] - ref[:4]).abs().max().item()
    out["outputs_equal"] = eval_outputs_equal(out)
    # per-subset passes were timed one by one: the 4 singles of the same rounds give the election baseline
    for v in [v for v in ("kit15", "ref15") if v in variants]:
        out[f"{v[:3]}4_s"] = med([sum(r["times"][:4]) for r in res[v]["outs"]])
    out["speedup15_vs_ref"] = out["ref15_s"] / out["shared15_s"]
    out["flop_ratio15_vs_ref"] = wflops["ref15"] / wflops["shared15"]
    out["speedup4_vs_ref"] = out["ref4_s"] / out["shared4_s"]
    out["flop_ratio4_vs_ref"] = wflops["ref4"] / wflops["shared4"]
    if per_subset_kit:
        out["speedup15_vs_kit"] = out["kit15_s"] / out["shared15_s"]
        out["flop_ratio15_vs_kit"] = wflops["kit15"] / wflops["shared15"]
        out["speedup4_vs_kit"] = out["kit4_s"] / out["shared4_s"]
        out["flop_ratio4_vs_kit"] = wflops["kit4"] / wflops["shared4"]
    # cost structure: one encoder volume vs one decode (its share of the skip projection included)
    out["encoder_flops_per_volume"] = (wflops["ref15"] - wflops["kit15"]) / (60 - 32)
    out["decode_flops"] = (wflops["shared15"] - 4 * out["encoder_flops_per_volume"]) / 15
    log(f"  15 subsets: shared {out['shared15_s']:.2f}s, per-subset kit {out.get('kit15_s', float('nan')):.2f}s, "
        f"ref {out['ref15_s']:.2f}s -> {out['speedup15_vs_ref']:.2f}x vs ref (FLOPs {out['flop_ratio15_vs_ref']:.2f}x); "
        f"election {out['speedup4_vs_ref']:.2f}x vs ref (FLOPs {out['flop_ratio4_vs_ref']:.2f}x); equal {out['outputs_equal']}")
    del model
    return out


#: largest allowed |probability difference| between the evaluation variants. fp32: the per-subset kit
#: forward encodes k volumes per call instead of 4, and oneDNN picks batch-dependent kernels, so the
#: paper network's probabilities differ in the 4th decimal (measured 1.6e-4); bf16 autocast: 2e-2.
EVAL_TOL, EVAL_TOL_AMP = 1e-3, 2e-2


def eval_outputs_equal(e: dict) -> bool:
    tol = e.get("tolerance", EVAL_TOL_AMP if e.get("amp") else EVAL_TOL)
    return all(v <= tol for k, v in e.items() if "_maxdiff_vs_ref" in k)


def bench_decode(cfg: str, spatial, device, repeats: int, mem: Memory) -> dict:
    """One sliding window, all 15 subsets after one encode: 15 ``decode`` calls (the concatenated
    skips go through each shortcut conv, once per subset) vs ``decode_many`` (each modality's skips
    projected once) with 1 subset per decoder call, with ``predict_subsets``' chunk, and with all
    15 in one call. Outputs compared."""
    from lckd_kit.inference import DECODE_BATCH_ITEMS, DECODE_BATCH_ITEMS_LARGE, DECODE_BATCH_MAX_PARAMS
    torch.manual_seed(0)
    model = trained_like(build_model(cfg)).to(device).eval()
    batch = 16 if model.config.spatial_dims == 2 else 1  # predict_subsets' 2-D windows hold 16 slices
    x = torch.randn(batch, 4, *spatial, device=device)
    shape = f"{batch}x4x" + "x".join(map(str, spatial))
    small = sum(p.numel() for p in model.parameters()) < DECODE_BATCH_MAX_PARAMS
    chunk = max(1, (DECODE_BATCH_ITEMS if small else DECODE_BATCH_ITEMS_LARGE) // batch)
    log(f"decode what-if {cfg}: one window {shape}, 15 subsets (predict_subsets' chunk: {chunk})")
    with torch.no_grad():
        enc = model.encode(x)  # decoding is what differs; the encoding is shared by all variants

    @torch.no_grad()
    def sequential():
        return torch.stack([model.decode(enc, s) for s in SUBSETS])

    def many(k):
        return torch.no_grad()(lambda: model.decode_many(enc, SUBSETS, chunk=k))

    variants = {"sequential": sequential, "projected_1": many(1), "projected_chunk": many(chunk),
                "projected_15": many(15)}
    base = sequential()  # warm-up
    diff = max((many(k)() - base).abs().max().item() for k in (1, chunk, 15))
    del base
    res = run_interleaved(variants, repeats, device, mem)
    out = dict(config=cfg, window=shape, chunk=chunk, logits_maxdiff=diff)
    for n, r in res.items():
        out[f"{n}_s"] = med(r["times"])
        out[f"{n}_times"] = r["times"]
        out[f"{n}_peak_bytes"] = r["peak"]
        out[f"{n}_call_mem_bytes"] = r["grow"]
    out["speedup"] = out["sequential_s"] / out["projected_chunk_s"]
    log(f"  15 decode calls {out['sequential_s']:.3f}s; decode_many chunk 1 {out['projected_1_s']:.3f}s, "
        f"chunk {chunk} {out['projected_chunk_s']:.3f}s, chunk 15 {out['projected_15_s']:.3f}s -> "
        f"{out['speedup']:.2f}x; max |logit diff| {diff:.1e}")
    return out


def _uncached_zero(model):
    def zero_response(spatial, like):
        bott, skips = model.encoder(like.new_zeros((1, 1, *spatial)))
        return bott[0], [t[0] for t in skips]
    return zero_response


def bench_caches(cfg: str, image: torch.Tensor, roi, device, repeats: int, mem: Memory) -> dict:
    """The inference cache of model.py on vs off, timed on the 15-subset prediction of one case: the
    encoder's response to the all-zero volume, cached in eval mode. Outputs must not change. (A
    cache of the standardised weights was measured here too, gained nothing and was removed.)"""
    torch.manual_seed(0)
    model = trained_like(build_model(cfg)).to(device).eval()

    def run(zero: bool):
        def f():
            if zero:
                model.__dict__.pop("zero_response", None)
            else:
                model.zero_response = _uncached_zero(model)
            return predict_subsets(model, image, SUBSETS, roi_size=roi, device=device)
        return f

    variants = {"cached": run(True), "no zero cache": run(False)}
    log(f"caches {cfg} {tuple(image.shape)} roi {roi}")
    res = run_interleaved(variants, repeats, device, mem)
    base = med(res["cached"]["times"])
    out = {"config": cfg, "image": list(image.shape), "roi": list(roi), "repeats": repeats}
    for name, r in res.items():
        out[name] = {"s": med(r["times"]), "vs_cached": med(r["times"]) / base,
                     "max_abs_diff": float((r["outs"][-1] - res["cached"]["outs"][-1]).abs().max())}
    run(True)  # leave the model as it was
    return out


def phantom_image(grid: int = 96) -> torch.Tensor:
    """A normalised phantom case (4, g, g, g), the kit's CPU data."""
    from lckd_kit.transforms import normalize_image
    from lckd_kit.phantom import make_case

    case = make_case(0, grid=grid)
    return torch.as_tensor(normalize_image(case["image"].astype(np.float32)))


# ---------------------------------------------------------------------------------------------
# profile and what-ifs for the CPU configs


def _torch_instance_norm_forward(self, x):
    # what the kit's InstanceNorm (a GroupNorm, one channel per group) replaced: torch's instance norm
    return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)


def use_torch_instance_norm(model):
    for m in model.modules():
        if isinstance(m, InstanceNorm):
            m.forward = types.MethodType(_torch_instance_norm_forward, m)
    return model


def _category(name: str) -> str:
    n = name.lower()
    if "conv" in n and "backward" in n:
        return "conv backward"
    if "conv" in n:
        return "conv forward"
    if "norm" in n:
        return "instance norm (fwd+bwd)"
    if "pool" in n:
        return "max pool (fwd+bwd)"
    if "upsample" in n:
        return "upsample (fwd+bwd)"
    if any(k in n for k in ("copy_", "::cat", "index_select", "clone", "contiguous", "_to_copy", "index_add",
                            "stack", "as_strided_scatter")):
        return "copies / cat / gather"
    if any(k in n for k in ("fill_", "zero_", "::zeros", "::empty", "new_zeros")):
        return "fills / allocation"
    if "leaky_relu" in n or "sigmoid" in n:
        return "activations"
    if any(k in n for k in ("add", "mul", "sub", "div", "where", "sum", "mean", "var", "sqrt", "neg", "abs",
                            "rsqrt", "pow", "clamp", "log", "exp", "sgn", "sign", "lerp", "foreach")):
        return "elementwise / reductions"
    return "other"


def profile_step(step, device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as p:
        step()
    evs = [e for e in p.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in evs)
    cats: dict[str, float] = {}
    for e in evs:
        c = _category(e.key)
        cats[c] = cats.get(c, 0.0) + e.self_cpu_time_total
    top = sorted(evs, key=lambda e: -e.self_cpu_time_total)[:12]
    return dict(total_self_s=total / 1e6,
                categories={c: v / total for c, v in sorted(cats.items(), key=lambda kv: -kv[1])},
                top_ops=[dict(op=e.key, calls=e.count, self_s=e.self_cpu_time_total / 1e6,
                              share=e.self_cpu_time_total / total) for e in top])


def flop_breakdown(forward, depth: int = 2) -> dict:
    """Share of the FORWARD FLOPs per module, ``depth`` levels below the model (forward only: the
    module tracker attributes backward FLOPs to neighbouring modules)."""
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    with fc:
        forward()
    total = fc.get_total_flops()
    out: dict[str, int] = {}
    for name, ops in fc.get_flop_counts().items():
        parts = name.split(".")
        if len(parts) != depth + 1 or name == "Global":  # leaves at this depth only (no double counting)
            continue
        out[".".join(parts[1:])] = sum(ops.values())
    return {k: v / total for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def weight_std_cost(model, device, repeats=5) -> float:
    """Seconds per step spent standardising every WS conv's weight (forward + backward)."""
    mods = [m for m in model.modules() if hasattr(m, "effective_weight")]  # the weight-standardised convs

    def ws():
        total = 0
        for m in mods:
            w = m.weight.flatten(1)
            w = w - w.mean(1, keepdim=True)
            w = w / torch.sqrt(w.var(1, keepdim=True) + 1e-12)
            total = total + w.sum()
        total.backward()
        model.zero_grad(set_to_none=True)

    ws()
    return med([timed(ws, device)[0] for _ in range(repeats)])


def bench_profile(cfg: str, batch: int, spatial, device, repeats: int, mem: Memory, threads: int) -> dict:
    """Profile the stock kit step of a CPU config, then time drop-in variants against it."""
    torch.manual_seed(0)
    base = trained_like(build_model(cfg)).to(device).train()
    x, y = train_inputs(CONFIGS[cfg].spatial_dims, batch, spatial, device)
    cl = torch.channels_last_3d if CONFIGS[cfg].spatial_dims == 3 else torch.channels_last
    shape = f"{batch}x4x" + "x".join(map(str, spatial))
    log(f"profile {cfg}: {shape}")
    models = {"stock": base, "torch InstanceNorm": use_torch_instance_norm(copy.deepcopy(base)),
              "channels_last": copy.deepcopy(base).to(memory_format=cl)}
    xcl = x.contiguous(memory_format=cl)
    variants = {n: make_step(m, xcl if "channels_last" in n else x, y, ALL_PRESENT, device, opt=make_optimizer(m, True))
                for n, m in models.items()}
    stock = variants["stock"]
    if device.type == "cpu" and threads > 1:
        def one_thread():
            torch.set_num_threads(1)
            try:
                return stock()
            finally:
                torch.set_num_threads(threads)
        variants["1 thread"] = one_thread
    for fn in variants.values():
        fn()  # warm-up
    prof = profile_step(stock, device)
    prof["forward_flop_share_by_module"] = flop_breakdown(lambda: base(x, ALL_PRESENT))
    res = run_interleaved(variants, repeats, device, mem)
    t_stock = med(res["stock"]["times"])
    whatif = {}
    for n in variants:
        if n == "stock":
            continue
        t = med(res[n]["times"])
        whatif[n] = dict(s=t, speedup=t_stock / t, times=res[n]["times"],
                         loss_equal=all(loss_close(a, b, device) for a, b in zip(res[n]["outs"], res["stock"]["outs"])),
                         loss_absdiff=max(abs(a - b) for a, b in zip(res[n]["outs"], res["stock"]["outs"])))
    ws = weight_std_cost(base, device)
    out = dict(config=cfg, input=shape, stock_s=t_stock, stock_times=res["stock"]["times"], profile=prof,
               weight_std_s=ws, weight_std_share=ws / t_stock, whatif=whatif)
    log(f"  stock {t_stock:.3f}s; " + ", ".join(f"{n} {w['speedup']:.2f}x (loss equal {w['loss_equal']})"
                                              for n, w in whatif.items()))
    return out


# ---------------------------------------------------------------------------------------------
# CUDA variants of the paper step


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def without_tf32(fn):
    """Run ``fn`` with cuDNN's TF32 convolutions off (true fp32), restoring the setting after."""
    def run():
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            return fn()
        finally:
            torch.backends.cudnn.allow_tf32 = old
    return run


def with_cudnn_benchmark(fn):
    """Run ``fn`` with cuDNN autotuning on (the first call per shape tunes: done in the warm-up)."""
    def run():
        old = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            return fn()
        finally:
            torch.backends.cudnn.benchmark = old
    return run


def bench_gpu_variants(batch, spatial, device, repeats, mem: Memory, cfg: str = "paper") -> dict:
    """The paper step in fp32 / bf16 autocast / bf16 + channels_last_3d, kit vs reference way.
    Meant for CUDA; runs anywhere (bf16 autocast also exists on CPU) so the code path can be checked."""
    torch.manual_seed(0)
    base = trained_like(build_model(cfg)).to(device).train()
    x, y = train_inputs(3, batch, spatial, device)
    shape = f"{batch}x4x" + "x".join(map(str, spatial))
    mix = mix_draws(1000)[0][1]  # the first 2-modality subset of the sample_subset stream
    log(f"precision/layout variants, {cfg} step {shape} on {_device_name(device)}; missing-modality subset "
        f"{subset_name(mix)}")
    cl_model = copy.deepcopy(base).to(memory_format=torch.channels_last_3d)
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    fp32 = "fp32/TF32-conv" if tf32 else "fp32"
    variants = {
        f"{fp32} kit": make_step(base, x, y, ALL_PRESENT, device, opt=make_optimizer(base, True)),
        f"{fp32} ref-way": make_step(base, x, y, ALL_PRESENT, device, naive=True, opt=make_optimizer(base, True)),
    }
    if tf32:
        variants["fp32 (no TF32) kit"] = without_tf32(make_step(base, x, y, ALL_PRESENT, device,
                                                               opt=make_optimizer(base, True)))
    variants.update({
        "bf16 kit": make_step(base, x, y, ALL_PRESENT, device, amp=True, opt=make_optimizer(base, True)),
        "bf16+CL kit": make_step(cl_model, x_cl, y, ALL_PRESENT, device, amp=True, opt=make_optimizer(cl_model, True)),
    })
    if device.type == "cuda" and not torch.backends.cudnn.benchmark:
        variants["bf16 kit cudnn.benchmark"] = with_cudnn_benchmark(
            make_step(base, x, y, ALL_PRESENT, device, amp=True, opt=make_optimizer(base, True)))
    variants.update({
        f"bf16 kit {subset_name(mix)}": make_step(base, x, y, mix, device, amp=True, opt=make_optimizer(base, True)),
        f"bf16 ref-way {subset_name(mix)}": make_step(base, x, y, mix, device, naive=True, amp=True,
                                                     opt=make_optimizer(base, True)),
    })
    flops = {}
    for n, fn in variants.items():
        flops[n] = count_flops(fn)[0]  # warm-up (cudnn autotuning) + FLOPs
        fn()
    res = run_interleaved(variants, repeats, device, mem)
    first = next(iter(variants))
    ref = med(res[first]["times"])
    rows = {}
    for n in variants:
        t = med(res[n]["times"])
        rows[n] = dict(s=t, vs_first=ref / t, tflops_per_s=flops[n] / t / 1e12, flops=flops[n],
                       peak_bytes=res[n]["peak"], step_mem_bytes=res[n]["grow"], loss=res[n]["outs"][0])
        log(f"  {n:<28} {t * 1e3:9.1f} ms  {ref / t:5.2f}x vs {first}  {flops[n] / t / 1e9:9.1f} GFLOP/s  "
            f"peak {res[n]['peak'] / 2**30:5.1f} GiB  loss {res[n]['outs'][0]:.4f}")
    return dict(config=cfg, input=shape, mix_subset=subset_name(mix), baseline=first, rows=rows,
                loss_equal_fp32=loss_close(rows[f"{fp32} kit"]["loss"], rows[f"{fp32} ref-way"]["loss"], device))


def bench_compile(batch, spatial, device, repeats, mem: Memory, cfg: str = "paper") -> dict:
    """bf16 kit step eager vs torch.compile (default mode); the first compiled call is timed apart."""
    torch.manual_seed(0)
    base = trained_like(build_model(cfg)).to(device).train()
    x, y = train_inputs(3, batch, spatial, device)
    shape = f"{batch}x4x" + "x".join(map(str, spatial))
    log(f"torch.compile, {cfg} step {shape} on {_device_name(device)}")
    eager = make_step(base, x, y, ALL_PRESENT, device, amp=True, opt=make_optimizer(base, True))
    out = dict(config=cfg, input=shape)
    try:
        cmodel = torch.compile(copy.deepcopy(base))
        cstep = make_step(cmodel, x, y, ALL_PRESENT, device, amp=True, opt=make_optimizer(cmodel, True))
        out["first_call_s"], _ = timed(cstep, device)  # compiles forward + backward
        cstep()
    except Exception as e:  # report it, keep the other figures
        log(f"  torch.compile failed: {type(e).__name__}: {e}")
        out["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        return out
    eager()
    res = run_interleaved({"bf16 eager": eager, "bf16 compiled": cstep}, repeats, device, mem)
    out.update({f"{n}_s": med(r["times"]) for n, r in res.items()})
    out.update({f"{n}_peak_bytes": r["peak"] for n, r in res.items()})
    out["speedup"] = out["bf16 eager_s"] / out["bf16 compiled_s"]
    out["loss_absdiff"] = abs(res["bf16 eager"]["outs"][0] - res["bf16 compiled"]["outs"][0])
    log(f"  first call {out['first_call_s']:.1f}s; eager {out['bf16 eager_s'] * 1e3:.1f} ms, compiled "
        f"{out['bf16 compiled_s'] * 1e3:.1f} ms -> {out['speedup']:.2f}x")
    return out


# ---------------------------------------------------------------------------------------------
# printing


def fmt_bytes(b):
    return "-" if not b else f"{b / 2**30:.2f} GiB"


def print_table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)] if rows else \
        [len(h) for h in header]
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def report(results: dict) -> None:
    meta = results["meta"]
    print("\n" + "=" * 100)
    print(f"lckd_kit benchmark -- torch {meta['torch']}, {meta['device_name']}, {meta['threads']} threads, "
          f"repeats {meta['repeats']}")
    mm = results.get("matmul_flops_per_s")
    if mm:
        print(f"fp32 matmul {meta['matmul_n']}^2: {mm / 1e9:.1f} GFLOP/s (median of {len(results['matmul_samples'])} "
              f"samples taken through the run)")
    if results.get("train"):
        rows = []
        for s in results["train"]:
            a = s["all"]
            rows.append([s["config"], s["input"], "all 4", f"{a['kit_s']:.3f}", f"{a.get('ref_s', 0):.3f}",
                         f"{a.get('speedup', 0):.2f}x", f"{a.get('flop_ratio', 0):.2f}x", str(a.get("loss_equal")),
                         fmt_bytes(a["kit_peak_bytes"]), fmt_bytes(a.get("ref_peak_bytes"))])
            if s.get("mix_kit_s") is not None:
                rows.append([s["config"], s["input"], "mix k=1,2,3" + ("" if s["mix_complete"] else " (partial)"), f"{s['mix_kit_s']:.3f}",
                             f"{s.get('mix_ref_s', 0):.3f}", f"{s.get('mix_speedup', 0):.2f}x",
                             f"{s.get('mix_flop_ratio', 0):.2f}x", str(s.get("mix_loss_equal")),
                             fmt_bytes(max(r["kit_peak_bytes"] for r in s["rows"][1:])),
                             fmt_bytes(max(r.get("ref_peak_bytes", 0) for r in s["rows"][1:]))])
        print_table("1. training step (fwd + loss + bwd + SGD), kit vs reference way (encode all 4), seconds",
                    ["config", "input", "subsets", "kit s", "ref s", "speedup", "FLOP ratio", "same loss",
                     "kit peak", "ref peak"], rows)
    if results.get("eval"):
        rows = []
        for e in results["eval"]:
            rows.append([e["config"], "x".join(map(str, e["volume"])), e["windows"], "15 subsets",
                         f"{e['shared15_s']:.2f}", f"{e.get('kit15_s', float('nan')):.2f}", f"{e['ref15_s']:.2f}",
                         f"{e.get('speedup15_vs_kit', float('nan')):.2f}x", f"{e['speedup15_vs_ref']:.2f}x",
                         f"{e['flop_ratio15_vs_ref']:.2f}x", str(eval_outputs_equal(e))])
            rows.append([e["config"], "x".join(map(str, e["volume"])), e["windows"], "election (4)",
                         f"{e['shared4_s']:.2f}", f"{e.get('kit4_s', float('nan')):.2f}", f"{e['ref4_s']:.2f}",
                         f"{e.get('speedup4_vs_kit', float('nan')):.2f}x", f"{e['speedup4_vs_ref']:.2f}x",
                         f"{e['flop_ratio4_vs_ref']:.2f}x", str(eval_outputs_equal(e))])
        print_table("2-3. sliding-window evaluation of one case: shared encoding vs per-subset passes, seconds",
                    ["config", "volume", "windows", "task", "shared s", "per-subset kit s", "per-subset ref s",
                     "vs kit", "vs ref", "FLOP ratio vs ref", "equal"], rows)
        for e in results["eval"]:
            print(f"   {e['config']}: per window, one encoder volume {e['encoder_flops_per_volume'] / 1e9:.2f} GFLOP, "
                  f"one decode {e['decode_flops'] / 1e9:.2f} GFLOP; peak shared15 {fmt_bytes(e['shared15_peak_bytes'])},"
                  f" ref15 {fmt_bytes(e['ref15_peak_bytes'])}")
    if results.get("caches"):
        rows = []
        for c in results["caches"]:
            for name in ("cached", "no zero cache"):
                v = c[name]
                rows.append([c["config"], "x".join(map(str, c["roi"])), name, f"{v['s']:.3f}", f"{v['vs_cached']:.2f}x",
                             f"{v['max_abs_diff']:.1e}"])
        print_table("inference cache of model.py on and off: 15-subset prediction of one case (seconds; ratio "
                    "to cached)", ["config", "window", "variant", "seconds", "vs cached", "max |prob diff|"],
                    rows)
    if results.get("decode"):
        rows = [[d["config"], d["window"], f"{d['sequential_s']:.3f}", f"{d['projected_1_s']:.3f}",
                 f"{d['projected_chunk_s']:.3f} ({d['chunk']})", f"{d['projected_15_s']:.3f}", f"{d['speedup']:.2f}x",
                 f"{d['logits_maxdiff']:.1e}", fmt_bytes(d["sequential_call_mem_bytes"]),
                 fmt_bytes(d["projected_chunk_call_mem_bytes"])] for d in results["decode"] if "projected_1_s" in d]
        print_table("one window, 15 subsets after one encode: 15 decode calls vs decode_many (skips projected once), "
                    "1 / predict_subsets' chunk / 15 subsets per decoder call, seconds",
                    ["config", "window", "15 decode calls", "chunk 1", "chunk (k)", "chunk 15", "speedup (k)",
                     "max |logit diff|", "mem growth 15 calls", "mem growth chunk"], rows)
    if results.get("cpu"):
        rows = []
        pe = next((t for t in results.get("train") or [] if t["config"] == "paper"), None)
        paper = pe["achieved_flops_per_s"] if pe else None
        for s in results["cpu"]:
            a = s["all"]
            ach = s["achieved_flops_per_s"]
            mm = s.get("matmul_flops_per_s", results.get("matmul_flops_per_s"))
            rows.append([s["config"], s["input"], f"{a['kit_s']:.3f}", f"{s['per_sample_s']:.3f}",
                         f"{s.get('mix_kit_s', float('nan')):.3f}", f"{a['kit_flops'] / 1e9:.1f}", f"{ach / 1e9:.2f}",
                         f"{ach / mm:.1%}" if mm else "-", f"{ach / paper:.1%}" if paper else "-",
                         fmt_bytes(a["kit_peak_bytes"])])
        if pe:
            mm = pe.get("matmul_flops_per_s", results.get("matmul_flops_per_s"))
            rows.append(["paper", pe["input"], f"{pe['all']['kit_s']:.3f}", f"{pe['per_sample_s']:.3f}",
                         f"{pe.get('mix_kit_s', 0):.3f}", f"{pe['all']['kit_flops'] / 1e9:.1f}", f"{paper / 1e9:.2f}",
                         f"{paper / mm:.1%}" if mm else "-", "100%", fmt_bytes(pe["all"]["kit_peak_bytes"])])
        print_table("4-5. CPU configurations at their training crop/batch (kit step incl. SGD)",
                    ["config", "input", "step s (all 4)", "s / sample", "step s (mix)", "GFLOP/step", "GFLOP/s",
                     "of matmul", "of paper GFLOP/s", "peak"], rows)
    if results.get("alloc"):
        mm = results.get("matmul_flops_per_s")
        paper = next((a for a in results["alloc"] if a["config"] == "paper" and "error" not in a), None)
        rows = []
        for a in [a for a in results["alloc"] if "error" not in a]:
            rate = {k: a["flops"] / a[f"{k}_s"] for k in ("default", "retained")}
            rows.append([a["config"], a["input"], f"{a['default_s']:.3f}", f"{a['retained_s']:.3f}", f"{a['speedup']:.2f}x",
                         f"{a['default_faults']}", f"{a['retained_faults']}", f"{rate['retained'] / 1e9:.1f}",
                         f"{rate['default'] / mm:.1%} -> {rate['retained'] / mm:.1%}" if mm else "-",
                         f"{rate['retained'] / (paper['flops'] / paper['retained_s']):.1%}" if paper else "-",
                         f"{fmt_bytes(a.get('default_process_peak_bytes'))} -> {fmt_bytes(a.get('retained_process_peak_bytes'))}",
                         str(a["loss_equal"])])
        print_table("glibc malloc: default vs freed memory retained (what the lckd-kit CLI sets), training step, "
                    "one fresh process per measurement, seconds",
                    ["config", "input", "default s", "retained s", "speedup", "page faults (default)",
                     "page faults (retained)", "GFLOP/s retained", "of matmul", "of paper GFLOP/s",
                     "peak RSS (own process)", "same loss"], rows)
    if results.get("kernels"):
        mm = results.get("matmul_flops_per_s")
        rows = []
        for k in results["kernels"]:
            share = lambda v: f"{v:.3f} ({v / k['step_s']:.0%})"  # noqa: E731
            rate = k.get("conv_flops_per_s") or 0
            rows.append([k["config"], k["input"], f"{k['step_s']:.3f}", share(k["conv_s"]), share(k["reorder_s"]),
                         share(k["other_s"]), f"{k['conv_flops'] / 1e9:.1f}", f"{rate / 1e9:.0f}",
                         f"{rate / mm:.0%}" if mm else "-", f"{k['total_flops'] / k['step_s'] / mm:.0%}" if mm else "-"])
        print_table("where a CPU training step's time goes (oneDNN verbose, one step; glibc default malloc), seconds",
                    ["config", "input", "step s", "conv kernels", "reorders", "rest", "conv GFLOP",
                     "conv kernel GFLOP/s", "kernels of matmul", "step of matmul"], rows)
    if results.get("profile"):
        for p in results["profile"]:
            print(f"\nprofile {p['config']} {p['input']}: stock step {p['stock_s']:.3f}s, weight standardisation "
                  f"{p['weight_std_s'] * 1e3:.1f} ms/step ({p['weight_std_share']:.1%})")
            print("   self time by category: " + ", ".join(f"{c} {v:.0%}" for c, v in p["profile"]["categories"].items()))
            print("   top ops: " + ", ".join(f"{o['op']} {o['share']:.0%}" for o in p["profile"]["top_ops"][:8]))
            print("   forward FLOPs by module: " + ", ".join(
                f"{n} {v:.0%}" for n, v in list(p["profile"]["forward_flop_share_by_module"].items())[:6]))
            print("   what-ifs (speedup vs stock, same run): " + ", ".join(
                f"{n} {w['speedup']:.2f}x{'' if w['loss_equal'] else ' (LOSS DIFFERS)'}" for n, w in p["whatif"].items()))
    if results.get("gpu"):
        g = results["gpu"]
        rows = [[n, f"{r['s'] * 1e3:.1f}", f"{r['vs_first']:.2f}x", f"{r['tflops_per_s']:.3f}", fmt_bytes(r["peak_bytes"]),
                 f"{r['loss']:.4f}"] for n, r in g["rows"].items()]
        print_table(f"precision / layout variants of the {g['config']} step {g['input']} ({meta['device_name']})",
                    ["variant", "ms/step", f"vs {g['baseline']}", "TFLOP/s", "peak", "loss"], rows)
        if results.get("gpu_matmul"):
            print("   matmul rates: " + ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in results["gpu_matmul"].items()))
    if results.get("compile"):
        c = results["compile"]
        if "error" in c:
            print(f"\ntorch.compile: FAILED {c['error']}")
        else:
            print(f"\ntorch.compile, {c['config']} step {c['input']} bf16: first call {c['first_call_s']:.1f}s, eager "
                  f"{c['bf16 eager_s'] * 1e3:.1f} ms, compiled {c['bf16 compiled_s'] * 1e3:.1f} ms -> {c['speedup']:.2f}x")


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    global _DEADLINE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, smoke run (< 1 min)")
    p.add_argument("--gpu-quick", action="store_true", help="CUDA preset: paper step variants + 15-subset eval (< 5 min)")
    p.add_argument("--big", action="store_true", help="also the reference crop 2x4x80x160x160 (CPU: minutes per step)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per item (default 3; GPU 10)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default=None, help="cpu | cuda[:i] (default: cuda if available with --gpu-quick, else cpu)")
    p.add_argument("--sections", nargs="+", default=None,
                   choices=["train", "eval", "caches", "decode", "cpu", "alloc", "kernels", "profile", "gpu", "compile"],
                   help="gpu = precision/layout variants, compile = torch.compile (both CUDA by default)")
    p.add_argument("--profile-configs", nargs="+", default=["small", "small2d"], choices=["small", "small2d", "paper"],
                   help="configs the profile section profiles (paper: 1x4x48x96x96 on CPU; minutes)")
    p.add_argument("--budget", type=float, default=None, help="seconds; sections stop repeating past it")
    p.add_argument("--no-sgd", action="store_true", help="time fwd+bwd only (no optimiser step)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True everywhere (the kit leaves it off; the gpu "
                        "section times it as a variant anyway)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"))
    p.add_argument("--update", action="store_true",
                   help="keep the other sections already in --out (rerun some sections, e.g. --sections train)")
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if (args.gpu_quick and torch.cuda.is_available()) else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("CUDA requested but torch.cuda.is_available() is False")
    if args.gpu_quick and device.type != "cuda":
        p.error("--gpu-quick needs a CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cuda = device.type == "cuda"
    if cuda and args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    repeats = args.repeats or (10 if cuda else (2 if args.quick else 3))
    budget = args.budget if args.budget is not None else (270.0 if args.gpu_quick else None)
    if budget:
        _DEADLINE = _T0 + budget
    if args.sections:
        sections = args.sections
    elif args.gpu_quick:
        sections = ["gpu", "train", "eval", "compile"]
    elif cuda:
        sections = ["train", "eval", "decode", "cpu", "gpu", "compile"]
    else:
        sections = ["train", "eval", "caches", "decode", "cpu", "alloc", "kernels", "profile"]
    sgd = not args.no_sgd
    mem = Memory(device)
    dev_name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    if not cuda:
        try:
            with open("/proc/cpuinfo") as f:
                dev_name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
    results = dict(meta=dict(torch=torch.__version__, python=platform.python_version(), device=str(device),
                             device_name=dev_name, cpu_count=os.cpu_count(), threads=threads, repeats=repeats,
                             quick=args.quick, gpu_quick=args.gpu_quick, big=args.big, sgd=sgd,
                             memory=mem.kind, loadavg_start=os.getloadavg() if hasattr(os, "getloadavg") else None,
                             sections=sections, started=time.strftime("%Y-%m-%d %H:%M:%S")),
                   matmul_samples=[])
    if cuda:
        results["meta"].update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                               cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                               matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                               cudnn_benchmark=torch.backends.cudnn.benchmark)
    out_path = Path(args.out)
    if args.update and out_path.exists():
        old = json.loads(out_path.read_text())
        previous = old.pop("previous_runs", []) + [old.pop("meta")]
        old.pop("matmul_samples", None)
        old.pop("matmul_flops_per_s", None)
        old.pop("paper_achieved_flops_per_s", None)
        for sec in sections:
            old.pop(sec, None)
        for e in old.get("eval", []):
            e["outputs_equal"] = eval_outputs_equal(e)
        results = {**old, **results, "previous_runs": previous}
    mm_n = 512 if args.quick else (8192 if cuda else 2048)
    results["meta"]["matmul_n"] = mm_n

    def sample_matmul(entry=None):
        results["matmul_samples"].append(matmul_rate(device, mm_n, repeats=3))
        results["matmul_flops_per_s"] = med(results["matmul_samples"])
        if entry is not None:  # the rate of this run, next to the figures it is compared with
            entry["matmul_flops_per_s"] = results["matmul_flops_per_s"]
            entry["run"] = results["meta"]["started"]

    def save(partial=None):
        if partial is not None:  # a section still running: keep its rows so far under "partial"
            results["partial"] = partial
        else:
            results.pop("partial", None)
        results["meta"]["elapsed_s"] = time.perf_counter() - _T0
        results["meta"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1, default=str))

    global _SAVE
    _SAVE = save
    log(f"torch {torch.__version__}, device {device} ({dev_name}), {threads} threads, repeats {repeats}, "
        f"sections {sections}, memory: {mem.kind}")
    sample_matmul()
    log(f"fp32 matmul {mm_n}^2: {results['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s")
    if cuda:
        results["gpu_matmul"] = {"fp32": results["matmul_flops_per_s"]}
        torch.backends.cuda.matmul.allow_tf32 = True
        results["gpu_matmul"]["tf32"] = matmul_rate(device, mm_n)
        torch.backends.cuda.matmul.allow_tf32 = results["meta"]["matmul_allow_tf32"]
        results["gpu_matmul"]["bf16"] = matmul_rate(device, mm_n, dtype=torch.bfloat16)

    try:
        # CUDA: the reference crop; CPU (only when asked for, to check the code path): small sizes
        var_cfg = "small" if args.quick else "paper"
        var_batch, var_spatial = (2, (160, 160, 80)) if cuda and not args.quick else (1, (64, 64, 32))
        if "gpu" in sections:
            results["gpu"] = bench_gpu_variants(var_batch, var_spatial, device, repeats, mem, cfg=var_cfg)
            save()
        if "train" in sections:
            results["train"] = []
            if args.quick:  # the small config stands in for the paper one
                jobs = [("small", 1, (32, 32, 32), "small (quick)")]
            elif args.gpu_quick:
                jobs = [("paper", 2, (160, 160, 80), None)]
            else:
                # batch 2 is the reference's batch: the random-missing target is set there
                jobs = [("paper", 1, (96, 96, 48), None), ("paper", 2, (96, 96, 48), None)]
                if args.big or cuda:
                    jobs.append(("paper", 2, (160, 160, 80), None))
            for cfg, b, s, label in jobs:
                if past_deadline():
                    break
                results["train"].append(bench_train(cfg, b, s, device, repeats, mem, sgd=sgd, label=label))
                sample_matmul(results["train"][-1])
                save()
        if "eval" in sections and not past_deadline():
            results["eval"] = []
            if args.quick:
                g = torch.Generator().manual_seed(0)
                jobs = [("small", torch.randn(4, 48, 32, 32, generator=g), (32, 32, 32), 1, "small (quick)")]
            elif args.gpu_quick:
                g = torch.Generator().manual_seed(0)
                jobs = [("paper", torch.randn(4, 240, 240, 155, generator=g), (160, 160, 80), 1, "paper bf16")]
            else:
                img = phantom_image(96)
                jobs = [("small", img, (64, 64, 64), max(1, repeats - 1), None),
                        ("paper", img[:, :, 16:80, 32:64].contiguous(), (64, 64, 32), max(1, repeats - 1), None)]
            for cfg, img, roi, reps, label in jobs:
                if past_deadline():
                    break
                results["eval"].append(bench_eval(cfg, img, roi, device, reps, mem, amp=cuda, label=label,
                                                  per_subset_kit=not args.gpu_quick))
                sample_matmul(results["eval"][-1])
                save()
        if "caches" in sections and not past_deadline():
            results["caches"] = []
            img = phantom_image(32 if args.quick else 96)
            jobs = [("small2d", img, (32, 32, 16)), ("small", img, (32, 32, 32))] if args.quick else [
                ("small2d", img, (64, 64, 16)), ("small", img, (64, 64, 64)),
                ("paper", img[:, :, 16:80, 32:64].contiguous(), (64, 64, 32))]
            for cfg, img_c, roi in jobs:
                if past_deadline():
                    break
                results["caches"].append(bench_caches(cfg, img_c, roi, device, repeats, mem))
                save()
        if "decode" in sections and not past_deadline():
            results["decode"] = []
            jobs = [("small", (32, 32, 32))] if args.quick else [("small", (64, 64, 64)), ("small2d", (96, 96)),
                                                               ("paper", (64, 64, 32)), ("paper", (96, 96, 48))]
            if cuda and not args.quick:
                jobs.append(("paper", (160, 160, 80)))
            for cfg, spatial in jobs:
                if past_deadline():
                    break
                results["decode"].append(bench_decode(cfg, spatial, device, repeats, mem))
                sample_matmul(results["decode"][-1])
                save()
        if "cpu" in sections and not past_deadline():
            results["cpu"] = []
            for cfg in ("small", "small2d"):
                tc = TRAIN_CONFIGS[cfg]
                spatial = tuple(tc.roi_size)
                batch = tc.batch_size
                if args.quick:
                    spatial = (32,) * len(spatial)
                    batch = max(2, batch // 4)
                results["cpu"].append(bench_train(cfg, batch, spatial, device, repeats, mem, sgd=sgd))
                sample_matmul(results["cpu"][-1])
                save()
            if not args.quick:  # what-ifs: is it the widths or the batch that keeps small2d's FLOP rate low?
                tc = TRAIN_CONFIGS["small2d"]
                base = CONFIGS["small2d"]
                wide = dataclasses.replace(base, name="small2d-wide", stem_width=2 * base.stem_width,
                                           planes=tuple(2 * p for p in base.planes),
                                           bottleneck_width=2 * base.bottleneck_width,
                                           decoder_widths=tuple(2 * w for w in base.decoder_widths))
                for cfg, batch, label in ((wide, tc.batch_size, "small2d x2 widths"),
                                          ("small2d", 4 * tc.batch_size, "small2d x4 batch")):
                    if past_deadline():
                        break
                    r = bench_train(cfg, batch, tuple(tc.roi_size), device, repeats, mem, sgd=sgd, naive=False,
                                    label=label)
                    r["what_if"] = True
                    results["cpu"].append(r)
                    save()
        # CPU step diagnostics, at each config's training size (paper: the train section's CPU crop)
        step_jobs = [("small", 2, (32, 32, 32))] if args.quick else [
            ("paper", 1, (96, 96, 48)),
            *[(c, TRAIN_CONFIGS[c].batch_size, tuple(TRAIN_CONFIGS[c].roi_size)) for c in ("small", "small2d")]]
        for name, bench in (("alloc", lambda c, b, sp: bench_alloc(c, b, sp, device, repeats, sgd=sgd)),
                            ("kernels", lambda c, b, sp: bench_kernels(c, b, sp, device, sgd=sgd))):
            if name not in sections or cuda or past_deadline():
                continue
            results[name] = []
            for cfg, batch, spatial in step_jobs:
                if past_deadline():
                    break
                results[name].append(bench(cfg, batch, spatial))
                sample_matmul(results[name][-1])
                save()
        if "compile" in sections:
            if math.isfinite(_DEADLINE) and _DEADLINE - time.perf_counter() < 120:
                log("compile: skipped, less than 120 s of the budget left")
                results["compile"] = dict(error="skipped: budget")
            else:
                results["compile"] = bench_compile(var_batch, var_spatial, device, repeats, mem, cfg=var_cfg)
            save()
        if "profile" in sections and not past_deadline():
            results["profile"] = []
            for cfg in args.profile_configs:
                tc = TRAIN_CONFIGS[cfg]
                spatial, batch = tuple(tc.roi_size), tc.batch_size
                if cfg == "paper" and not (cuda or args.big):  # the CPU-sized paper crop of the train section
                    spatial, batch = (96, 96, 48), 1
                if args.quick:
                    spatial, batch = (32,) * len(spatial), max(2, batch // 4)
                results["profile"].append(bench_profile(cfg, batch, spatial, device, repeats, mem, threads))
                sample_matmul(results["profile"][-1])
                save()
    finally:
        save()
        log(f"wrote {out_path}")
    report(results)
    return results


if __name__ == "__main__":
    main()
