#!/usr/bin/env python
"""Execute the teaching notebooks and keep what they produced, outside ``notebooks/``.

    python tools/run_notebooks.py --out outputs/notebooks              # default (real CPU) path
    python tools/run_notebooks.py --out outputs/nb_fast --fast         # FAST = True (the tests' mode)
    python tools/run_notebooks.py notebooks/02_teacher_election.ipynb --out /tmp/nb -p THREADS=1

Each notebook runs top to bottom in a fresh ``python3`` kernel with ``notebooks/`` as the working
directory. Parameters are injected papermill-style: a cell ``FAST = True`` (and any ``-p NAME=VALUE``,
VALUE a Python literal) goes right after the cell tagged ``parameters``. Written to ``--out``:

* ``<name>.ipynb``: the executed notebook, with outputs and widget state;
* ``figures/<stem>/cellNN_K.png``: every PNG output. ``figures/<stem>/cellNN_widget_K.png`` holds the
  images the ipywidgets views (slice viewer, explorer) showed last;
* ``timings.json``: wall time per notebook and per cell, the kernel's CPU time (user + system: on a
  busy machine a better estimate of the time on a quiet one) and the machine's load average.

``--cache DIR`` sets ``LCKD_KIT_CACHE`` (phantoms and notebook runs) for the kernels. The default is
the kit's own cache, so the phantoms a workshop prepared are reused. The exit status is 1 if a
notebook failed. Its executed copy is still written, with the error in it.
"""
from __future__ import annotations

import argparse
import ast
import base64
import copy
import json
import os
import sys
import time
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
KERNEL = "python3"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def parameters_index(nb) -> int:
    """Index of the one cell tagged ``parameters`` (ValueError unless there is exactly one)."""
    found = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(found) != 1:
        raise ValueError(f"expected exactly one cell tagged 'parameters', found {len(found)}")
    return found[0]


def inject_parameters(nb, params: dict):
    """A copy of ``nb`` with a cell assigning ``params`` right after the parameters cell (papermill style)."""
    nb = copy.deepcopy(nb)
    if params:
        i = parameters_index(nb)
        src = "# Injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
        cell = nbformat.v4.new_code_cell(src)
        cell.metadata["tags"] = ["injected-parameters"]
        cell.id = "injected-parameters"
        nb.cells.insert(i + 1, cell)
    return nb


_CPU_PROBE = ("import resource as _r, json as _j\n"
              "_s, _c = _r.getrusage(_r.RUSAGE_SELF), _r.getrusage(_r.RUSAGE_CHILDREN)\n"
              "print(_j.dumps({'cpu_seconds': _s.ru_utime + _s.ru_stime + _c.ru_utime + _c.ru_stime}))")


def kernel_cpu_seconds(nb) -> float | None:
    """CPU seconds the kernel used (user + system), if :func:`execute` measured them."""
    return nb.metadata.get("lckd_kit_run", {}).get("cpu_seconds")


def execute(path: str | os.PathLike, params: dict | None = None, cache: str | os.PathLike | None = None,
            timeout: int = 600, env: dict | None = None, measure_cpu: bool = False):
    """Run a notebook in a fresh kernel; return ``(executed notebook, error or None, seconds)``.

    ``measure_cpu``: also record the kernel's CPU time (``kernel_cpu_seconds(nb)``). On a busy
    machine the CPU time is the better estimate of the wall time the notebook needs on a quiet one.

    The kernel gets ``LCKD_KIT_CACHE=cache`` (if given) and ``PYTHONPATH`` with the repository, so a
    checkout that was not pip-installed works (the notebooks' first cell handles that too).
    """
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = Path(path)
    nb = inject_parameters(nbformat.read(path, as_version=4), params or {})
    if measure_cpu:  # a last cell reports the kernel's CPU time; removed again below
        probe = nbformat.v4.new_code_cell(_CPU_PROBE)
        probe.id = "cpu-probe"
        nb.cells.append(probe)
    kenv = dict(os.environ, **(env or {}))
    kenv["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), kenv.get("PYTHONPATH", "")) if p)
    kenv.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    if cache is not None:
        kenv["LCKD_KIT_CACHE"] = str(cache)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=timeout, record_timing=True,
                            store_widget_state=True, resources={"metadata": {"path": str(path.parent)}})
    error = None
    t0 = time.perf_counter()
    try:
        client.execute(env=kenv)
    except CellExecutionError as err:
        error = err
    except Exception as err:  # a dead kernel or a timeout: keep what ran
        error = err
    seconds = time.perf_counter() - t0
    if measure_cpu and nb.cells and nb.cells[-1].get("id") == "cpu-probe":
        probe = nb.cells.pop()
        for out in probe.get("outputs", []):
            if out.get("output_type") == "stream" and "cpu_seconds" in out.get("text", ""):
                nb.metadata["lckd_kit_run"] = json.loads(out["text"].strip().splitlines()[-1])
    return nb, error, seconds


