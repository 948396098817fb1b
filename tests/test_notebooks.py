"""The teaching notebooks (``notebooks/0N_*.ipynb``): committed clean, and runnable top to bottom.

Static checks (milliseconds): no outputs and no execution counts; exactly one ``parameters`` cell
that sets ``FAST = False``; the setup cell first; a Colab badge; a narrative markdown cell before
every code cell; an ``## Exercises`` section with at least three exercises and a solutions file
that works through each of them; the files match their source, ``tools/build_notebooks.py``.

Execution (the FAST path, about 1-3 minutes for all four on 2 cores): each notebook runs in a fresh
kernel via nbclient, with ``FAST = True`` injected after the parameters cell (papermill style),
``notebooks/`` as working directory and ``LCKD_KIT_CACHE`` set to a temporary folder. That folder
is shared by the four notebooks, as in a workshop: 01 generates the phantoms, 02 trains stage 1 and
03 continues it, and 04 explores the result. Each notebook also runs on its own (``-k 03``). The
notebooks assert their own results (an election names a teacher per region, the 15-subset tables
are 15 × 3 and in [0, 1], the explorer rendered, the empty subset shows the warning, ...). Here
we check that no cell failed or wrote to stderr, that every cell tagged ``figure`` produced a PNG,
every ``widget`` cell a widget view and every ``plotly`` cell a plotly figure.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
SOLUTIONS = NOTEBOOKS / "solutions"
TOOLS = REPO / "tools"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("0*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell in FAST mode (each notebook takes well under a minute)

nbformat = pytest.importorskip("nbformat")


def _load_tool(name: str):
    """Import tools/<name>.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_lckd_tools_{name}", TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(TOOLS))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(TOOLS))
    return mod


def _read(name: str):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _exercise_count(nb) -> int:
    cells = [c for c in nb.cells if c.cell_type == "markdown" and re.search(r"^## Exercises\s*$", c.source, re.M)]
    assert len(cells) == 1, "expected one markdown cell with a '## Exercises' heading"
    section = cells[0].source.split("## Exercises", 1)[1]
    return len(re.findall(r"^\d+\. \*\*", section, re.M))


def test_there_are_four_notebooks():
    assert NAMES == ["01_data_tour.ipynb", "02_teacher_election.ipynb", "03_distillation_training.ipynb",
                     "04_missing_modality_explorer.ipynb"]


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = _read(name)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {i} has outputs: run tools/strip_notebooks.py"
            assert cell.execution_count is None, f"{name} cell {i} has an execution count"
    assert "widgets" not in nb.metadata, f"{name} carries widget state: run tools/strip_notebooks.py"


@pytest.mark.parametrize("name", NAMES)
def test_structure(name):
    nb = _read(name)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), "the first cell is the title"
    assert f"colab.research.google.com/github/lckd-kit/lckd_kit/blob/main/notebooks/{name}" in first.source
    assert "Learning goals" in first.source

    code = [c for c in nb.cells if c.cell_type == "code"]
    setup = code[0].source
    assert 'find_spec("lckd_kit")' in setup and "%pip install" in setup and "enable_custom_widget_manager" in setup

    params = [c for c in nb.cells if "parameters" in _tags(c)]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    assert re.search(r"^FAST = False\b", params[0].source, re.M), "FAST = False in the parameters cell"
    assert params[0] is code[1], "the parameters cell is the second code cell"

    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert i > 0 and nb.cells[i - 1].cell_type == "markdown", f"code cell {i} has no narrative before it"
    assert any("figure" in _tags(c) for c in nb.cells), "at least one figure"


@pytest.mark.parametrize("name", NAMES)
def test_exercises_and_solutions(name):
    nb = _read(name)
    n = _exercise_count(nb)
    assert n >= 3, f"{name}: {n} exercises, expected at least 3"
    solutions = SOLUTIONS / f"{name[:2]}_solutions.md"
    assert solutions.is_file(), f"missing {solutions.relative_to(REPO)}"
    text = solutions.read_text()
    for k in range(1, n + 1):
        assert re.search(rf"^## Exercise {k}\b", text, re.M), f"{solutions.name} has no '## Exercise {k}'"
    assert f"solutions/{solutions.name}" in "".join(c.source for c in nb.cells if c.cell_type == "markdown")


def test_notebooks_match_their_source():
    builder = _load_tool("build_notebooks")
    built = builder.build()
    assert sorted(built) == NAMES
    for name, nb in built.items():
        committed = _read(name)
        want = [(c.cell_type, c.source, _tags(c)) for c in nb.cells]
        have = [(c.cell_type, c.source, _tags(c)) for c in committed.cells]
        assert have == want, f"{name} differs from tools/build_notebooks.py: edit the builder and rebuild"


def test_readme_and_guide_exist():
    readme = (NOTEBOOKS / "README.md").read_text()
    for name in NAMES:
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
    assert (path.read_text() == (NOTEBOOKS / NAMES[0]).read_text())
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
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_fast_mode(name, runner, shared_cache):
    nb, error, seconds = runner.execute(NOTEBOOKS / name, {"FAST": True}, cache=shared_cache, timeout=CELL_TIMEOUT)
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


def test_solutions_code_blocks_parse():
    """The worked solutions are meant to be pasted into the notebooks: their code must at least parse."""
    import ast

    for path in sorted(SOLUTIONS.glob("*.md")):
        for block in re.findall(r"```python\n(.*?)```", path.read_text(), re.S):
            ast.parse(block)
