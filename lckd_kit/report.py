"""The experiment report: markdown with PNG figures, and the same as one self-contained HTML file.

    summary = ExperimentSummary(title=..., runs=[RunSummary(...)], baseline=[...], ...)
    write_report(summary, "outputs/demo")          # report.md, report.html, figures/

Everything the report says is computed here from the evaluations it is given: the sentences of
"What the numbers show" come from :func:`what_the_numbers_show`, whose comparisons and intervals
come from :mod:`lckd_kit.stats`. Nothing in them is written in advance.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from lckd_kit import ALL_PRESENT, MODALITIES, REGIONS
from lckd_kit import stats
from lckd_kit.evaluate import EvalResult

#: the subset used for the "missing T1ce" example slices: FLAIR + T1 + T2
NO_T1CE = (True, True, False, True)


# --------------------------------------------------------------------------------------------
# what goes into a report


@dataclass
class RunSummary:
    """One trained model, evaluated: what the report needs of it.

    ``example`` maps a subset (``ALL_PRESENT``, ``NO_T1CE``) to the model's nested region masks
    ``(3, X, Y, Z)`` for the report's example case."""

    label: str
    seed: int
    eval: EvalResult
    history: list[dict] = field(default_factory=list)
    elections: list[dict] = field(default_factory=list)  # ElectionResult.to_record() records
    example: dict[tuple[bool, ...], np.ndarray] = field(default_factory=dict)


@dataclass
class ExperimentSummary:
    """A whole report: the models of one or two kinds over seeds, and how they were made.

    ``runs``: the model under study (LCKD), one per seed; ``baseline``: the comparison model, seed
    for seed, or empty for a single-model report. ``example_case``: a dict with ``name``, normalised
    ``image``, ``label`` and ``spacing``. ``setup``: bullets (data, machine, wall times), written by
    the caller, who knows them. ``command``: what reruns it. ``intro``: an optional first paragraph.
    """

    title: str
    runs: list[RunSummary]
    baseline: list[RunSummary] = field(default_factory=list)
    example_case: dict | None = None
    setup: list[str] = field(default_factory=list)
    command: str | None = None
    intro: str | None = None
    labels: tuple[str, str] = ("LCKD", "no-KD")


# --------------------------------------------------------------------------------------------
# numbers -> words


def _best_single(table: np.ndarray) -> dict[str, str]:
    """Best single modality per region from a (15, 3) table (rows 0-3 are the singles)."""
    from lckd_kit.viz import DISPLAY_NAMES

    return {r: DISPLAY_NAMES[MODALITIES[int(np.nanargmax(table[:4, i]))]] if np.isfinite(table[:4, i]).any()
            else "?" for i, r in enumerate(REGIONS)}


