"""Four ways to survive a missing modality, side by side, on the same phantoms.

    compare()                                 train every method per seed, evaluate each on the
                                              held-out phantoms, write report.md / report.html and
                                              results.json (``lckd-kit compare``)
    res = load_results("outputs/compare")     the per-case scores back, in seconds (a notebook)
    res.summary_table()                       method -> summary -> (mean, low, high)
    res.summary_figure(); res.difference_figure(); res.heatmap("hemis")

The methods (docs/methods.md): ``lckd`` (the kit's LCKD), ``nokd`` (the same network and schedule
without distillation), ``dropout`` (one U-Net, missing channels zeroed), ``hemis`` (per-modality
encoders, mean + variance fusion) and ``regionfusion`` (per-region modality weights, after RFNet).
Every one is trained by the same loop on the same phantoms, crops and seeds (each seed: the same
batches and the same stage-2 subsets for every method), on the schedule of ``config`` with only the
model changed (``method_train_config``), and evaluated by the same 15-subset evaluation.

The report (:mod:`lckd_kit.compare_report`) states only what comes from the scores: means with
bootstrap intervals over held-out cases (and seeds, with several), and paired differences to LCKD
(:mod:`lckd_kit.stats`), never called "significant". The kit's region-fusion table is set next to the published RFNet table on real
BraTS 2018 (:mod:`lckd_kit.calibration`): phantoms are not patients, so this says how far the
phantom picture is from the real one, not whether the kit reproduces RFNet.

Time: one seed of the default comparison (5 methods x small2d's 600 steps + evaluation) is sized
for about half an hour on 2 CPU cores; docs/methods.md has the measured figures.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from lckd_kit import REGIONS, SUBSETS, subset_name
from lckd_kit import stats
from lckd_kit.runtime import format_seconds, resolve_device

RESULTS_FORMAT = "lckd_kit.compare/1"

#: the methods compared by default, in display order; "nokd" is LCKD trained without distillation
DEFAULT_METHODS: tuple[str, ...] = ("lckd", "nokd", "dropout", "hemis", "regionfusion")

#: display names
LABELS: dict[str, str] = {"lckd": "LCKD", "nokd": "no-KD", "dropout": "modality dropout", "hemis": "HeMIS",
                          "regionfusion": "region fusion"}

#: one colour per method in every figure (Okabe-Ito, like the rest of the kit's figures)
METHOD_COLORS: dict[str, str] = {"LCKD": "#0072B2", "no-KD": "#56B4E9", "modality dropout": "#999999",
                                 "HeMIS": "#E69F00", "region fusion": "#009E73"}

#: the kit's method -> the method of the bundled published tables it follows (lckd_kit.calibration)
PUBLISHED: dict[str, str] = {"regionfusion": "RFNet"}

#: the summary numbers: key -> (label, stats.GROUPS subset group, regions)
SUMMARIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "mean": ("mean over the 15 subsets", "all", REGIONS),
    "core_no_t1ce": ("core (ET, TC) without T1ce", "no_t1ce", ("ET", "TC")),
    "wt_no_flair": ("WT without FLAIR", "no_flair", ("WT",)),
    "full": ("all four modalities", "full", REGIONS),
}


def label(method: str) -> str:
    return LABELS.get(method, method)


def _check_methods(methods: Sequence[str]) -> list[str]:
    from lckd_kit import methods as registry

    out = list(dict.fromkeys(methods))
    unknown = [m for m in out if m != "nokd" and m not in registry.REGISTRY]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; expected some of {sorted({'nokd', *registry.REGISTRY})}")
    if not out:
        raise ValueError("no method to compare")
    return out


def method_train_config(method: str, config="small2d", seed: int = 0, train_overrides: dict | None = None):
    """The training run of ``method`` in a comparison: ``config``'s schedule (a ``TRAIN_CONFIGS``
    name or a TrainConfig whose model is an LCKD size such as ``"small2d"``), ``train_overrides``,
    the seed, and the method's model of the same size (``methods.config_name_for``). ``nokd`` is
    LCKD with ``no_kd=True``; the other methods have no features to distil anyway."""
    from lckd_kit import methods as registry
    from lckd_kit.train import get_train_config

    base = get_train_config(config, **(train_overrides or {}))
    if not isinstance(base.model, str) or base.model not in registry.REGISTRY["lckd"].configs:
        raise ValueError(f"the comparison needs a schedule whose model is an LCKD size ({sorted(registry.REGISTRY['lckd'].configs)}), "
                         f"got model {base.model!r}")
    kind = "lckd" if method == "nokd" else method
    return dataclasses.replace(base, model=registry.config_name_for(kind, base.model), seed=int(seed),
                               no_kd=method == "nokd")


# --------------------------------------------------------------------------------------------
# results: what results.json holds, and what a notebook does with it


def _nan_to_none(a: np.ndarray) -> list:
    return [[[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in case] for case in a]


@dataclass
class CompareResults:
    """Per-case Dice of every method, seed and held-out case, and how they were made.

    Attributes:
        methods: method names, display order (``LABELS`` has their display names).
        seeds: the seeds every method has a run for (the paired analyses use these).
        cases: held-out case names.
        dice: method -> ``(n_seeds, n_cases, 15, 3)`` Dice, SUBSETS x REGIONS (NaN where undefined).
        truth_empty: ``(n_cases, 3)`` bool, the region is absent from the case's ground truth.
        meta: config, command, parameter counts, timings, machine (what results.json stores).
    """

    methods: list[str]
    seeds: list[int]
    cases: list[str]
    dice: dict[str, np.ndarray]
    truth_empty: np.ndarray
    meta: dict = field(default_factory=dict)

    # -- numbers -------------------------------------------------------------------------------

    @property
    def reference(self) -> str:
        """The method the paired differences are taken against: LCKD when compared, else the first."""
        return "lckd" if "lckd" in self.methods else self.methods[0]

    def table(self, method: str) -> np.ndarray:
        """``(15, 3)`` mean Dice over seeds and cases (the paper-style table) of one method."""
        return stats.mean_table(self.dice[method])

    def seed_std(self, method: str) -> np.ndarray | None:
        """``(15, 3)`` standard deviation over seeds of the per-seed tables (None with one seed)."""
        d = self.dice[method]
        if d.shape[0] < 2:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(d, axis=1).std(axis=0, ddof=1)

    def summary(self, method: str, key: str = "mean") -> stats.Comparison:
        """One summary number of one method with its bootstrap interval (``SUMMARIES`` keys)."""
        _, group, regions = SUMMARIES[key]
        return stats.compare(self.dice[method], None, group, regions)

    def difference(self, method: str, key: str = "mean", reference: str | None = None) -> stats.Comparison:
        """Paired difference ``method − reference`` (default LCKD) on one summary, with its interval."""
        _, group, regions = SUMMARIES[key]
        return stats.compare(self.dice[method], self.dice[reference or self.reference], group, regions)

    def summary_table(self) -> dict[str, dict[str, tuple[float, float, float]]]:
        """Method -> summary key -> ``(mean, low, high)``: what :meth:`summary_figure` draws."""
        out = {}
        for m in self.methods:
            out[m] = {}
            for key in SUMMARIES:
                c = self.summary(m, key)
                out[m][key] = (c.a, c.low, c.high)
        return out

    def difference_table(self, reference: str | None = None) -> dict[str, dict[str, tuple[float, float, float]]]:
        """Method (all but the reference) -> summary key -> ``(difference, low, high)``."""
        ref = reference or self.reference
        out = {}
        for m in self.methods:
            if m != ref:
                out[m] = {}
                for key in SUMMARIES:
                    c = self.difference(m, key, ref)
                    out[m][key] = (c.diff, c.low, c.high)
        return out

    def ranking(self, key: str = "mean") -> list[tuple[str, float]]:
        """``[(method, mean), ...]``, highest first, on one summary."""
        return sorted(((m, self.summary(m, key).a) for m in self.methods), key=lambda t: -t[1])

    def published_comparison(self, method: str = "regionfusion"):
        """The method's 15-subset table against the published table of the method it follows
        (``PUBLISHED``; real BraTS 2018): a ``calibration.Comparison`` (Spearman over the 45 cells,
        mean absolute difference), or None when there is no such table."""
        from lckd_kit import calibration

        if method not in PUBLISHED or method not in self.dice:
            return None
        ref = PUBLISHED[method]
        if ref not in calibration.published_methods():
            return None
        return calibration.compare(self.table(method), ref, name=f"kit {label(method)} (phantoms)")

    # -- figures -------------------------------------------------------------------------------

    def summary_figure(self, title: str | None = None):
        """Grouped bars: the four summaries per method, each with its 95 % interval."""
        from lckd_kit.viz import method_summary_bars

        table = {label(m): v for m, v in self.summary_table().items()}
        groups = {k: v[0] for k, v in SUMMARIES.items()}
        over = f"{len(self.cases)} held-out case(s) × {len(self.seeds)} seed(s)"
        return method_summary_bars(table, groups, METHOD_COLORS, title=title or f"Dice per method ({over}), 95 % intervals")

    def difference_figure(self, reference: str | None = None, title: str | None = None):
        """Forest plot: each method minus the reference (default LCKD), paired, with 95 % intervals."""
        from lckd_kit.viz import paired_difference_plot

        ref = reference or self.reference
        table = {label(m): v for m, v in self.difference_table(ref).items()}
        groups = {k: v[0] for k, v in SUMMARIES.items()}
        return paired_difference_plot(table, groups, label(ref), METHOD_COLORS, title=title)

    def heatmap(self, method: str, title: str | None = None):
        """The method's 15-subset Dice heatmap (cells resting on empty-truth cases marked †)."""
        from lckd_kit.viz import subset_heatmap

        seeds = f"seed {self.seeds[0]}" if len(self.seeds) == 1 else f"mean over {len(self.seeds)} seeds"
        return subset_heatmap(self.table(method), title=title or f"{label(method)} ({seeds})", show_mean=True,
                              flagged=stats.convention_cells(self.truth_empty, self.dice[method]))

    # -- files ---------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"format": RESULTS_FORMAT, **self.meta, "methods": self.methods, "seeds": self.seeds,
                "cases": self.cases, "subsets": [subset_name(s) for s in SUBSETS], "regions": list(REGIONS),
                "truth_empty": self.truth_empty.astype(bool).tolist(),
                "dice": {m: {str(s): _nan_to_none(self.dice[m][i]) for i, s in enumerate(self.seeds)}
                         for m in self.methods}}


