"""The experiment the kit exists for: LCKD against the same network trained without distillation.

    run_experiment()              per seed: train LCKD and the no-KD baseline (same seed, same
                                  schedule, same batches), evaluate both on held-out phantoms over
                                  the 15 modality subsets, write report.md + report.html
                                  (``lckd-kit experiment``, ``make demo``)
    run_experiment(quick=True)    no training: evaluate the shipped checkpoint, shorter report
    train_shipped_checkpoint()    the one function that makes checkpoints/lckd_small_phantom.pt
    workshop_prep()               cache what the notebooks need (a generator of progress lines)

Data. Training + validation cases are ``phantom.ensure_phantoms(24, seed=0)`` -- the set the
notebooks use -- split by ``train.split_cases``. The held-out test cases are another phantom set,
``PhantomTest_000...`` made with seed 1000; every case seed is an independent SeedSequence
stream, and :func:`heldout_phantoms` checks that no test seed occurs in the training set.

Time budget. ``make demo`` (defaults, 2 CPU cores) = phantom generation + two trainings of the
full small2d schedule (300 + 300 steps) + two 15-subset evaluations of :data:`DEMO_N_TEST` held-out
cases, HD95 off: 4.8 minutes on 2 idle cores (measured), within the 10-minute budget. The report's
setup section records the wall and CPU time of every phase.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import html
import json
import os
import platform
import re
import time
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from lckd_kit import ALL_PRESENT, MODALITIES, REGIONS, SUBSETS
from lckd_kit.evaluate import EvalResult, evaluate, nest_regions, predict_subsets

_REPO_ROOT = Path(__file__).resolve().parent.parent

#: training + validation phantoms of the demo, the shipped checkpoint and the notebooks
TRAIN_SEED, DEMO_N_CASES = 0, 24
#: held-out test phantoms: another seed, another name prefix (never seen in training)
TEST_SEED, DEMO_N_TEST, TEST_PREFIX = 1000, 6, "PhantomTest"
#: the grid of all demo phantoms: 96^3 voxels of 2 mm
DEMO_GRID = 96
#: the trained model shipped with the kit (made by :func:`train_shipped_checkpoint`)
SHIPPED_CHECKPOINT = _REPO_ROOT / "checkpoints" / "lckd_small_phantom.pt"
#: the shipped checkpoint's schedule: small2d trained 5x longer than the demo (1500 + 1500 steps, 6.3
#: minutes on 2 idle cores), to all-modality held-out Dice ET/TC/WT 0.78/0.88/0.90 (checkpoints/README.md)
SHIPPED_TRAIN_OVERRIDES = dict(stage1_steps=1500, stage2_steps=1500, elect_every=500)
#: the subset used for the "missing T1ce" example slices: FLAIR + T1 + T2
NO_T1CE = (True, True, False, True)

_MAKE_CHECKPOINT_HINT = ("make it with `python -c \"from lckd_kit.experiment import train_shipped_checkpoint; "
                         "train_shipped_checkpoint()\"` (10-20 minutes on a 2-core CPU), or run the full experiment "
                         "without --quick")


# --------------------------------------------------------------------------------------------
# data


def heldout_phantoms(n: int = DEMO_N_TEST, seed: int = TEST_SEED, grid: int = DEMO_GRID,
                     cache_dir: str | os.PathLike | None = None, progress: bool = True,
                     train_dir: str | os.PathLike | None = None) -> Path:
    """Folder of ``n`` held-out test phantoms ``PhantomTest_000...`` (generated once, cached).

    With ``train_dir`` (a folder made by ``phantom.generate`` / ``ensure_phantoms``), raises
    ``RuntimeError`` if any case seed occurs in both sets.
    """
    from lckd_kit import phantom

    root = Path(cache_dir) if cache_dir is not None else phantom.default_cache_dir()
    folder = root / f"heldout_v{phantom.GENERATOR_VERSION}_g{grid}_standard_s{seed}_n{n}"
    phantom.generate(folder, n, seed=seed, grid=grid, prefix=TEST_PREFIX, progress=progress)
    if train_dir is not None:
        shared = _case_seeds(folder) & _case_seeds(Path(train_dir))
        if shared:
            raise RuntimeError(f"test and training phantoms share case seeds {sorted(shared)}: choose another seed")
    return folder


def _case_seeds(folder: Path) -> set[int]:
    from lckd_kit.phantom import MANIFEST

    manifest = json.loads((folder / MANIFEST).read_text())
    return {int(c["seed"]) for c in manifest["cases"].values()}


def load_eval_cases(folder: str | os.PathLike) -> list[dict]:
    """Labelled cases of ``folder``, loaded and z-scored (what :func:`evaluate.evaluate` expects)."""
    from lckd_kit.data import find_cases, load_case, normalize_image

    out = []
    for case in find_cases(folder):
        if case.labelled:
            d = load_case(case)
            d["image"] = normalize_image(d["image"])
            out.append(d)
    if not out:
        raise FileNotFoundError(f"no labelled cases under {folder}")
    return out


# --------------------------------------------------------------------------------------------
# numbers -> words


def _subset_indices(pred) -> list[int]:
    return [i for i, m in enumerate(SUBSETS) if pred(m)]


#: subset groups of the summary: (description, subset indices)
GROUPS: dict[str, tuple[str, list[int]]] = {
    "all": ("all 15 subsets", list(range(len(SUBSETS)))),
    "no_t1ce": ("the 7 subsets without T1ce", _subset_indices(lambda m: not m[2])),
    "no_flair": ("the 7 subsets without FLAIR", _subset_indices(lambda m: not m[0])),
    "full": ("all four modalities", [SUBSETS.index(ALL_PRESENT)]),
}


def group_stats(a: np.ndarray, b: np.ndarray | None, group: str, regions: Sequence[str] = REGIONS) -> dict:
    """Mean Dice of a subset group, and the a - b difference with its uncertainty.

    Args:
        a, b: per-case Dice ``(n_seeds, n_cases, 15, 3)`` of two models (b may be None).
        group: a :data:`GROUPS` key; regions: which regions to average.

    Returns:
        ``{"a", "b", "diff"}`` (means over seeds, cases, the group's subsets and regions),
        ``"seed_diffs"`` (one difference per seed), ``"seed_sd"`` (their std, NaN with one seed),
        ``"case_se"`` (standard error of the paired per-case difference, seeds averaged first).
    """
    idx = GROUPS[group][1]
    r = [REGIONS.index(x) for x in regions]

    def per_case(v):  # (S, C): each case's mean over the group's subsets and the regions
        with _quiet():
            return np.nanmean(v[:, :, idx][..., r], axis=(2, 3))

    pa = per_case(a)
    out = {"a": float(np.nanmean(pa)), "b": None, "diff": None, "seed_diffs": [], "seed_sd": float("nan"),
           "case_se": float("nan")}
    if b is None:
        return out
    pb = per_case(b)
    seed_diffs = np.nanmean(pa, axis=1) - np.nanmean(pb, axis=1)
    case_diffs = np.nanmean(pa - pb, axis=0)
    out.update(b=float(np.nanmean(pb)), diff=float(np.mean(seed_diffs)), seed_diffs=[float(d) for d in seed_diffs],
               seed_sd=float(np.std(seed_diffs, ddof=1)) if len(seed_diffs) > 1 else float("nan"),
               case_se=float(np.std(case_diffs, ddof=1) / np.sqrt(len(case_diffs))) if len(case_diffs) > 1
               else float("nan"))
    return out


@contextlib.contextmanager
def _quiet():
    """Silence numpy's mean-of-empty / all-NaN RuntimeWarnings inside a block."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _num(x: float, signed: bool = False) -> str:
    """3 decimals, or 2 significant digits for tiny values (a standard error of 0.0004 is not 0.000)."""
    if x != 0 and abs(x) < 0.005:
        return f"{x:+.1e}" if signed else f"{x:.1e}"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def _verdict(s: dict, what: str, n_cases: int) -> str:
    """One sentence: is the difference larger than its noise?"""
    d = s["diff"]
    if len(s["seed_diffs"]) > 1:
        diffs = ", ".join(_num(v, True) for v in s["seed_diffs"])
        same_sign = all(v > 0 for v in s["seed_diffs"]) or all(v < 0 for v in s["seed_diffs"])
        beyond = same_sign and abs(d) > s["seed_sd"]
        return (f"Across {len(s['seed_diffs'])} seeds the {what} difference is {diffs} (mean {_num(d, True)}, "
                f"std {_num(s['seed_sd'])}): " + ("the same sign for every seed and larger than the seed-to-seed "
                                                  "spread." if beyond else "within the seed-to-seed spread, so "
                                                  "not evidence of a difference."))
    se = s["case_se"]
    if not np.isfinite(se):
        return f"One seed and one test case: no estimate of the noise on the {what} difference."
    beyond = abs(d) > 2 * se
    return (f"With one seed the seed-to-seed spread is unknown (run `--seeds 0 1 2`); paired over the {n_cases} "
            f"held-out cases, the {what} difference {_num(d, True)} has a standard error of {_num(se)}, i.e. it is "
            + ("more than two standard errors from zero." if beyond else
               "within two standard errors of zero -- not evidence of a difference."))


def _best_single(table: np.ndarray) -> dict[str, str]:
    """Best single modality per region from a (15, 3) table (rows 0-3 are the singles)."""
    from lckd_kit.viz import DISPLAY_NAMES

    return {r: DISPLAY_NAMES[MODALITIES[int(np.nanargmax(table[:4, i]))]] if np.isfinite(table[:4, i]).any()
            else "?" for i, r in enumerate(REGIONS)}


def what_the_numbers_show(lckd: np.ndarray, base: np.ndarray | None = None,
                          elections: Sequence[dict] = (), labels: Sequence[str] = ("LCKD", "no-KD")) -> list[str]:
    """The report's "What the numbers show" paragraph, as sentences GENERATED from the scores.

    Args:
        lckd, base: per-case Dice ``(n_seeds, n_cases, 15, 3)`` of the two models (base None: a
            single-model report).
        elections: final election records (``ElectionResult.to_record()``), one per seed.
        labels: display names of the two models.

    Returns:
        A list of sentences (each a bullet of the report); nothing in them is fixed in advance.
    """
    from lckd_kit.viz import DISPLAY_NAMES

    A, B = labels
    out = []
    full_a = group_stats(lckd, base, "full")
    all_s = group_stats(lckd, base, "all")
    no_t1ce = group_stats(lckd, base, "no_t1ce", ("ET", "TC"))
    full_core = group_stats(lckd, base, "full", ("ET", "TC"))
    no_flair = group_stats(lckd, base, "no_flair", ("WT",))
    full_wt = group_stats(lckd, base, "full", ("WT",))
    with _quiet():
        mean_a = np.nanmean(lckd, axis=(0, 1))
    best = _best_single(mean_a)
    if base is None:
        out.append(f"Averaged over all 15 subsets and the three regions the model reaches Dice {all_s['a']:.3f}; "
                   f"with all four modalities {full_a['a']:.3f}.")
        out.append(f"Without T1ce ({GROUPS['no_t1ce'][0][4:]}) the tumour core regions (ET, TC) score "
                   f"{no_t1ce['a']:.3f}, against {full_core['a']:.3f} with every modality "
                   f"(a drop of {full_core['a'] - no_t1ce['a']:.3f}).")
        out.append(f"Without FLAIR the whole tumour (WT) scores {no_flair['a']:.3f}, against {full_wt['a']:.3f} "
                   f"with every modality.")
    else:
        out.append(f"Averaged over all 15 subsets and the three regions, {A} reaches Dice {all_s['a']:.3f} and "
                   f"{B} {all_s['b']:.3f} (difference {_num(all_s['diff'], True)}); with all four modalities "
                   f"{full_a['a']:.3f} vs {full_a['b']:.3f}.")
        out.append(f"Without T1ce ({GROUPS['no_t1ce'][0][4:]}), ET and TC score {no_t1ce['a']:.3f} ({A}) vs "
                   f"{no_t1ce['b']:.3f} ({B}), difference {_num(no_t1ce['diff'], True)}. Losing T1ce costs {A} "
                   f"{full_core['a'] - no_t1ce['a']:.3f} and {B} {full_core['b'] - no_t1ce['b']:.3f} of core Dice.")
        out.append(f"Without FLAIR ({GROUPS['no_flair'][0][4:]}), WT scores {no_flair['a']:.3f} ({A}) vs "
                   f"{no_flair['b']:.3f} ({B}), difference {_num(no_flair['diff'], True)}.")
        out.append(_verdict(all_s, "all-subset", lckd.shape[1]))
        out.append(_verdict(no_t1ce, "missing-T1ce core", lckd.shape[1]))
    out.append("Best single modality on the held-out cases (" + A + "): " +
               ", ".join(f"{r} {m}" for r, m in best.items()) + ".")
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
# the report: a list of blocks rendered twice (markdown with PNG files, self-contained HTML)


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

    def h2(self, text):
        self.blocks.append(("h2", text))

    def h3(self, text):
        self.blocks.append(("h3", text))

    def p(self, text):
        self.blocks.append(("p", text))

    def bullets(self, items):
        self.blocks.append(("ul", list(items)))

    def table(self, md):
        self.blocks.append(("table", md))

    def code(self, text):
        self.blocks.append(("code", text))

    def insert_first(self, *blocks):
        """Put ``(kind, content)`` blocks at the top (e.g. a setup section written last)."""
        self.blocks[:0] = list(blocks)

    def figures(self, *named):
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
# pieces shared by the full and the quick experiment


def machine_info(device: torch.device) -> str:
    """One line: CPU model, cores, torch threads, versions, device, load average."""
    import monai

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, MONAI {monai.__version__}, Python {platform.python_version()}, device {device}{gpu}{load}")


def _device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _eval_roi(train_config) -> tuple[int, int, int]:
    """The sliding window of a trained model: the one its training validated with."""
    from lckd_kit.train import _model_config, infer_roi_size

    return infer_roi_size(train_config, _model_config(train_config).spatial_dims)


def _example_case(cases: list[dict]) -> dict:
    """The test case with the most enhancing tumour (the most to look at)."""
    return max(cases, key=lambda c: (int(np.asarray(c["label"])[0].sum()), int(np.asarray(c["label"])[2].sum())))


def _example_figures(model, case, roi, device, label: str, tag: str) -> list:
    """compare_prediction figures of one case under all modalities and without T1ce."""
    from lckd_kit import viz

    prob = predict_subsets(model, case["image"], [ALL_PRESENT, NO_T1CE], roi_size=roi, device=device,
                           crop_foreground=True)
    pred = nest_regions(prob > 0.5).numpy()
    truth = np.asarray(case["label"])
    index = viz.best_slice(truth, "axial")
    out = []
    for p, mask, key in zip(pred, (ALL_PRESENT, NO_T1CE), ("all", "no_t1ce")):
        seen = "given to the model" if mask[2] else "NOT given to the model"
        title = f"{label}, {viz.pretty_subset(mask)} — {case['name']} (T1ce shown, {seen})"
        fig = viz.compare_prediction(case["image"], truth, p, index=index, modality="t1ce", title=title,
                                     spacing=case.get("spacing"))
        out.append((f"example_{tag}_{key}.png", fig, title))
    return out


def _per_case_dice(results: Sequence[EvalResult]) -> np.ndarray:
    """(n_seeds, n_cases, 15, 3)"""
    return np.stack([r.per_case("dice") for r in results])


def _seed_tables(results: Sequence[EvalResult], metric: str = "dice") -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over seeds of the (15, 3) tables (std NaN with one seed)."""
    t = np.stack([r.table(metric) for r in results])
    sd = t.std(axis=0, ddof=1) if len(t) > 1 else np.full(t.shape[1:], np.nan)
    return t.mean(axis=0), sd


def _fmt_s(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


# --------------------------------------------------------------------------------------------
# the experiment


def run_experiment(
    out_dir: str | os.PathLike = "outputs/demo",
    config="small2d",
    seeds: Sequence[int] | int = (0,),
    n_cases: int | None = None,
    n_test: int | None = None,
    quick: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    grid: int = DEMO_GRID,
    train_overrides: dict | None = None,
    checkpoint: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    hd95: bool = False,
) -> Path:
    """LCKD vs the no-KD baseline on phantoms, written up as a report.

    Args:
        out_dir: report folder: ``report.md``, ``report.html`` (self-contained), ``figures/``,
            ``runs/{lckd,nokd}_seed<s>/`` (training run folders, each with ``eval/``).
        config: a ``train.TRAIN_CONFIGS`` name or a ``TrainConfig``; ``train_overrides`` changes
            fields of it (e.g. ``{"stage1_steps": 100}`` on a slow laptop; small2d's own 300 + 300
            steps fit the 10-minute demo budget on 2 cores). The seed is set per run.
        seeds: one run pair per seed; with several, tables show mean and std across seeds.
        n_cases: training + validation phantoms (default 24, the notebooks' set).
        n_test: held-out test phantoms (default :data:`DEMO_N_TEST`).
        quick: train nothing -- evaluate ``checkpoint`` (default the shipped
            ``checkpoints/lckd_small_phantom.pt``) and write a shorter, single-model report.
            Raises ``FileNotFoundError`` (saying how to make it) if the checkpoint is missing.
        device: default CUDA if available, else CPU. grid: phantom grid (96 = 2 mm; 32 for tests).
        progress: progress bars and a line per phase.
        cache_dir: where phantoms are cached (default ``phantom.default_cache_dir()``).
        hd95: also compute HD95 (off by default: on a CPU it can double the evaluation time;
            ``lckd-kit evaluate`` reports it).

    Returns:
        Path of ``report.md`` (``report.html`` is next to it).
    """
    from lckd_kit.phantom import ensure_phantoms
    from lckd_kit.train import get_train_config, train

    t_start, cpu_start = time.perf_counter(), time.process_time()
    say = print if progress else (lambda *a, **k: None)
    device = _device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(seeds)] if isinstance(seeds, int) else [int(s) for s in seeds]
    n_cases = DEMO_N_CASES if n_cases is None else int(n_cases)
    n_test = DEMO_N_TEST if n_test is None else int(n_test)
    machine = machine_info(device)
    phases: dict[str, float] = {}

    t = time.perf_counter()
    train_dir = ensure_phantoms(n_cases, seed=TRAIN_SEED, grid=grid, cache_dir=cache_dir, progress=progress)
    test_dir = heldout_phantoms(n_test, seed=TEST_SEED, grid=grid, cache_dir=cache_dir, progress=progress,
                                train_dir=train_dir)
    test_cases = load_eval_cases(test_dir)
    phases["phantoms"] = time.perf_counter() - t
    say(f"[experiment] phantoms ready: {n_cases} training+validation cases in {train_dir}, {len(test_cases)} "
        f"held-out cases in {test_dir} ({_fmt_s(phases['phantoms'])})")
    data = dict(train_dir=train_dir, test_dir=test_dir, test_cases=test_cases, n_cases=n_cases, grid=grid,
                hd95=hd95)

    if quick:
        data["cpu_start"] = cpu_start
        return _quick_report(out, checkpoint or SHIPPED_CHECKPOINT, data, device, machine, phases, t_start, say,
                             progress)

    base_cfg = get_train_config(config, **(train_overrides or {}))
    runs = []
    for seed in seeds:
        run = {"seed": seed}
        for kind, no_kd, label in (("lckd", False, "LCKD"), ("nokd", True, "no-KD")):
            cfg = dataclasses.replace(base_cfg, seed=seed, no_kd=no_kd)
            run_dir = out / "runs" / f"{kind}_seed{seed}"
            say(f"[experiment] training {label}, seed {seed}: {cfg.total_steps} steps -> {run_dir}")
            t = time.perf_counter()
            result = train(cfg, train_dir, out_dir=run_dir, device=device, progress=progress)
            phases[f"train {label} seed {seed}"] = time.perf_counter() - t
            t = time.perf_counter()
            ev = evaluate(result.model, test_cases, roi_size=_eval_roi(result.config), device=device,
                          crop_foreground=True, progress=progress, hd95=hd95)
            ev.meta.update(run=str(run_dir), seed=seed, kd=not no_kd, label=label)
            ev.save(run_dir / "eval", title=f"{label}, seed {seed}: {len(test_cases)} held-out cases")
            phases[f"evaluate {label} seed {seed}"] = time.perf_counter() - t
            say(f"[experiment] {label} seed {seed}: mean Dice over 15 subsets "
                f"{np.nanmean(ev.dice_table()):.3f} (train {_fmt_s(phases[f'train {label} seed {seed}'])}, "
                f"evaluate {_fmt_s(phases[f'evaluate {label} seed {seed}'])})")
            run[kind], run[f"{kind}_eval"] = result, ev
        runs.append(run)

    t = time.perf_counter()
    data["cpu_start"] = cpu_start
    command = _rerun_command(out, config, seeds, n_cases, n_test, grid, train_overrides)
    report = _full_report(out, runs, base_cfg, data, device, machine, phases, t_start, command)
    say(f"[experiment] report: {report} and {report.with_suffix('.html')} "
        f"(total {_fmt_s(time.perf_counter() - t_start)})")
    return report


def _setup_bullets(cfg, data: dict, machine: str, phases: dict, total: float, extra: Sequence[str] = (),
                   baseline: bool = True) -> list[str]:
    from lckd_kit.model import build_model, parameter_count
    from lckd_kit.train import _model_config

    mcfg = _model_config(cfg)
    spacing = 192.0 / data["grid"]
    lines = [
        f"Training config `{cfg.model if isinstance(cfg.model, str) else mcfg.name}` model "
        f"({parameter_count(build_model(mcfg)):,} parameters, {mcfg.spatial_dims}-D), "
        f"{cfg.stage1_steps} steps with all modalities + {cfg.stage2_steps} steps with random missing "
        f"modalities, batch {cfg.batch_size}, crop {tuple(cfg.roi_size) if cfg.roi_size else mcfg.roi_size}, "
        f"{cfg.optimizer} lr {cfg.lr:g}, KD weight {cfg.kd_weight:g}{' (LCKD) / 0 (no-KD)' if baseline else ''}, "
        f"election every "
        f"{cfg.elect_every} steps on at most {cfg.elect_max_cases or 'all'} validation case(s).",
        f"Data: {data['n_cases']} phantom cases (seed {TRAIN_SEED}) split into training and validation, "
        f"{len(data['test_cases'])} held-out test phantoms (seed {TEST_SEED}, names `{TEST_PREFIX}_*`), "
        f"{data['grid']}³ voxels of {spacing:g} mm.",
        "Evaluation: sliding window over each held-out volume (its brain bounding box), probabilities "
        "averaged, threshold 0.5, regions nested (ET ⊂ TC ⊂ WT), Dice per case and region averaged over cases"
        + (", HD95 (MONAI, mm)" if data.get("hd95") else " (HD95 off: `hd95=True` adds it)")
        + "; empty-region convention `brats2018`; all 15 subsets decoded from one encoding per window.",
        f"Machine: {machine}.",
        f"Wall time: {_fmt_s(total)} in all — " + ", ".join(f"{k} {_fmt_s(v)}" for k, v in phases.items())
        + (f". CPU time of this process: {_fmt_s(time.process_time() - data['cpu_start'])} (CPU time / wall time "
           f"≈ {(time.process_time() - data['cpu_start']) / max(total, 1e-9):.1f} of {torch.get_num_threads()} "
           "threads: much less means other processes took the CPUs)" if "cpu_start" in data else "") + ".",
    ]
    return lines + list(extra)


def _rerun_command(out: Path, config, seeds, n_cases, n_test, grid, train_overrides) -> str:
    """What reruns this experiment: the CLI line when its options cover the call, else a Python call."""
    if isinstance(config, str) and not train_overrides and n_test == DEMO_N_TEST and grid == DEMO_GRID:
        return ("lckd-kit experiment --out " + out.as_posix()
                + (" --seeds " + " ".join(map(str, seeds)) if seeds != [0] else "")
                + (f" --config {config}" if config != "small2d" else "")
                + (f" --n-cases {n_cases}" if n_cases != DEMO_N_CASES else ""))
    if not isinstance(config, str):
        return "run_experiment(...) with a custom TrainConfig: its fields are in runs/*/config.json"
    kwargs = dict(config=config, seeds=tuple(seeds), n_cases=n_cases, n_test=n_test, grid=grid,
                  train_overrides=dict(train_overrides or {}))
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f'python -c "from lckd_kit.experiment import run_experiment; run_experiment({out.as_posix()!r}, {args})"'


def _full_report(out: Path, runs: list[dict], cfg, data: dict, device, machine: str, phases: dict,
                 t_start: float, command: str) -> Path:
    from lckd_kit import viz
    from lckd_kit.viz import markdown_subset_table

    seeds = [r["seed"] for r in runs]
    lckd_evals = [r["lckd_eval"] for r in runs]
    base_evals = [r["nokd_eval"] for r in runs]
    l_mean, l_sd = _seed_tables(lckd_evals)
    b_mean, b_sd = _seed_tables(base_evals)
    l_hd = _seed_tables(lckd_evals, "hd95")[0] if data["hd95"] else None
    b_hd = _seed_tables(base_evals, "hd95")[0] if data["hd95"] else None
    first = runs[0]
    elections = [r["lckd"].elections[-1].to_record() for r in runs if r["lckd"].elections]

    t = time.perf_counter()
    rep = Report("LCKD vs no-KD on phantoms: Dice for every set of available MRI modalities", out)
    n_seeds = len(seeds)
    seed_note = f"seed {seeds[0]}" if n_seeds == 1 else f"mean over seeds {', '.join(map(str, seeds))}"

    rep.h2("What the numbers show")
    rep.bullets(what_the_numbers_show(_per_case_dice(lckd_evals), _per_case_dice(base_evals), elections))
    rep.p("These are synthetic phantoms and a short CPU schedule: the numbers check the pipeline and show the "
          "mechanism at work; they are not a reproduction of the paper's BraTS 2018 results.")

    rep.h2("Dice on the held-out cases, 15 modality subsets")
    rep.figures(
        ("heatmap_lckd.png", viz.subset_heatmap(l_mean, title=f"LCKD ({seed_note})", show_mean=True), "LCKD"),
        ("heatmap_nokd.png", viz.subset_heatmap(b_mean, title=f"no-KD baseline ({seed_note})", show_mean=True),
         "no-KD baseline"),
        ("heatmap_diff.png", viz.subset_heatmap(l_mean - b_mean, title="LCKD − no-KD", diff=True, show_mean=True),
         "Difference LCKD − no-KD (red: baseline better, blue: LCKD better)"))
    for label, mean, sd, hd in (("LCKD", l_mean, l_sd, l_hd), ("no-KD baseline", b_mean, b_sd, b_hd)):
        rep.h3(f"{label} — Dice ({seed_note})" + (" and HD95 in mm" if hd is not None else ""))
        rep.table(markdown_subset_table(mean, hd))
        if n_seeds > 1:
            rep.h3(f"{label} — standard deviation of Dice across {n_seeds} seeds")
            rep.table(markdown_subset_table(sd))
    rep.h3("Difference LCKD − no-KD (Dice)")
    rep.table(markdown_subset_table(l_mean - b_mean))

    rep.h2("Teacher election and training")
    figs = []
    if first["lckd"].elections:
        e = first["lckd"].elections[-1]
        figs.append(("election.png", viz.score_table_figure(
            e.scores, e.winners, title=f"Final election (LCKD seed {seeds[0]}, step {e.step}, "
                                       f"{e.n_cases} validation case(s))"), "Final teacher election (4×3 Dice)"))
    figs.append(("teacher_timeline.png", viz.plot_teacher_timeline(first["lckd"].history), "Teacher timeline (LCKD)"))
    figs.append(("loss_curves.png", viz.compare_histories(first["lckd"].history, first["nokd"].history),
                 f"Training curves, seed {seeds[0]}"))
    rep.figures(*figs)

    rep.h2("Example: one held-out case, with and without T1ce")
    case = _example_case(data["test_cases"])
    figs = []
    for kind, label in (("lckd", "LCKD"), ("nokd", "no-KD")):
        res = first[kind]
        figs += _example_figures(res.model, case, _eval_roi(res.config), device, label, kind)
    rep.figures(*figs)
    phases["report"] = time.perf_counter() - t

    # the setup goes first, written last: it reports the wall time of everything above
    rep.insert_first(
        ("h2", "Setup"),
        ("ul", _setup_bullets(cfg, data, machine, phases, time.perf_counter() - t_start, [
            f"Seeds: {', '.join(map(str, seeds))}; LCKD and no-KD share seed, schedule, batches and subsets.",
            f"Run folders (config.json, history.jsonl, checkpoints, eval/): `{(out / 'runs').as_posix()}`.",
        ])),
        ("code", command))
    return rep.write()


def _quick_report(out: Path, checkpoint, data: dict, device, machine: str, phases: dict, t_start: float, say,
                  progress: bool) -> Path:
    from lckd_kit import viz
    from lckd_kit.election import ElectionResult
    from lckd_kit.train import load_model, train_config_from_dict

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"no shipped checkpoint at {path}: {_MAKE_CHECKPOINT_HINT}")
    model, ckpt = load_model(path, device)
    cfg = train_config_from_dict(ckpt["config"])
    t = time.perf_counter()
    ev = evaluate(model, data["test_cases"], roi_size=_eval_roi(cfg), device=device, crop_foreground=True,
                  progress=progress, hd95=data["hd95"])
    ev.meta.update(checkpoint=str(path))
    ev.save(out / "eval", title=f"{path.name}: {len(data['test_cases'])} held-out cases")
    phases["evaluate"] = time.perf_counter() - t
    say(f"[experiment] {path.name}: mean Dice over 15 subsets {np.nanmean(ev.dice_table()):.3f}")

    t = time.perf_counter()
    elections = [ElectionResult.from_record(r) for r in ckpt.get("elections", [])]
    history = ckpt.get("history", [])
    rep = Report("LCKD (shipped checkpoint) on phantoms: Dice for every set of available MRI modalities", out)
    rep.h2("What the numbers show")
    rep.bullets(what_the_numbers_show(_per_case_dice([ev]), None, [e.to_record() for e in elections[-1:]]))
    rep.h2("Dice on the held-out cases, 15 modality subsets")
    rep.figures(("heatmap_lckd.png", ev.heatmap(title=f"LCKD ({path.name})"), "LCKD"))
    rep.table(viz.markdown_subset_table(ev.dice_table(), ev.hd95_table() if data["hd95"] else None))
    figs = []
    if elections:
        e = elections[-1]
        figs.append(("election.png", viz.score_table_figure(e.scores, e.winners, title=f"Final election (step "
                                                                                    f"{e.step})"),
                     "Final teacher election (4×3 Dice)"))
    if history:
        figs.append(("teacher_timeline.png", viz.plot_teacher_timeline(history), "Teacher timeline"))
    if figs:
        rep.h2("Teacher election")
        rep.figures(*figs)
    rep.h2("Example: one held-out case, with and without T1ce")
    rep.figures(*_example_figures(model, _example_case(data["test_cases"]), _eval_roi(cfg), device, "LCKD", "lckd"))
    phases["report"] = time.perf_counter() - t
    made = ckpt.get("made_by", {})
    data = {**data, "n_cases": made.get("data", {}).get("n_cases", "?")}  # what the checkpoint was trained on
    rep.insert_first(
        ("p", f"Quick mode: no training. `{path}` is evaluated on held-out phantoms; there is no no-KD baseline "
              f"here — run `lckd-kit experiment` without `--quick` for the comparison."),
        ("h2", "Setup"),
        ("ul", _setup_bullets(cfg, data, machine, phases, time.perf_counter() - t_start, [
            f"Checkpoint: `{path}`" + (f", made by `{made.get('command')}` in {_fmt_s(made['wall_time_s'])}"
                                       if made.get("wall_time_s") else "") + "."], baseline=False)))
    report = rep.write()
    say(f"[experiment] report: {report} and {report.with_suffix('.html')}")
    return report


# --------------------------------------------------------------------------------------------
# the shipped checkpoint


def _call_string(**kwargs) -> str:
    defaults = dict(out=str(SHIPPED_CHECKPOINT.relative_to(_REPO_ROOT)), seed=0, config="small2d",
                    n_cases=DEMO_N_CASES, n_test=DEMO_N_TEST, grid=DEMO_GRID, train_overrides=SHIPPED_TRAIN_OVERRIDES)
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k in defaults and v != defaults[k])
    return f'python -c "from lckd_kit.experiment import train_shipped_checkpoint; train_shipped_checkpoint({args})"'


def train_shipped_checkpoint(
    out: str | os.PathLike = SHIPPED_CHECKPOINT,
    seed: int = 0,
    config="small2d",
    n_cases: int = DEMO_N_CASES,
    n_test: int = DEMO_N_TEST,
    grid: int = DEMO_GRID,
    device: torch.device | str | None = None,
    progress: bool = True,
    train_overrides: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Train the weights shipped as ``checkpoints/lckd_small_phantom.pt`` -- from a fixed seed.

    ``config`` LCKD (default small2d with :data:`SHIPPED_TRAIN_OVERRIDES` when ``train_overrides`` is
    None) on ``ensure_phantoms(n_cases, seed=0)``; the slim checkpoint
    holds the model state_dict, the train + model config, teachers, elections and the training
    history (no optimizer), loads with ``train.load_model`` (``weights_only=True``) and is written
    atomically. Then it is evaluated on the held-out phantoms: ``<stem>_eval.json`` and
    ``README.md`` (command, wall time, machine, 15-subset table) are written next to it.

    Returns the checkpoint path.
    """
    from lckd_kit.model import config_to_dict
    from lckd_kit.phantom import ensure_phantoms
    from lckd_kit.train import (CHECKPOINT_FORMAT, _atomic_save, _model_config, get_train_config, train,
                                train_config_to_dict)
    from lckd_kit.viz import markdown_subset_table

    t0 = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = _device(device)
    if train_overrides is None and config == "small2d":
        train_overrides = SHIPPED_TRAIN_OVERRIDES
    cfg = get_train_config(config, **{**(train_overrides or {}), "seed": seed, "no_kd": False})
    train_dir = ensure_phantoms(n_cases, seed=TRAIN_SEED, grid=grid, cache_dir=cache_dir, progress=progress)
    result = train(cfg, train_dir, out_dir=None, device=device, progress=progress)
    train_s = time.perf_counter() - t0
    command = _call_string(out=str(out.resolve().relative_to(_REPO_ROOT)) if out.resolve().is_relative_to(_REPO_ROOT)
                           else str(out), seed=seed, config=config if isinstance(config, str) else "custom",
                           n_cases=n_cases, n_test=n_test, grid=grid, train_overrides=train_overrides)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()},
        "step": result.step,
        "config": {**train_config_to_dict(result.config), "model_config": config_to_dict(_model_config(result.config))},
        "teachers": list(result.teachers),
        "elections": [e.to_record() for e in result.elections],
        "split": result.split,
        "history": result.history,
        "made_by": {"command": command, "function": "lckd_kit.experiment.train_shipped_checkpoint",
                    "seed": seed, "data": {"n_cases": n_cases, "seed": TRAIN_SEED, "grid": grid},
                    "wall_time_s": round(train_s, 1), "torch": str(torch.__version__),
                    "date": time.strftime("%Y-%m-%d")},
    }
    _atomic_save(ckpt, out)

    test_dir = heldout_phantoms(n_test, grid=grid, cache_dir=cache_dir, progress=progress, train_dir=train_dir)
    ev = evaluate(result.model, load_eval_cases(test_dir), roi_size=_eval_roi(result.config), device=device,
                  crop_foreground=True, progress=progress)
    ev.meta.update(checkpoint=out.name)
    ev.to_json(out.with_name(out.stem + "_eval.json"))
    total = time.perf_counter() - t0
    dice = ev.dice_table()
    full = dice[SUBSETS.index(ALL_PRESENT)]
    teachers = ", ".join(m for m, on in zip(MODALITIES, result.teachers) if on)
    name = config if isinstance(config, str) else "custom"
    readme = "\n".join([
        "# Shipped checkpoint", "",
        f"`{out.name}` ({out.stat().st_size / 1e6:.1f} MB): LCKD, train config `{name}`, "
        f"seed {seed}, {result.step} steps on {n_cases} phantom cases (seed {TRAIN_SEED}, {grid}³). "
        f"Final teachers: {teachers}. A slim checkpoint (weights, configs, elections, history; no optimizer): "
        "load it with `lckd_kit.train.load_model(path)`.", "",
        "Made by:", "", "```", command, "```", "",
        f"Wall time: training {_fmt_s(train_s)}, with the evaluation {_fmt_s(total)}, on "
        f"{machine_info(device)}.", "",
        f"All four modalities, mean Dice on {len(ev.cases)} held-out phantoms (seed {TEST_SEED}): "
        + ", ".join(f"{r} {v:.3f}" for r, v in zip(REGIONS, full)) + ".", "",
        markdown_subset_table(dice, ev.hd95_table(), title="Dice (and HD95, mm) for every subset of modalities"), "",
        f"Per-case scores: `{out.stem}_eval.json`. Synthetic phantoms, not patients; not for clinical use.", ""])
    (out.parent / "README.md").write_text(readme)
    if progress:
        print(f"[shipped checkpoint] {out} ({_fmt_s(total)}); all-modality Dice "
              + ", ".join(f"{r} {v:.3f}" for r, v in zip(REGIONS, full)))
    return out