def what_the_numbers_show(lckd: np.ndarray, base: np.ndarray | None = None, elections: Sequence[dict] = (),
                          labels: Sequence[str] = ("LCKD", "no-KD")) -> list[str]:
    """The report's "What the numbers show" bullets, GENERATED from the per-case scores.

    Args:
        lckd, base: per-case Dice ``(n_seeds, n_cases, 15, 3)`` of the two models (base None: a
            single-model report); paired by seed and case.
        elections: final election records (``ElectionResult.to_record()``), one per seed.
        labels: display names of the two models.
    """
    from lckd_kit.viz import DISPLAY_NAMES

    A, B = labels
    num = stats.num
    out = []
    c_all = stats.compare(lckd, base, "all")
    c_full = stats.compare(lckd, base, "full")
    c_core = stats.compare(lckd, base, "no_t1ce", ("ET", "TC"))
    full_core = stats.compare(lckd, base, "full", ("ET", "TC"))
    c_wt = stats.compare(lckd, base, "no_flair", ("WT",))
    full_wt = stats.compare(lckd, base, "full", ("WT",))
    best = _best_single(stats.mean_table(lckd))
    if base is None:
        out.append(f"Averaged over all 15 subsets and the three regions the model reaches Dice {num(c_all.a)} "
                   f"({round(100 * c_all.level)} % interval [{num(c_all.low)}, {num(c_all.high)}] over "
                   f"{c_all.n_cases} case(s)); with all four modalities {num(c_full.a)}.")
        out.append(f"Without T1ce ({stats.GROUPS['no_t1ce'][0][4:]}) the tumour core regions (ET, TC) score "
                   f"{num(c_core.a)}, against {num(full_core.a)} with every modality "
                   f"(a drop of {num(full_core.a - c_core.a)}).")
        out.append(f"Without FLAIR the whole tumour (WT) scores {num(c_wt.a)}, against {num(full_wt.a)} with every "
                   f"modality.")
    else:
        out.append(f"Averaged over all 15 subsets and the three regions, {A} reaches Dice {num(c_all.a)} and {B} "
                   f"{num(c_all.b)}; with all four modalities {num(c_full.a)} vs {num(c_full.b)}.")
        out.append(f"Without T1ce ({stats.GROUPS['no_t1ce'][0][4:]}), ET and TC score {num(c_core.a)} ({A}) vs "
                   f"{num(c_core.b)} ({B}). Losing T1ce costs {A} {num(full_core.a - c_core.a)} and {B} "
                   f"{num(full_core.b - c_core.b)} of core Dice.")
        out.append(f"Without FLAIR ({stats.GROUPS['no_flair'][0][4:]}), WT scores {num(c_wt.a)} ({A}) vs "
                   f"{num(c_wt.b)} ({B}).")
        out.append(stats.describe(c_all, "Mean Dice over the 15 subsets", labels))
        out.append(stats.describe(c_core, "Core (ET, TC) without T1ce", labels))
    out.append(f"Best single modality on the held-out cases ({A}): " + ", ".join(f"{r} {m}" for r, m in best.items())
               + ".")
    if elections:
        last = elections[0]
        winners = {r: DISPLAY_NAMES.get(m, m) for r, m in last["winners"].items()}
        agree = [r for r in REGIONS if winners.get(r) == best[r]]
        out.append(f"The final election (step {last.get('step')}, {last.get('n_cases')} validation case(s)) chose "
                   + ", ".join(f"{r} {winners[r]}" for r in REGIONS) + " -- teachers "
                   + ", ".join(DISPLAY_NAMES.get(t, t) for t in last["teachers"]) + "; "
                   + ("the held-out singles agree for all three regions." if len(agree) == 3 else
                      f"the held-out singles agree for {', '.join(agree) or 'no region'}."))
        if len(elections) > 1:
            sets = {tuple(e["teachers"]) for e in elections}
            out.append(f"Teachers across the {len(elections)} seeds: " + (
                "identical." if len(sets) == 1 else "; ".join("+".join(s) for s in sorted(sets)) + "."))
    return out


# --------------------------------------------------------------------------------------------
# rendering: a list of blocks written twice (markdown with PNG files, self-contained HTML)