#: the committed reference comparison (``lckd-kit compare`` with the defaults, seeds 0 1 2)
REFERENCE_RESULTS = "compare_results.json"


def load_results(path: str | os.PathLike | None = None) -> CompareResults:
    """Read a comparison's ``results.json`` (or the folder holding it) -> :class:`CompareResults`;
    None: the committed reference comparison (its command is in ``meta["command"]``).

    Only seeds that every method has finished are kept (a comparison still running writes the file
    after each run), so every paired analysis is over the same seeds and cases.
    """
    if path is None:
        from importlib.resources import files

        path = Path(str(files("lckd_kit") / "resources" / REFERENCE_RESULTS))
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    d = json.loads(path.read_text())
    if d.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path} is not a comparison's results (format {RESULTS_FORMAT!r}), got {d.get('format')!r}")
    if d.get("subsets") != [subset_name(s) for s in SUBSETS] or d.get("regions") != list(REGIONS):
        raise ValueError(f"{path}: subsets/regions are not in the kit's order")
    methods = [m for m in d["methods"] if d["dice"].get(m)]
    seeds = [s for s in d["seeds"] if all(str(s) in d["dice"][m] for m in methods)]
    dice = {m: np.array([[[[np.nan if v is None else v for v in row] for row in case]
                          for case in d["dice"][m][str(s)]] for s in seeds], dtype=np.float64).reshape(
        len(seeds), len(d["cases"]), len(SUBSETS), len(REGIONS)) for m in methods}
    meta = {k: v for k, v in d.items() if k not in ("format", "methods", "seeds", "cases", "subsets", "regions",
                                                      "truth_empty", "dice")}
    return CompareResults(methods, seeds, list(d["cases"]), dice, np.array(d["truth_empty"], bool), meta)


