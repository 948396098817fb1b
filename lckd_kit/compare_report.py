"""The comparison's report: the sentences, tables and figures of ``report.md`` / ``report.html``
written by :func:`lckd_kit.compare.compare`, all computed from a :class:`~lckd_kit.compare.CompareResults`.

    res = compare.load_results("outputs/compare")
    write_compare_report(res, "outputs/compare")     # report.md, report.html, figures/
    what_the_numbers_show(res)                        # the generated bullets, nothing written in advance
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lckd_kit import stats
from lckd_kit.compare import PUBLISHED, SUMMARIES, label
from lckd_kit.runtime import format_seconds

if TYPE_CHECKING:
    from lckd_kit.compare import CompareResults



def _cell(c: stats.Comparison, diff: bool = False) -> str:
    v = c.diff if diff else c.a
    return f"{stats.num(v, diff)} [{stats.num(c.low, diff)}, {stats.num(c.high, diff)}]"


def _setup_bullets(res: CompareResults) -> list[str]:
    meta = res.meta
    cfg = meta.get("config", {})
    tcs = meta.get("train_configs", {})
    first = next(iter(tcs.values()), {})
    out = ["Methods (docs/methods.md): " + "; ".join(
        f"**{label(m)}** (`{tcs.get(m, {}).get('model', '?')}`{', no distillation' if m == 'nokd' else ''}, "
        f"{meta.get('params', {}).get(m, 0):,} parameters)" for m in res.methods) + "."]
    if first:
        out.append(f"Training, the same for every method: schedule `{cfg.get('schedule')}`"
                   + (f" with {cfg['train_overrides']}" if cfg.get("train_overrides") else "")
                   + f", {first['stage1_steps']} steps with all modalities + {first['stage2_steps']} steps with a random "
                   f"1–3 modality subset per batch, batch {first['batch_size']}, crop {tuple(first['roi_size'] or ())}, "
                   f"{first['optimizer']} lr {first['lr']:g}; for a given seed every method sees the same batches "
                   f"and subsets. Only LCKD adds the distillation loss (weight {first['kd_weight']:g}).")
    out.append(f"Data: {cfg.get('n_cases')} phantom cases (seed {cfg.get('train_seed')}) split into training and "
               f"validation, {len(res.cases)} held-out test phantoms (seed {cfg.get('test_seed')}), {cfg.get('grid')}³ "
               f"voxels of {192.0 / cfg.get('grid', 96):g} mm, phantom generator v{cfg.get('phantom_generator_version')}.")
    out.append("Evaluation: every model through the kit's one 15-subset evaluation (sliding window with its trained "
               "window, probabilities averaged, threshold 0.5, nested regions, Dice per case and region, "
               "`brats2018` empty-region convention).")
    out.append(f"Intervals: 95 % percentile bootstrap over the {len(res.cases)} held-out cases"
               + (f" and the {len(res.seeds)} seeds (seeds resampled, then cases)" if len(res.seeds) > 1 else
                  " (one seed: case-to-case spread only)")
               + "; differences are paired by seed and case (`lckd_kit.stats`).")
    timing = meta.get("timing", {})
    if timing:
        out.append("Training / evaluation time per run: " + "; ".join(
            f"{label(m)} " + ", ".join(f"{format_seconds(t['train_s'])} / {format_seconds(t['eval_s'])}" for t in timing[m].values())
            for m in res.methods if timing.get(m)) + ".")
    if meta.get("machine"):
        out.append(f"Machine: {meta['machine']}.")
    if meta.get("wall_s"):
        cpu = meta.get("cpu_s", 0.0)
        out.append(f"Wall time: {format_seconds(meta['wall_s'])} in all (phantoms {format_seconds(meta.get('phantoms_s', 0))}); CPU time "
                   f"of this process {format_seconds(cpu)}, {cpu / max(meta['wall_s'], 1e-9):.1f}× the wall time with "
                   f"{meta.get('threads', '?')} torch thread(s).")
    return out


def what_the_numbers_show(res: CompareResults) -> list[str]:
    """The report's bullets, generated from the per-case scores (nothing written in advance)."""
    ref = res.reference
    over = f"{len(res.cases)} held-out case(s) × {len(res.seeds)} seed(s)"
    rank = res.ranking("mean")
    out = ["Mean Dice over the 15 subsets and three regions, highest first: " + ", ".join(
        f"{label(m)} {_cell(res.summary(m, 'mean'))}" for m, _ in rank) + f" (95 % intervals over {over})."]
    core = res.ranking("core_no_t1ce")
    out.append("Without T1ce, the tumour core (ET, TC) is best kept by "
               f"{label(core[0][0])} ({stats.num(core[0][1])}) and least by {label(core[-1][0])} "
               f"({stats.num(core[-1][1])}).")
    for m in res.methods:
        if m == ref:
            continue
        out.append(stats.describe(res.difference(m, "mean"), "Mean Dice over the 15 subsets", (label(m), label(ref))))
    close = [m for m in res.methods if m != ref and not res.difference(m, "mean").excludes_zero]
    if close:
        out.append(f"Within noise of {label(ref)} on the 15-subset mean: " + ", ".join(label(m) for m in close)
                   + f" — with this many cases and seeds, how they rank against {label(ref)} is not established.")
    pub = res.published_comparison()
    if pub is not None:
        out.append(f"The kit's region-fusion table against RFNet's published BraTS 2018 table: Spearman "
                   f"{pub.spearman:.2f} over the 45 cells (a table that knows only each cell's region scores "
                   f"{pub.spearman_regions_only:.2f}), {pub.spearman_within:.2f} within a region (over its 15 subsets, "
                   f"mean of ET, TC, WT), mean absolute difference {pub.mae:.3f} — how far the phantom picture of "
                   f"which modality reveals what is from real scans, not a reproduction of RFNet.")
    return out


