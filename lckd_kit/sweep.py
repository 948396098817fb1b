"""When does distillation help? LCKD against no-KD across phantoms that reveal more or less.

    results = run_sweep(cues=(0.0, 1.0, 2.0), seeds=(0, 1, 2))   # minutes per run on a CPU
    results = load_sweep()                                         # the committed results, in seconds
    gains(results)                                                 # paired LCKD - no-KD, with intervals
    plot_gains(results)                                            # the figure of notebook 05

Each run trains the kit's CPU recipe (``small2d`` by default) on phantoms made with one ``cues``
setting (``phantom.make_case``: 0 = only T1ce shows the enhancing tumour, 1 = calibrated against
what models learn from real scans, 2 = the other modalities reveal even more) and evaluates it on
held-out phantoms of the same setting over the 15 subsets. For every (cues, seed) there is an LCKD
run and a no-KD run with the same seed, schedule and batches, so their per-case Dice pair up; a few
extra LCKD runs vary the KD weight. The results file keeps the per-case Dice of every run and the
mechanism records of its last election (``distill.feature_probe``), so the analysis never needs the
models again.
"""
from __future__ import annotations

import json
import os
import time
from importlib.resources import files
from pathlib import Path
from typing import Sequence

import numpy as np

from lckd_kit import REGIONS
from lckd_kit import stats

SWEEP_FORMAT = "lckd_kit.sweep/1"
#: the committed results of the reference sweep (docs/when_distillation_helps.md has the command)
RESULTS_FILE = "sweep_results.json"

#: the outcomes the question is about: name -> (subset group, regions)
OUTCOMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mean Dice over the 15 subsets": ("all", REGIONS),
    "core (ET, TC) without T1ce": ("no_t1ce", ("ET", "TC")),
}