def export_models(out_dir: str | os.PathLike, dest: str | os.PathLike, seed: int = 0,
                  methods: Sequence[str] = ("lckd", "dropout", "hemis", "regionfusion")) -> list[Path]:
    """Slim checkpoints (weights, configs, teachers; no optimiser) ``dest/compare_<method>.pt`` of the
    ``seed`` runs of a finished comparison in ``out_dir``: the models notebook 06's explorer shows
    (``paths.method_checkpoint``). Same phantoms, schedule and seed for every method."""
    from lckd_kit import checkpoint as ckpt_io

    written = []
    for m in _check_methods(methods):
        src = Path(out_dir) / "runs" / f"{m}_seed{seed}" / "final.pt"
        if not src.is_file():
            raise FileNotFoundError(f"{src} not found: the comparison in {out_dir} has not finished {label(m)}, seed {seed}")
        model, ckpt = ckpt_io.load_model(src)
        slim = ckpt_io.checkpoint_dict(model, ckpt["config"], step=ckpt["step"], teachers=ckpt["teachers"],
                                       elections=ckpt["elections"], split=ckpt.get("split", {}),
                                       made_by={"comparison": str(out_dir), "method": m, "seed": seed})
        written.append(ckpt_io.save(slim, Path(dest) / f"compare_{m}.pt"))
    return written