def _widget_images(nb) -> dict[str, bytes]:
    """model id -> PNG bytes of every ipywidgets Image in the stored widget state."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    out = {}
    for model_id, m in state.items():
        if m.get("model_name") != "ImageModel":
            continue
        for buf in m.get("buffers", []):
            if buf.get("path") == ["value"] and buf.get("encoding") == "base64":
                data = base64.b64decode(buf["data"])
                if data:
                    out[model_id] = data
    return out


def _widget_children(state: dict, model_id: str) -> list[str]:
    """All model ids reachable from a widget (its children, recursively)."""
    seen, todo = [], [model_id]
    while todo:
        mid = todo.pop()
        if mid in seen or mid not in state:
            continue
        seen.append(mid)
        for v in state[mid].get("state", {}).values():
            vals = v if isinstance(v, list) else [v]
            todo += [s[len("IPY_MODEL_"):] for s in vals if isinstance(s, str) and s.startswith("IPY_MODEL_")]
    return seen


def cell_time(cell) -> float | None:
    """Seconds a cell took (nbclient's recorded timestamps), or None."""
    ex = cell.get("metadata", {}).get("execution", {})
    a, b = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
    if not (a and b):
        return None
    from datetime import datetime

    def parse(s):
        return datetime.fromisoformat(s.replace("Z", "+00:00"))

    return (parse(b) - parse(a)).total_seconds()


def extract_figures(nb, folder: Path) -> list[Path]:
    """Write the PNG outputs (and the widgets' last images) of an executed notebook into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    images = _widget_images(nb)
    for i, cell in enumerate(nb.cells):
        k = 0
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "image/png" in data:
                p = folder / f"cell{i:02d}_{k}.png"
                p.write_bytes(base64.b64decode(data["image/png"]))
                written.append(p)
                k += 1
            if WIDGET_VIEW in data:
                for mid in _widget_children(state, data[WIDGET_VIEW]["model_id"]):
                    if mid in images:
                        p = folder / f"cell{i:02d}_widget_{k}.png"
                        p.write_bytes(images[mid])
                        written.append(p)
                        k += 1
    return written


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/0*.ipynb in order")
    ap.add_argument("--out", type=Path, required=True, help="folder for executed copies and figures")
    ap.add_argument("--fast", action="store_true", help="inject FAST = True")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                    help="inject a parameter (VALUE a Python literal; repeatable)")
    ap.add_argument("--cache", type=Path, default=None, help="LCKD_KIT_CACHE for the kernels")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = ap.parse_args(argv)

    params = {}
    if args.fast:
        params["FAST"] = True
    for p in args.param:
        name, _, value = p.partition("=")
        try:
            params[name.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[name.strip()] = value
    paths = args.notebooks or sorted(NOTEBOOKS.glob("0*.ipynb"))
    if NOTEBOOKS.resolve() in (args.out.resolve(), *args.out.resolve().parents):
        ap.error("--out must not be inside notebooks/ (the committed notebooks stay without outputs)")
    args.out.mkdir(parents=True, exist_ok=True)

    timings = {"params": params, "load_before": load_average(), "cpus": os.cpu_count(), "notebooks": {}}
    failed = []
    for path in paths:
        print(f"[run_notebooks] {path.name} ...", flush=True)
        nb, error, seconds = execute(path, params, cache=args.cache, timeout=args.timeout, measure_cpu=True)
        cpu = kernel_cpu_seconds(nb)
        nbformat.write(nb, args.out / path.name)
        figs = extract_figures(nb, args.out / "figures" / path.stem)
        cells = {f"cell{i:02d}": round(t, 2) for i, c in enumerate(nb.cells)
                 if c.cell_type == "code" and (t := cell_time(c)) is not None}
        timings["notebooks"][path.name] = {"seconds": round(seconds, 1), "kernel_cpu_seconds": cpu,
                                           "ok": error is None, "cells": cells, "figures": len(figs),
                                           "load_after": load_average()}
        status = "ok" if error is None else f"FAILED: {str(error).strip().splitlines()[-1][:300]}"
        cpu_txt = f" (kernel CPU {cpu:.0f} s)" if cpu is not None else ""
        print(f"[run_notebooks] {path.name}: {seconds:.0f} s{cpu_txt}, {len(figs)} figures, {status}", flush=True)
        if error is not None:
            failed.append(path.name)
    (args.out / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    total = sum(v["seconds"] for v in timings["notebooks"].values())
    print(f"[run_notebooks] total {total:.0f} s; executed copies and figures in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