def run_sweep(out: str | os.PathLike, cues: Sequence[float] = (0.0, 1.0, 2.0), seeds: Sequence[int] = (0, 1, 2),
              kd_weights: Sequence[float] = (1.0,), kd_weight_cues: float = 1.0, config: str = "small2d",
              train_overrides: dict | None = None, n_cases: int = 24, n_test: int = 6, grid: int = 96,
              device: str = "cpu", cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Train and evaluate every run of the sweep; write ``out`` (JSON) after each run, so an interrupted
    sweep keeps what it finished and a rerun skips it.

    Runs: for each ``cues`` x ``seeds``, LCKD (the config's KD weight) and no-KD; for ``kd_weight_cues``
    x ``seeds``, LCKD with each of ``kd_weights``. Returns ``out``.
    """
    import torch

    from lckd_kit.distill import feature_probe
    from lckd_kit.evaluate import evaluate
    from lckd_kit.experiment import heldout_phantoms, load_eval_cases
    from lckd_kit.phantom import ensure_phantoms
    from lckd_kit.train import get_train_config, train
    from lckd_kit.transforms import normalize_image

    from lckd_kit.experiment import machine_info
    from lckd_kit.phantom import GENERATOR_VERSION

    out = Path(out)
    done = json.loads(out.read_text()) if out.is_file() else None
    base = get_train_config(config, **(train_overrides or {}))
    same = (done and done.get("config") == config and done.get("overrides") == (train_overrides or {})
            and done.get("phantom_generator_version") == GENERATOR_VERSION)
    results = done if same else {
        "format": SWEEP_FORMAT, "config": config, "overrides": train_overrides or {}, "default_kd_weight": base.kd_weight,
        "n_cases": n_cases, "n_test": n_test, "grid": grid, "phantom_generator_version": GENERATOR_VERSION, "runs": []}
    results["command"] = command_line(out, cues, seeds, kd_weights, config, train_overrides, n_cases, n_test, grid)
    results["machine"] = machine_info(torch.device(device))
    results["threads"] = torch.get_num_threads()
    plan = [(c, s, "lckd", base.kd_weight) for c in cues for s in seeds] + \
           [(c, s, "nokd", 0.0) for c in cues for s in seeds] + \
           [(kd_weight_cues, s, "lckd", w) for w in kd_weights for s in seeds]
    have = {(r["cues"], r["seed"], r["kind"], r["kd_weight"]) for r in results["runs"]}
    for c, seed, kind, w in plan:
        if (float(c), seed, kind, float(w)) in have:
            continue
        t0 = time.perf_counter()
        train_dir = ensure_phantoms(n_cases, seed=0, grid=grid, cues=c, cache_dir=cache_dir, progress=False)
        test = load_eval_cases(heldout_phantoms(n_test, grid=grid, cues=c, cache_dir=cache_dir, progress=False,
                                                train_dir=train_dir))
        cfg = get_train_config(base, seed=seed, no_kd=kind == "nokd", kd_weight=w if kind == "lckd" else base.kd_weight)
        result = train(cfg, train_dir, device=device, progress=progress)
        ev = evaluate(result.model, test, device=device, hd95=False)
        probe = feature_probe(result.model, [dict(t, image=normalize_image(t["image"])) for t in test],
                              torch.device(device))
        results["runs"].append({
            "cues": float(c), "seed": seed, "kind": kind, "kd_weight": float(w), "cases": ev.cases,
            "dice": np.round(ev.per_case("dice"), 5).tolist(), "truth_empty": ev.truth_empty().tolist(),
            "teachers": result.teacher_names, "features": probe, "seconds": round(time.perf_counter() - t0, 1)})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results) + "\n")
        if progress:
            print(f"[sweep] cues {c:g} seed {seed} {kind} (KD weight {w:g}): mean Dice "
                  f"{np.nanmean(ev.per_case('dice')):.3f} ({results['runs'][-1]['seconds']:.0f} s)")
    return out


def command_line(out, cues, seeds, kd_weights, config, train_overrides, n_cases, n_test, grid) -> str:
    """The shell line that reruns a sweep (``python -m lckd_kit.sweep``)."""
    line = (f"python -m lckd_kit.sweep --out {Path(out).as_posix()} --cues {' '.join(f'{c:g}' for c in cues)} "
            f"--seeds {' '.join(map(str, seeds))} --kd-weights {' '.join(f'{w:g}' for w in kd_weights)}")
    if config != "small2d":
        line += f" --config {config}"
    if train_overrides:
        line += f" --stage-steps {train_overrides.get('stage1_steps')} {train_overrides.get('stage2_steps')}"
    if (n_cases, n_test, grid) != (24, 6, 96):
        line += f" --n-cases {n_cases} --n-test {n_test} --grid {grid}"
    return line


def load_sweep(path: str | os.PathLike | None = None) -> dict:
    """The sweep's results (default: the committed ones that ship with the kit)."""
    text = Path(path).read_text() if path is not None else (files("lckd_kit") / "resources" / RESULTS_FILE).read_text()
    results = json.loads(text)
    if results.get("format") != SWEEP_FORMAT:
        raise ValueError(f"not lckd_kit sweep results (format {SWEEP_FORMAT!r}), got {results.get('format')!r}")
    return results


def _dice(results: dict, cues: float, kind: str, kd_weight: float) -> tuple[list[int], np.ndarray]:
    """(seeds, per-case Dice (n_seeds, n_cases, 15, 3)) of one kind of run at one setting, by seed."""
    runs = sorted((r for r in results["runs"] if r["cues"] == cues and r["kind"] == kind
                   and np.isclose(r["kd_weight"], kd_weight)), key=lambda r: r["seed"])
    return [r["seed"] for r in runs], np.array([r["dice"] for r in runs], dtype=np.float64)


def paired(results: dict, cues: float, kd_weight: float | None = None,
           seeds: Sequence[int] | None = None) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The LCKD and no-KD per-case Dice at one setting, paired: ``(seeds, lckd, nokd)``, each array
    ``(n_seeds, n_cases, 15, 3)`` over the seeds both have (or ``seeds``, when given).
    ``kd_weight`` None: the config's."""
    w = results["default_kd_weight"] if kd_weight is None else kd_weight
    seeds_a, a = _dice(results, cues, "lckd", w)
    seeds_b, b = _dice(results, cues, "nokd", 0.0)
    common = sorted((set(seeds_a) & set(seeds_b)) if seeds is None else set(seeds_a) & set(seeds_b) & set(seeds))
    return (common, a[[seeds_a.index(s) for s in common]] if common else a[:0],
            b[[seeds_b.index(s) for s in common]] if common else b[:0])


def gains(results: dict, kd_weight: float | None = None) -> list[dict]:
    """LCKD - no-KD for every cues setting and outcome, paired by seed and case, with the 95 %
    bootstrap interval over seeds and cases (``stats.compare``). ``kd_weight`` None: the config's."""
    w = results["default_kd_weight"] if kd_weight is None else kd_weight
    out = []
    for c in sorted({r["cues"] for r in results["runs"]}):
        common, a, b = paired(results, c, w)
        if not common:
            continue
        for name, (group, regions) in OUTCOMES.items():
            cmp = stats.compare(a, b, group, regions)
            out.append({"cues": c, "kd_weight": w, "outcome": name, "seeds": common, "comparison": cmp,
                        "sentence": stats.describe(cmp, f"cues {c:g}, {name}")})
    return out


def kd_weight_table(results: dict, cues: float = 1.0) -> list[dict]:
    """Mean Dice of each KD weight at ``cues`` (0 = the no-KD runs), with intervals over seeds and cases."""
    weights = sorted({r["kd_weight"] for r in results["runs"] if r["cues"] == cues})
    rows = []
    for w in weights:
        _, d = _dice(results, cues, "nokd" if w == 0 else "lckd", w)
        if d.size:
            rows.append({"kd_weight": w, **{name: stats.compare(d, None, g, r) for name, (g, r) in OUTCOMES.items()}})
    return rows


def plot_gains(results: dict):
    """Gain of LCKD over no-KD against the phantoms' ``cues``, one panel per outcome, each point the
    mean paired difference over seeds and cases with its 95 % interval (and the per-seed means)."""
    from lckd_kit.viz import new_figure

    rows = gains(results)
    fig = new_figure((11, 3.8))
    axes = fig.subplots(1, len(OUTCOMES))
    for ax, name in zip(np.atleast_1d(axes), OUTCOMES):
        pts = [r for r in rows if r["outcome"] == name]
        x = np.array([r["cues"] for r in pts])
        c = [r["comparison"] for r in pts]
        y = np.array([k.diff for k in c])
        err = np.array([[k.diff - k.low for k in c], [k.high - k.diff for k in c]])
        ax.axhline(0, color="#888888", lw=1)
        ax.errorbar(x, y, yerr=err, fmt="o-", color="#0072B2", capsize=5, lw=2, label="mean, 95 % interval")
        for xi, k in zip(x, c):
            ax.scatter([xi] * len(k.seed_diffs), k.seed_diffs, color="#E69F00", s=18, zorder=3)
        ax.scatter([], [], color="#E69F00", s=18, label="one seed")
        ax.set_title(name, fontsize=11, loc="left", fontweight="bold")
        ax.set_xlabel("cues: how much the non-teacher modalities reveal (1 = calibrated)")
        ax.set_ylabel("LCKD − no-KD (Dice)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"When does distillation help? {results['config']}, {len(pts[0]['seeds']) if pts else 0} seeds, "
                 f"{results['n_test']} held-out phantoms per setting", fontsize=12)
    return fig


def mechanism_table(results: dict) -> list[dict]:
    """Mean over seeds of the last election's fill error in T1ce's and FLAIR's slot, per cues and kind."""
    rows = []
    for c in sorted({r["cues"] for r in results["runs"]}):
        for kind, w in (("lckd", results["default_kd_weight"]), ("nokd", 0.0)):
            runs = [r for r in results["runs"] if r["cues"] == c and r["kind"] == kind and np.isclose(r["kd_weight"], w)]
            if runs:
                fill = np.array([r["features"]["fill_error"] for r in runs])
                rows.append({"cues": c, "kind": kind, "fill_error_t1ce": float(fill[:, 2].mean()),
                             "fill_error_flair": float(fill[:, 0].mean()), "n": len(runs)})
    return rows


def report_markdown(results: dict) -> str:
    """The sweep's findings as Markdown, every number computed from ``results`` (docs/when_distillation_helps.md)."""
    runs = results["runs"]
    seconds = sum(r.get("seconds", 0.0) for r in runs)
    lines = [f"Runs: {len(runs)} (`{results['config']}`, {results['n_cases']} training phantoms and "
             f"{results['n_test']} held-out phantoms of {results['grid']}^3 per setting, phantom generator "
             f"v{results.get('phantom_generator_version', '?')}); {seconds / 3600:.1f} hours of wall-clock time for "
             f"training and evaluation on {results.get('machine', 'an unrecorded machine')} with "
             f"{results.get('threads', '?')} torch thread(s) per run.", "", f"Command: `{results.get('command', 'see run_sweep')}`", "",
             "### LCKD − no-KD, paired by seed and case (95 % bootstrap intervals over seeds and cases)", "",
             "| cues | outcome | LCKD | no-KD | LCKD − no-KD | interval | per seed |", "|--:|---|--:|--:|--:|---|---|"]
    for r in gains(results):
        c = r["comparison"]
        lines.append(f"| {r['cues']:g} | {r['outcome']} | {stats.num(c.a)} | {stats.num(c.b)} | {stats.num(c.diff, True)} "
                     f"| [{stats.num(c.low, True)}, {stats.num(c.high, True)}] | "
                     f"{', '.join(stats.num(v, True) for v in c.seed_diffs)} |")
    lines += ["", "In words (generated from the intervals):", ""]
    lines += [f"* {r['sentence']}" for r in gains(results)]
    kd_cues = sorted({r["cues"] for r in runs if r["kind"] == "lckd" and r["kd_weight"] != results["default_kd_weight"]})
    for c in kd_cues:
        lines += ["", f"### The KD weight at cues {c:g} (0 = no-KD)", "",
                  "| KD weight | " + " | ".join(OUTCOMES) + " |", "|--:|" + "--:|" * len(OUTCOMES)]
        for row in kd_weight_table(results, c):
            lines.append(f"| {row['kd_weight']:g} | " + " | ".join(
                f"{stats.num(row[n].a)} [{stats.num(row[n].low)}, {stats.num(row[n].high)}]" for n in OUTCOMES) + " |")
    lines += ["", "### The mechanism: error of the mean fill at the last election (mean over seeds)", "",
              "| cues | run | T1ce missing | FLAIR missing | seeds |", "|--:|---|--:|--:|--:|"]
    for m in mechanism_table(results):
        lines.append(f"| {m['cues']:g} | {m['kind']} | {m['fill_error_t1ce']:.3f} | {m['fill_error_flair']:.3f} | {m['n']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """``python -m lckd_kit.sweep``: run (or continue) a sweep and print its findings."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lckd_kit.sweep", description="LCKD vs no-KD across phantom cues")
    ap.add_argument("--out", required=True, help="results JSON (an interrupted sweep continues from it)")
    ap.add_argument("--cues", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--kd-weights", type=float, nargs="*", default=[1.0], help="extra LCKD runs at cues 1")
    ap.add_argument("--config", default="small2d")
    ap.add_argument("--stage-steps", type=int, nargs=2, default=None, metavar=("STAGE1", "STAGE2"))
    ap.add_argument("--n-cases", type=int, default=24)
    ap.add_argument("--n-test", type=int, default=6)
    ap.add_argument("--grid", type=int, default=96)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    overrides = dict(stage1_steps=args.stage_steps[0], stage2_steps=args.stage_steps[1]) if args.stage_steps else None
    out = run_sweep(args.out, cues=args.cues, seeds=args.seeds, kd_weights=args.kd_weights, config=args.config,
                    train_overrides=overrides, n_cases=args.n_cases, n_test=args.n_test, grid=args.grid,
                    device=args.device)
    print(report_markdown(load_sweep(out)))
    return 0


__all__ = ["run_sweep", "load_sweep", "paired", "gains", "kd_weight_table", "plot_gains", "mechanism_table", "report_markdown", "command_line", "main", "OUTCOMES",
           "SWEEP_FORMAT"]


if __name__ == "__main__":
    raise SystemExit(main())