# --------------------------------------------------------------------------------------------
# running the comparison


def rerun_command(out: Path, methods, seeds, config, n_cases, n_test, grid, train_overrides) -> str:
    """The CLI line that reruns a comparison when its options cover the call, else a Python call."""
    from lckd_kit.experiment import DEMO_GRID, DEMO_N_CASES, DEMO_N_TEST

    steps = train_overrides or {}
    cli_steps = set(steps) <= {"stage1_steps", "stage2_steps"} and len(steps) in (0, 2)
    if isinstance(config, str) and cli_steps and n_test == DEMO_N_TEST and grid == DEMO_GRID:
        line = f"lckd-kit compare --methods {','.join(methods)} --seeds {' '.join(map(str, seeds))} --out {out.as_posix()}"
        if config != "small2d":
            line += f" --config {config}"
        if n_cases != DEMO_N_CASES:
            line += f" --n-cases {n_cases}"
        if steps:
            line += f" --stage-steps {steps['stage1_steps']} {steps['stage2_steps']}"
        return line
    if not isinstance(config, str):
        return "compare.compare(...) with a custom TrainConfig: its fields are in runs/*/config.json"
    kwargs = dict(methods=tuple(methods), seeds=tuple(seeds), config=config, n_cases=n_cases, n_test=n_test,
                  grid=grid, train_overrides=dict(steps))
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f'python -c "from lckd_kit.compare import compare; compare(out_dir={out.as_posix()!r}, {args})"'


def _finished_run(run_dir: Path, train_cfg: dict, cases: list[str]) -> dict | None:
    """The record of a run of exactly this training config, evaluated on these cases, if there is one."""
    from lckd_kit.evaluate import EvalResult

    rec_path, ev_path = run_dir / "compare_run.json", run_dir / "eval" / "results.json"
    if not (rec_path.is_file() and ev_path.is_file()):
        return None
    rec = json.loads(rec_path.read_text())
    if rec.get("train_config") != train_cfg or rec.get("cases") != cases:
        return None
    return {**rec, "eval": EvalResult.from_json(ev_path)}


