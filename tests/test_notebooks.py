"""The teaching notebooks (``notebooks/0N_*.ipynb``) and their solutions notebooks
(``notebooks/solutions/0N_solutions.ipynb``): committed clean, and runnable top to bottom.

The ``.ipynb`` files are the source: edit them as notebooks, then ``python tools/strip_notebooks.py``.
Static checks (milliseconds): every notebook stripped (no outputs, no execution counts); exactly one
``parameters`` cell that sets ``FAST = False``; the setup cell first; a Colab badge and a setup cell
pointing at the repository address of ``pyproject.toml``; a narrative markdown cell before every
code cell; an ``## Exercises`` section with at least three exercises, each solved in the solutions
notebook; a "Key takeaways" box at the end.

Execution (the FAST path): each notebook, then its solutions notebook, runs in a fresh kernel via
nbclient, with ``FAST = True`` injected after the parameters cell (papermill style), the notebook's
folder as working directory and ``LCKD_KIT_CACHE`` set to a temporary folder shared by all of them,
as in a workshop. The notebooks and solutions assert their own results; here we check that no cell
failed or wrote to stderr, that every cell tagged ``figure`` produced a PNG, every ``widget`` cell a
widget view and every ``plotly`` cell a plotly figure.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
SOLUTIONS = NOTEBOOKS / "solutions"
TOOLS = REPO / "tools"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("0*.ipynb"))
SOLUTION_NAMES = sorted(p.name for p in SOLUTIONS.glob("0*_solutions.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell in FAST mode (each notebook takes well under a minute)
REPO_URL = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]

nbformat = pytest.importorskip("nbformat")


def _load_tool(name: str):
    """Import tools/<name>.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_lckd_tools_{name}", TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _read(path):
    return nbformat.read(path if isinstance(path, Path) else NOTEBOOKS / path, as_version=4)


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _exercise_count(nb) -> int:
    cells = [c for c in nb.cells if c.cell_type == "markdown" and re.search(r"^## Exercises\s*$", c.source, re.M)]
    assert len(cells) == 1, "expected one markdown cell with a '## Exercises' heading"
    section = cells[0].source.split("## Exercises", 1)[1]
    return len(re.findall(r"^\d+\. \*\*", section, re.M))


def test_the_notebooks_and_their_solutions():
    assert NAMES == ["01_data_tour.ipynb", "02_teacher_election.ipynb", "03_distillation_training.ipynb",
                     "04_missing_modality_explorer.ipynb", "05_when_does_distillation_help.ipynb",
                     "06_four_ways_to_survive_a_missing_modality.ipynb"]
    assert SOLUTION_NAMES == [f"{n[:2]}_solutions.ipynb" for n in NAMES]


def test_committed_stripped():
    strip = _load_tool("strip_notebooks")
    assert strip.main(["--check"]) == 0, "run python tools/strip_notebooks.py"
    for path in strip.all_notebooks():
        nb = _read(path)
        assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code"), path
        assert "widgets" not in nb.metadata, path


def _check_setup_and_parameters(nb, where):
    code = [c for c in nb.cells if c.cell_type == "code"]
    setup = code[0].source
    assert 'find_spec("lckd_kit")' in setup and "%pip install" in setup and "enable_custom_widget_manager" in setup
    assert f'os.environ.get("LCKD_KIT_REPO", "{REPO_URL}")' in setup, f"{where}: run python tools/set_repo_url.py"
    params = [c for c in nb.cells if "parameters" in _tags(c)]
    assert len(params) == 1, f"{where}: exactly one cell tagged 'parameters'"
    assert re.search(r"^FAST = False\b", params[0].source, re.M), "FAST = False in the parameters cell"
    assert params[0] is code[1], "the parameters cell is the second code cell"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert i > 0 and nb.cells[i - 1].cell_type == "markdown", f"{where}: code cell {i} has no narrative"


@pytest.mark.parametrize("name", NAMES)
def test_structure(name):
    nb = _read(name)
    nbformat.validate(nb)
    first = nb.cells[0]
    org_repo = REPO_URL.split("github.com/", 1)[1]
    assert first.cell_type == "markdown" and first.source.startswith("# "), "the first cell is the title"
    assert f"colab.research.google.com/github/{org_repo}/blob/main/notebooks/{name}" in first.source
    assert "Learning goals" in first.source
    _check_setup_and_parameters(nb, name)
    assert any("figure" in _tags(c) for c in nb.cells), "at least one figure"
    last = nb.cells[-1]
    assert last.cell_type == "markdown" and "**Key takeaways**" in last.source, "a Key takeaways box at the end"


@pytest.mark.parametrize("name", NAMES)
def test_every_exercise_has_a_self_checking_solution(name):
    n = _exercise_count(_read(name))
    assert n >= 3, f"{name}: {n} exercises, expected at least 3"
    solutions_name = f"{name[:2]}_solutions.ipynb"
    sol = _read(SOLUTIONS / solutions_name)
    _check_setup_and_parameters(sol, solutions_name)
    text = "\n".join(c.source for c in sol.cells if c.cell_type == "markdown")
    for k in range(1, n + 1):
        assert re.search(rf"^## Exercise {k}\b", text, re.M), f"{solutions_name} has no '## Exercise {k}'"
    assert sum("assert " in c.source for c in sol.cells if c.cell_type == "code") >= n, "each solution checks itself"
    assert f"solutions/{solutions_name}" in "".join(c.source for c in _read(name).cells if c.cell_type == "markdown")