# --------------------------------------------------------------------------------------------
# workshop preparation


def workshop_prep(checkpoint: str | os.PathLike | None = None,
                  cache_dir: str | os.PathLike | None = None) -> Iterator[str]:
    """Cache everything the notebooks need so a workshop runs offline; yields one line per step.

    Generates the notebooks' phantoms (``ensure_phantoms(24, seed=0)``) and the held-out test set,
    loads the tissue prior, checks the bundled demo cases and that the shipped checkpoint loads.
    """
    from lckd_kit import phantom
    from lckd_kit.data import find_cases

    t0 = time.perf_counter()
    yield "lckd-kit workshop-prep: caching what the notebooks need"
    prior = phantom.load_prior(DEMO_GRID)
    yield f"  tissue prior: {prior.probs.shape[1:]} voxels ok"
    demo = find_cases(phantom.data_samples_dir())
    yield f"  bundled demo cases: {len(demo)} in {phantom.data_samples_dir()}"
    root = phantom.ensure_phantoms(DEMO_N_CASES, seed=TRAIN_SEED, grid=DEMO_GRID, cache_dir=cache_dir, progress=False)
    yield f"  training phantoms: {DEMO_N_CASES} cases in {root}"
    test = heldout_phantoms(DEMO_N_TEST, grid=DEMO_GRID, cache_dir=cache_dir, progress=False, train_dir=root)
    yield f"  held-out phantoms: {DEMO_N_TEST} cases in {test}"
    path = Path(checkpoint) if checkpoint is not None else SHIPPED_CHECKPOINT
    try:
        from lckd_kit.train import load_model

        model, ckpt = load_model(path, "cpu")
        teachers = [m for m, on in zip(MODALITIES, ckpt.get("teachers", [])) if on]
        yield (f"  shipped checkpoint: {path} loads ({model.config.name}, step {ckpt.get('step')}, "
               f"teachers {'+'.join(teachers) or '?'})")
    except FileNotFoundError:
        yield f"  shipped checkpoint MISSING at {path}: {_MAKE_CHECKPOINT_HINT}"
    missing = []
    for module in ("ipywidgets", "plotly", "jupyterlab"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    yield ("  notebook packages: ok" if not missing else
           f"  notebook packages MISSING: {', '.join(missing)} (pip install -e '.[notebooks]')")
    yield f"done in {time.perf_counter() - t0:.0f} s"


__all__ = ["run_experiment", "train_shipped_checkpoint", "workshop_prep", "heldout_phantoms", "load_eval_cases",
           "what_the_numbers_show", "group_stats", "Report", "SHIPPED_CHECKPOINT", "TRAIN_SEED", "TEST_SEED",
           "DEMO_N_CASES", "DEMO_N_TEST"]