def compare(
    methods: Sequence[str] = DEFAULT_METHODS,
    seeds: Sequence[int] | int = (0,),
    config="small2d",
    out_dir: str | os.PathLike = "outputs/compare",
    n_cases: int | None = None,
    n_test: int | None = None,
    device=None,
    progress: bool = True,
    grid: int | None = None,
    train_overrides: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> Path:
    """Train and evaluate several missing-modality methods on the same phantoms; write a report.

    Args:
        methods: names from ``DEFAULT_METHODS`` / ``methods.REGISTRY`` (``"nokd"``: LCKD without KD).
        seeds: one run per method and seed; every method gets the same batches for a seed.
        config: the schedule, a ``train.TRAIN_CONFIGS`` name (or TrainConfig) whose model is an LCKD
            size (``small2d``, ``small``; ``tiny`` for tests): each method trains its model of that
            size on it (:func:`method_train_config`); ``train_overrides`` changes fields of it
            (e.g. ``dict(stage1_steps=60, stage2_steps=60)`` for a quick look).
        out_dir: ``report.md``, ``report.html``, ``results.json``, ``figures/``,
            ``runs/<method>_seed<s>/`` (run folder with checkpoints and ``eval/``).
        n_cases, n_test, grid, cache_dir: the phantoms, as :func:`experiment.run_experiment`
            (defaults: 24 training + validation cases, 6 held-out, 96^3).
        resume: reuse runs of ``out_dir`` that finished with exactly the same training config and
            held-out cases (a long comparison can be stopped and continued).

    Returns:
        Path of ``report.md``. ``results.json`` is rewritten after every run, so it can be read
        (:func:`load_results`) while the comparison is still going.
    """
    import torch

    from lckd_kit import methods as registry
    from lckd_kit.evaluate import evaluate
    from lckd_kit.experiment import (DEMO_GRID, DEMO_N_CASES, DEMO_N_TEST, TEST_SEED, TRAIN_SEED, heldout_phantoms,
                                     load_eval_cases, machine_info)
    from lckd_kit.model import parameter_count
    from lckd_kit.phantom import GENERATOR_VERSION, ensure_phantoms
    from lckd_kit.train import train, train_config_to_dict

    t_start, cpu_start = time.perf_counter(), time.process_time()
    say = print if progress else (lambda *a, **k: None)
    methods = _check_methods(methods)
    seeds = [int(seeds)] if isinstance(seeds, int) else [int(s) for s in seeds]
    n_cases = DEMO_N_CASES if n_cases is None else int(n_cases)
    n_test = DEMO_N_TEST if n_test is None else int(n_test)
    grid = DEMO_GRID if grid is None else int(grid)
    device = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = {m: method_train_config(m, config, 0, train_overrides) for m in methods}  # fails early on a bad config
    command = rerun_command(out, methods, seeds, config, n_cases, n_test, grid, train_overrides)

    t = time.perf_counter()
    train_dir = ensure_phantoms(n_cases, seed=TRAIN_SEED, grid=grid, cache_dir=cache_dir, progress=progress)
    test_dir = heldout_phantoms(n_test, seed=TEST_SEED, grid=grid, cache_dir=cache_dir, progress=progress,
                                train_dir=train_dir)
    test_cases = load_eval_cases(test_dir)
    names = [c["name"] for c in test_cases]
    phantom_s = time.perf_counter() - t
    say(f"[compare] phantoms ready: {n_cases} training+validation cases, {len(test_cases)} held-out ({format_seconds(phantom_s)})")

    meta = {"command": command, "machine": machine_info(device),
            "config": {"schedule": config if isinstance(config, str) else "custom",
                       "train_overrides": dict(train_overrides or {}), "n_cases": n_cases, "n_test": n_test,
                       "grid": grid, "train_seed": TRAIN_SEED, "test_seed": TEST_SEED,
                       "phantom_generator_version": GENERATOR_VERSION, "device": str(device)},
            "train_configs": {m: train_config_to_dict(c) for m, c in cfgs.items()},
            "params": {}, "timing": {m: {} for m in methods}, "teachers": {m: {} for m in methods},
            "phantoms_s": round(phantom_s, 1)}
    dice: dict[str, dict[int, np.ndarray]] = {m: {} for m in methods}
    truth_empty = None

    def write_results() -> CompareResults:
        done = [s for s in seeds if all(s in dice[m] for m in methods)]
        res = CompareResults(methods, done, names, {m: np.stack([dice[m][s] for s in done]) if done else
                                                    np.zeros((0, len(names), len(SUBSETS), len(REGIONS)))
                                                    for m in methods},
                             truth_empty if truth_empty is not None else np.zeros((len(names), 3), bool), meta)
        d = res.to_dict()
        d["seeds"] = seeds  # all requested; per method only the finished ones are in "dice"
        d["dice"] = {m: {str(s): _nan_to_none(dice[m][s]) for s in seeds if s in dice[m]} for m in methods}
        tmp = out / ".results.json.tmp"
        tmp.write_text(json.dumps(d, indent=1, allow_nan=False) + "\n")
        os.replace(tmp, out / "results.json")
        return res

    for seed in seeds:
        for m in methods:
            cfg = dataclasses.replace(cfgs[m], seed=seed)
            run_dir = out / "runs" / f"{m}_seed{seed}"
            cfg_dict = train_config_to_dict(cfg)
            rec = _finished_run(run_dir, cfg_dict, names) if resume else None
            if rec is not None:
                say(f"[compare] {label(m)} seed {seed}: reusing the finished run in {run_dir}")
                ev, train_s, eval_s, n_params, teachers = (rec["eval"], rec["train_s"], rec["eval_s"], rec["params"],
                                                           rec.get("teachers"))
            else:
                say(f"[compare] training {label(m)}, seed {seed}: {cfg.total_steps} steps -> {run_dir}")
                t = time.perf_counter()
                result = train(cfg, train_dir, out_dir=run_dir, device=device, progress=progress)
                train_s = time.perf_counter() - t
                t = time.perf_counter()
                ev = evaluate(result.model, test_cases, device=device, progress=progress, hd95=False)
                eval_s = time.perf_counter() - t
                ev.meta.update(seed=seed, method=m, label=label(m), run=str(run_dir))
                ev.save(run_dir / "eval", title=f"{label(m)}, seed {seed}: {len(test_cases)} held-out cases")
                n_params = parameter_count(result.model)
                # the elected teachers mean something only to a model that distils
                teachers = result.teacher_names if m == "lckd" else None
                (run_dir / "compare_run.json").write_text(json.dumps(
                    {"train_config": cfg_dict, "cases": names, "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
                     "params": n_params, "teachers": teachers}, indent=1) + "\n")
            dice[m][seed] = ev.per_case("dice")
            if ev.cases != names:
                raise RuntimeError(f"{run_dir}: evaluated cases {ev.cases} differ from the held-out set {names}")
            truth_empty = ev.truth_empty()
            meta["params"][m] = n_params
            meta["timing"][m][str(seed)] = {"train_s": round(train_s, 1), "eval_s": round(eval_s, 1)}
            if teachers:
                meta["teachers"][m][str(seed)] = teachers
            say(f"[compare] {label(m)} seed {seed}: mean Dice over 15 subsets {np.nanmean(dice[m][seed]):.3f} "
                f"(train {format_seconds(train_s)}, evaluate {format_seconds(eval_s)})")
            meta["wall_s"] = round(time.perf_counter() - t_start, 1)
            meta["cpu_s"] = round(time.process_time() - cpu_start, 1)
            meta["threads"] = torch.get_num_threads()
            write_results()

    from lckd_kit.compare_report import write_compare_report  # the report module reads this one's names

    res = write_results()
    report = write_compare_report(res, out)
    say(f"[compare] report: {report} and {report.with_suffix('.html')}; scores: {out / 'results.json'} "
        f"(total {format_seconds(time.perf_counter() - t_start)})")
    return report


# --------------------------------------------------------------------------------------------
# command line (lckd-kit compare)


def method_list(text: str) -> list[str]:
    """``"lckd, hemis"`` -> ``["lckd", "hemis"]``; refuses names outside :data:`DEFAULT_METHODS` (an
    argparse ``type``: a typo fails before anything is trained)."""
    import argparse

    names = [m.strip() for m in str(text).split(",") if m.strip()]
    unknown = [m for m in names if m not in DEFAULT_METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or [text]}; choose from {','.join(DEFAULT_METHODS)}")
    return list(dict.fromkeys(names))


def add_arguments(parser) -> None:
    """The options of ``lckd-kit compare`` (no torch import: arguments are checked first)."""
    parser.add_argument("--methods", type=method_list, default=list(DEFAULT_METHODS),
                        help=f"comma-separated, from {','.join(DEFAULT_METHODS)} (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="outputs/compare")
    parser.add_argument("--config", default="small2d", choices=("small2d", "small", "tiny", "paper"),
                        help="the schedule, and the size of every method's model (default small2d)")
    parser.add_argument("--n-cases", type=int, default=None, help="training + validation phantoms (default 24)")
    parser.add_argument("--stage-steps", type=int, nargs=2, default=None, metavar=("STAGE1", "STAGE2"),
                        help="override the schedule's step counts (e.g. 60 60 for a quick look)")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs of OUT with the same settings")
    parser.add_argument("--device", default="auto")


def run(args) -> int:
    """``lckd-kit compare``: run :func:`compare` from parsed arguments; print where the report is."""
    overrides = None
    if args.stage_steps:
        s1, s2 = args.stage_steps
        overrides = dict(stage1_steps=s1, stage2_steps=s2)
    methods = args.methods if isinstance(args.methods, list) else method_list(args.methods)
    report = compare(methods=methods, seeds=args.seeds,
                     config=args.config, out_dir=args.out, n_cases=args.n_cases, device=args.device,
                     train_overrides=overrides, resume=args.resume)
    print(f"report: {report}")
    return 0


__all__ = ["compare", "load_results", "CompareResults", "method_train_config", "rerun_command", "add_arguments",
           "run", "method_list", "DEFAULT_METHODS", "LABELS", "METHOD_COLORS", "PUBLISHED", "SUMMARIES",
           "RESULTS_FORMAT", "REFERENCE_RESULTS", "export_models"]
