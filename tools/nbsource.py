"""Shared pieces of the notebook sources (used by tools/build_notebooks.py).

The notebooks in ``notebooks/`` are generated from ``tools/build_notebooks.py``: edit the cell
texts there, then run ``python tools/build_notebooks.py``. ``tests/test_notebooks.py`` checks that
the committed ``.ipynb`` files match the builder (cell types, sources and tags).
"""
from __future__ import annotations

import nbformat

ORG = "lckd-kit"  # placeholder GitHub organisation (see notebooks/README.md)
REPO_URL = f"https://github.com/{ORG}/lckd_kit"


def colab_badge(name: str) -> str:
    url = f"https://colab.research.google.com/github/{ORG}/lckd_kit/blob/main/notebooks/{name}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


SETUP_MD = f"""**Setup.** The next cell makes the kit importable and changes nothing when it already is. In a
checkout of the repository it uses that checkout. Anywhere else (Colab, a bare Jupyter) it clones the
repository and installs it with `%pip install -e`, which takes about a minute in Colab. Why not simply
`%pip install -q git+{REPO_URL}`? That installs the code but not the demo cases and the tissue prior,
which sit next to the package in the repository. In Colab the cell also turns on the custom widget
manager, which the sliders and the 3-D views need."""

SETUP_CODE = f"""# Make lckd_kit importable: installed -> nothing to do; a checkout -> use it; else clone + install.
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("lckd_kit") is None:
    here = Path.cwd().resolve()
    repo = next((p for p in (here, *here.parents) if (p / "lckd_kit" / "__init__.py").is_file()), None)
    if repo is None:  # Colab / bare Jupyter: code + demo data (a plain git+ pip install lacks the data)
        repo = Path("lckd_kit").resolve()
        if not (repo / "lckd_kit" / "__init__.py").is_file():
            !git clone -q --depth 1 {REPO_URL} {{repo}}
        %pip install -q -e {{repo}}
    sys.path.insert(0, str(repo))

try:  # Colab renders ipywidgets / plotly only with its custom widget manager
    from google.colab import output
    output.enable_custom_widget_manager()
except ImportError:
    pass"""

PARAMS_MD = """**Parameters.** Everything you may want to change is in the next cell. It is tagged `parameters`
(the papermill convention), so tools can override it: the tests insert `FAST = True` right after it.
`FAST = True` shrinks everything to toy sizes. That is good for checking that the notebook runs, not
for reading the results."""


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(text.strip("\n"))


def code(text: str, *tags: str) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def notebook(name: str, cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
    }
    stem = name.split(".")[0]
    for i, cell in enumerate(cells):
        cell.id = f"{stem[:2]}-{i:02d}"  # stable ids: rebuilding gives byte-identical files
    nb.cells = list(cells)
    return nb