def _inline_html(text: str) -> str:
    s = html.escape(text, quote=False)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def _table_html(md: str) -> str:
    lines = [ln.strip() for ln in md.strip().splitlines() if ln.strip().startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    head, sep, body = cells[0], cells[1], cells[2:]
    align = ["center" if c.startswith(":") and c.endswith(":") else "right" if c.endswith(":") else "left" for c in sep]
    th = "".join(f"<th>{_inline_html(c)}</th>" for c in head)
    rows = "".join("<tr>" + "".join(f'<td style="text-align:{a}">{_inline_html(c)}</td>' for c, a in zip(r, align))
                   + "</tr>" for r in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{rows}</tbody></table>"


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.2em .55em}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;
margin:.4em 0}code,pre{background:#f5f5f5;padding:.1em .3em;border-radius:3px}pre{padding:.6em;overflow-x:auto}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}.figs{display:flex;flex-wrap:wrap;gap:1em}
.figs figure{margin:0;flex:1 1 45%}figcaption{font-size:.85em;color:#555}"""


class Report:
    """Blocks (heading, paragraph, bullets, table, figures, code) -> markdown and HTML."""

    def __init__(self, title: str, folder: Path):
        self.title, self.folder, self.blocks = title, Path(folder), []
        (self.folder / "figures").mkdir(parents=True, exist_ok=True)

    def add(self, kind: str, content) -> None:
        """``kind``: ``h2``, ``h3``, ``p``, ``ul`` (a list), ``table`` (markdown), ``code``."""
        self.blocks.append((kind, list(content) if kind == "ul" else content))

    def figures(self, *named) -> None:
        """``(file name, Figure, caption)`` triples: saved as PNG under figures/."""
        paths = []
        for name, fig, caption in named:
            path = self.folder / "figures" / name
            fig.savefig(path, dpi=90, bbox_inches="tight")
            paths.append((path, caption))
        self.blocks.append(("figs", paths))

    def markdown(self) -> str:
        out = [f"# {self.title}"]
        for kind, x in self.blocks:
            if kind in ("h2", "h3"):
                out.append(("## " if kind == "h2" else "### ") + x)
            elif kind in ("p", "table"):
                out.append(x)
            elif kind == "ul":
                out.append("\n".join(f"- {i}" for i in x))
            elif kind == "code":
                out.append(f"```\n{x}\n```")
            elif kind == "figs":
                out.append("\n\n".join(f"![{c}]({p.relative_to(self.folder).as_posix()})\n*{c}*" for p, c in x))
        return "\n\n".join(out) + "\n"

    def html(self) -> str:
        body = [f"<h1>{_inline_html(self.title)}</h1>"]
        for kind, x in self.blocks:
            if kind in ("h2", "h3"):
                body.append(f"<{kind}>{_inline_html(x)}</{kind}>")
            elif kind == "p":
                body.append(f"<p>{_inline_html(x)}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in x) + "</ul>")
            elif kind == "table":
                body.append(_table_html(x))
            elif kind == "code":
                body.append(f"<pre>{html.escape(x)}</pre>")
            elif kind == "figs":
                figs = "".join(
                    f'<figure><img alt="{html.escape(c)}" src="data:image/png;base64,'
                    f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{_inline_html(c)}</figcaption></figure>'
                    for p, c in x)
                body.append(f'<div class="figs">{figs}</div>')
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")

    def write(self) -> Path:
        """Write report.md and report.html into the folder; return report.md."""
        md = self.folder / "report.md"
        md.write_text(self.markdown())
        (self.folder / "report.html").write_text(self.html())
        return md


# --------------------------------------------------------------------------------------------
# the experiment report


def _per_case(runs: Sequence[RunSummary]) -> np.ndarray:
    """(n_seeds, n_cases, 15, 3)"""
    return np.stack([r.eval.per_case("dice") for r in runs])


def _seed_tables(runs: Sequence[RunSummary]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over seeds of the (15, 3) Dice tables (std NaN with one seed)."""
    t = np.stack([r.eval.table("dice") for r in runs])
    sd = t.std(axis=0, ddof=1) if len(t) > 1 else np.full(t.shape[1:], np.nan)
    return t.mean(axis=0), sd


def _example_figures(run: RunSummary, case: dict, tag: str) -> list:
    from lckd_kit import viz

    truth = np.asarray(case["label"])
    index = viz.best_slice(truth, "axial")
    out = []
    for mask, key in ((ALL_PRESENT, "all"), (NO_T1CE, "no_t1ce")):
        if mask not in run.example:
            continue
        seen = "given to the model" if mask[2] else "NOT given to the model"
        title = f"{run.label}, {viz.pretty_subset(mask)} — {case['name']} (T1ce shown, {seen})"
        fig = viz.compare_prediction(case["image"], truth, run.example[mask], index=index, modality="t1ce",
                                     title=title, spacing=case.get("spacing"))
        out.append((f"example_{tag}_{key}.png", fig, title))
    return out


def write_report(s: ExperimentSummary, out_dir: str | Path) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/`` for ``s`` into ``out_dir``; return report.md."""
    from lckd_kit import viz

    rep = Report(s.title, Path(out_dir))
    A, B = s.labels
    seeds = [r.seed for r in s.runs]
    seed_note = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean over seeds {', '.join(map(str, seeds))}"
    a_mean, a_sd = _seed_tables(s.runs)
    a_cases = _per_case(s.runs)
    b_cases = _per_case(s.baseline) if s.baseline else None
    empty = s.runs[0].eval.truth_empty()
    hd95 = s.runs[0].eval.meta.get("hd95") is not None
    elections = [r.elections[-1] for r in s.runs if r.elections]

    if s.intro:
        rep.add("p", s.intro)
    rep.add("h2", "Setup")
    rep.add("ul", s.setup)
    if s.command:
        rep.add("code", s.command)
    rep.add("h2", "What the numbers show")
    rep.add("ul", what_the_numbers_show(a_cases, b_cases, elections, s.labels))
    rep.add("p", "These are synthetic phantoms and a short CPU schedule: the numbers check the pipeline and show "
                 "the mechanism at work; they are not a reproduction of the paper's BraTS 2018 results.")

    rep.add("h2", "Dice on the held-out cases, 15 modality subsets")
    figs = [("heatmap_lckd.png", viz.subset_heatmap(a_mean, title=f"{A} ({seed_note})", show_mean=True,
                                                    flagged=stats.convention_cells(empty, a_cases)), A)]
    if s.baseline:
        b_mean, b_sd = _seed_tables(s.baseline)
        figs.append(("heatmap_nokd.png", viz.subset_heatmap(b_mean, title=f"{B} ({seed_note})", show_mean=True,
                                                            flagged=stats.convention_cells(empty, b_cases)), B))
        figs.append(("heatmap_diff.png", viz.subset_heatmap(
            a_mean - b_mean, title=f"{A} − {B}", diff=True, show_mean=True,
            flagged=stats.convention_cells(empty, a_cases, b_cases)),
            f"Difference {A} − {B} (red: {B} better, blue: {A} better; † cells rest on convention scores)"))
    rep.figures(*figs)
    tables = [(A, s.runs)] + ([(B, s.baseline)] if s.baseline else [])
    for label, runs in tables:
        mean, sd = _seed_tables(runs)
        rep.add("h3", f"{label} — Dice ({seed_note})" + (" and HD95 in mm" if hd95 else ""))
        hd = np.stack([r.eval.table("hd95") for r in runs]).mean(0) if hd95 else None
        rep.add("table", viz.markdown_subset_table(mean, hd))
        if len(runs) > 1:
            rep.add("h3", f"{label} — standard deviation of Dice across {len(runs)} seeds")
            rep.add("table", viz.markdown_subset_table(sd))
    if s.baseline:
        rep.add("h3", f"Difference {A} − {B} (Dice)")
        rep.add("table", viz.markdown_subset_table(a_mean - _seed_tables(s.baseline)[0]))

    first = s.runs[0]
    figs = []
    if first.elections:
        from lckd_kit.election import ElectionResult

        e = ElectionResult.from_record(first.elections[-1])
        figs.append(("election.png", viz.score_table_figure(
            e.scores, e.winners, title=f"Final election ({A} seed {first.seed}, step {e.step}, {e.n_cases} "
                                       f"validation case(s))"), "Final teacher election (4×3 Dice)"))
    if first.history:
        figs.append(("teacher_timeline.png", viz.plot_teacher_timeline(first.history), f"Teacher timeline ({A})"))
        if s.baseline and s.baseline[0].history:
            figs.append(("loss_curves.png", viz.compare_histories(first.history, s.baseline[0].history, s.labels),
                         f"Training curves, seed {first.seed}"))
    if figs:
        rep.add("h2", "Teacher election and training")
        rep.figures(*figs)

    if s.example_case is not None:
        rep.add("h2", "Example: one held-out case, with and without T1ce")
        figs = _example_figures(first, s.example_case, "lckd")
        if s.baseline:
            figs += _example_figures(s.baseline[0], s.example_case, "nokd")
        rep.figures(*figs)
    return rep.write()


__all__ = ["RunSummary", "ExperimentSummary", "what_the_numbers_show", "Report", "write_report", "NO_T1CE"]