def _published_names() -> list[str]:
    from lckd_kit import calibration

    try:
        return calibration.published_methods()
    except (OSError, ValueError):
        return []


def ranking_table(res: CompareResults) -> str:
    from lckd_kit import calibration

    published = {name: float(np.mean(calibration.published_table(name))) for name in _published_names()}
    pub_rank = {n: i + 1 for i, (n, _) in enumerate(sorted(published.items(), key=lambda t: -t[1]))}
    lines = ["| rank on phantoms | method | phantoms: mean Dice, 15 subsets | published method | real BraTS 2018: mean Dice "
             "| rank among published |", "|--:|---|--:|---|--:|--:|"]
    shown = set()
    for i, (m, v) in enumerate(res.ranking("mean")):
        p = PUBLISHED.get(m)
        cells = [str(i + 1), label(m), stats.num(v)]
        if p in published:
            shown.add(p)
            cells += [p, stats.num(published[p]), str(pub_rank[p])]
        else:
            cells += ["—", "—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    for p in published:
        if p not in shown:
            lines.append(f"| — | — (not in the kit) | — | {p} | {stats.num(published[p])} | {pub_rank[p]} |")
    return "\n".join(lines)


def summary_markdown(res: CompareResults) -> str:
    """One row per method: parameters and each summary (:data:`SUMMARIES`) with its 95 % interval."""
    head = ["method", "parameters"] + [v[0] for v in SUMMARIES.values()]
    lines = ["| " + " | ".join(head) + " |", "|---|--:|" + "--:|" * len(SUMMARIES)]
    for m in res.methods:
        cells = [label(m), f"{res.meta.get('params', {}).get(m, 0):,}"] + [_cell(res.summary(m, k)) for k in SUMMARIES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def differences_markdown(res: CompareResults) -> str:
    """Each method minus the reference method (LCKD), paired by seed and case, with 95 % intervals."""
    ref = res.reference
    lines = ["| method − " + label(ref) + " | " + " | ".join(v[0] for v in SUMMARIES.values()) + " |",
             "|---|" + "--:|" * len(SUMMARIES)]
    lines += [f"| {label(m)} | " + " | ".join(_cell(res.difference(m, k), diff=True) for k in SUMMARIES) + " |"
              for m in res.methods if m != ref]
    return "\n".join(lines)


def write_compare_report(res: CompareResults, out_dir: str | os.PathLike) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/`` for a comparison; return report.md."""
    from lckd_kit import calibration, viz
    from lckd_kit.report import Report

    out = Path(out_dir)
    rep = Report("Four ways to survive a missing modality: " + ", ".join(label(m) for m in res.methods)
                 + " on phantoms", out)
    ref = res.reference
    seed_note = f"seed {res.seeds[0]}" if len(res.seeds) == 1 else f"mean over seeds {', '.join(map(str, res.seeds))}"
    rep.add("p", "Every method is trained by the same loop on the same phantoms, crops, batches and seeds, and "
                 "scored by the same 15-subset evaluation on held-out phantoms. The numbers below are computed from "
                 "the per-case scores in `results.json`.")
    rep.add("h2", "Setup")
    rep.add("ul", _setup_bullets(res))
    if res.meta.get("command"):
        rep.add("code", res.meta["command"])
    if not res.seeds:
        rep.add("p", "No seed has finished for every method yet: nothing to compare.")
        return rep.write()

    rep.add("h2", "What the numbers show")
    rep.add("ul", what_the_numbers_show(res))
    rep.add("p", "These are synthetic phantoms and a short CPU schedule at CPU size: the comparison shows the "
                 "mechanisms at work under equal conditions; it is not a reproduction of any paper's BraTS results.")

    rep.add("h2", "Summary")
    rep.add("table", summary_markdown(res))
    rep.add("p", "Mean Dice with its 95 % bootstrap interval. Core without T1ce: ET and TC over the 7 subsets that "
                 "lack T1ce; WT without FLAIR: the 7 subsets that lack FLAIR; all four: the full set only.")
    rep.figures(("summary_bars.png", res.summary_figure(), "Summary per method, with 95 % intervals"))

    if len(res.methods) > 1:
        rep.add("h2", f"Paired differences against {label(ref)}")
        rep.add("table", differences_markdown(res))
        rep.add("ul", [stats.describe(res.difference(m, "core_no_t1ce"), "Core (ET, TC) without T1ce",
                                      (label(m), label(ref))) for m in res.methods if m != ref])
        rep.figures(("differences.png", res.difference_figure(), f"Paired differences to {label(ref)}"))

    rep.add("h2", "Ranking on phantoms and on real scans")
    rep.add("table", ranking_table(res))
    counterparts = [f"{label(m)} ({p})" for m, p in PUBLISHED.items() if m in res.methods]
    rep.add("p", "The published column comes from the bundled table of real BraTS 2018 results "
                 "(`lckd_kit/resources/published_dice_brats2018.csv`, read by `lckd_kit.calibration`), which holds "
                 f"{', '.join(_published_names()) or 'no method'}; of the methods compared here only "
                 f"{', '.join(counterparts) or 'none'} has a published counterpart, so the published ranking is "
                 "partial. The kit's methods are CPU-sized simplifications (docs/methods.md), trained on phantoms.")
    pub = res.published_comparison()
    if pub is not None:
        rep.add("h3", "Region fusion (kit, phantoms) vs RFNet (published, real BraTS 2018)")
        rep.add("p", f"Over the 45 cells of the 15-subset table: Spearman {pub.spearman:.3f} (a table that knows only "
                     f"each cell's region: {pub.spearman_regions_only:.3f}), within a region {pub.spearman_within:.3f} "
                     f"(over its 15 subsets, mean of ET, TC, WT), mean absolute difference {pub.mae:.3f}.")
        rows = ["| what a model learns | kit region fusion | RFNet (BraTS 2018) |", "|---|--:|--:|"]
        for name in calibration.SUMMARY_ROWS:
            rows.append(f"| {name} | {pub.summary[name]:.3f} | {pub.reference_summary[name]:.3f} |")
        rep.add("table", "\n".join(rows))
        rep.figures(("regionfusion_vs_rfnet.png", viz.subset_heatmap(
            pub.difference, title="Kit region fusion (phantoms) − RFNet (real BraTS 2018)", diff=True, show_mean=True),
            "Region fusion on phantoms minus published RFNet on real scans (blue: phantoms higher)"))

    rep.add("h2", "Dice on the held-out cases, 15 modality subsets")
    rep.figures(*[(f"heatmap_{m}.png", res.heatmap(m), f"{label(m)} ({seed_note})") for m in res.methods])
    for m in res.methods:
        rep.add("h3", f"{label(m)} — Dice ({seed_note})")
        rep.add("table", viz.markdown_subset_table(res.table(m)))
        sd = res.seed_std(m)
        if sd is not None:
            rep.add("h3", f"{label(m)} — standard deviation of Dice across {len(res.seeds)} seeds")
            rep.add("table", viz.markdown_subset_table(sd))
    return rep.write()


__all__ = ["write_compare_report", "what_the_numbers_show", "ranking_table", "summary_markdown",
           "differences_markdown"]