def test_repository_address_is_one_constant():
    assert _load_tool("set_repo_url").main(["--check"]) == 0, "run python tools/set_repo_url.py"


def test_readme_and_guide_exist():
    readme = (NOTEBOOKS / "README.md").read_text()
    for name in NAMES + SOLUTION_NAMES:
        assert name in readme
    guide = (REPO / "docs" / "instructor_guide.md").read_text()
    assert "make workshop-prep" in guide


def test_inject_parameters_goes_after_the_parameters_cell():
    runner = _load_tool("run_notebooks")
    nb = _read(NAMES[0])
    out = runner.inject_parameters(nb, {"FAST": True, "SEED": 3})
    i = runner.parameters_index(nb)
    assert out.cells[i + 1].source.splitlines()[1:] == ["FAST = True", "SEED = 3"]
    assert len(out.cells) == len(nb.cells) + 1 and len(nb.cells) == len(_read(NAMES[0]).cells)


def test_strip_removes_outputs(tmp_path):
    strip = _load_tool("strip_notebooks")
    nb = _read(NAMES[0])
    cell = next(c for c in nb.cells if c.cell_type == "code")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hi\n")]
    cell.execution_count = 3
    cell.metadata["execution"] = {"iopub.execute_input": "2024-01-01T00:00:00Z"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    path = tmp_path / NAMES[0]
    nbformat.write(nb, path)
    assert strip.main(["--check", str(path)]) == 1
    assert strip.main([str(path)]) == 0
    clean = nbformat.read(path, as_version=4)
    assert [c.source for c in clean.cells] == [c.source for c in _read(NAMES[0]).cells]
    assert path.read_text() == (NOTEBOOKS / NAMES[0]).read_text()
    assert strip.main(["--check", str(path)]) == 0


# ---------------------------------------------------------------------------------------------
# execution


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One LCKD_KIT_CACHE for the four notebooks of this module (phantoms, notebook runs)."""
    return tmp_path_factory.mktemp("lckd_kit_cache")


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    for module in ("nbclient", "ipykernel", "ipywidgets", "plotly"):
        pytest.importorskip(module)
    mod = _load_tool("run_notebooks")
    # A kernel spec for THIS interpreter, found first (JUPYTER_PATH precedes the user's own specs),
    # so a "python3" kernel registered elsewhere on the machine is never used by mistake.
    from ipykernel.kernelspec import write_kernel_spec

    jupyter = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(path=str(jupyter / "kernels" / mod.KERNEL))
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(jupyter))
    yield mod
    mp.undo()


def _outputs(cell, kind: str | None = None):
    return [o for o in cell.get("outputs", []) if kind is None or o.get("output_type") == kind]


def _has_mime(cell, *mimes: str) -> bool:
    return any(m in o.get("data", {}) for o in cell.get("outputs", []) for m in mimes)


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for n in NAMES for p in (NOTEBOOKS / n, SOLUTIONS / f"{n[:2]}_solutions.ipynb")],
                         ids=lambda p: p.name)
def test_notebook_runs_in_fast_mode(path, runner, shared_cache):
    name = path.name
    nb, error, seconds = runner.execute(path, {"FAST": True}, cache=shared_cache, timeout=CELL_TIMEOUT)
    if error is not None:
        pytest.fail(f"{name} failed after {seconds:.0f} s:\n{error}")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        where = f"{name} cell {i} ({cell.source.splitlines()[0][:60]!r})"
        assert not _outputs(cell, "error"), f"{where} raised"
        stderr = "".join(o.get("text", "") for o in _outputs(cell, "stream") if o.get("name") == "stderr")
        assert not stderr.strip(), f"{where} wrote to stderr:\n{stderr[:2000]}"
        tags = _tags(cell)
        if "figure" in tags:
            assert _has_mime(cell, "image/png"), f"{where} is tagged 'figure' but shows no PNG"
        if "widget" in tags:
            assert _has_mime(cell, runner.WIDGET_VIEW), f"{where} is tagged 'widget' but shows no widget"
        if "plotly" in tags:
            assert _has_mime(cell, "application/vnd.plotly.v1+json", "text/html"), f"{where} shows no plotly figure"
    # the widgets' last images are in the stored widget state (what a saved notebook shows)
    if any("widget" in _tags(c) for c in nb.cells):
        assert runner._widget_images(nb), f"{name}: no rendered widget image in the widget state"
    slow = sorted(((runner.cell_time(c) or 0.0, i) for i, c in enumerate(nb.cells) if c.cell_type == "code"),
                  reverse=True)[:3]
    print(f"{name}: {seconds:.0f} s (slowest cells: " + ", ".join(f"#{i} {t:.1f} s" for t, i in slow) + ")")


def test_parameters_cell_values_are_literals():
    """Papermill and tools/run_notebooks.py override parameters by assignment: keep them literal."""
    import ast

    for name in NAMES:
        cell = next(c for c in _read(name).cells if "parameters" in _tags(c))
        for node in ast.parse(cell.source).body:
            assert isinstance(node, ast.Assign), f"{name}: only assignments in the parameters cell"
            value = node.value
            if isinstance(value, ast.Call):  # dict(...) with literal arguments
                assert isinstance(value.func, ast.Name) and value.func.id == "dict"
                for kw in value.keywords:
                    ast.literal_eval(kw.value)
            else:
                ast.literal_eval(value)
