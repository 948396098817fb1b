#!/usr/bin/env python
"""Strip outputs from notebooks before committing them.

    python tools/strip_notebooks.py                  # every notebook (notebooks/, notebooks/solutions/), in place
    python tools/strip_notebooks.py path/to/x.ipynb  # given files
    python tools/strip_notebooks.py --check          # exit 1 if a notebook would change (CI, pre-commit)

Removes outputs, execution counts, per-cell execution metadata (timings, ``collapsed``, ``scrolled``,
``trusted``), the stored widget state and any notebook metadata other than the kernel spec and the
language name. Cell ids, sources, tags and hidden-source flags are kept. The notebooks are edited as
notebooks (JupyterLab, VS Code); stripping one that was only executed gives back the committed file
byte for byte, and the tests check that every committed notebook is stripped.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KEEP_CELL_METADATA = ("tags",)
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def all_notebooks() -> list[Path]:
    """The teaching notebooks and their solutions notebooks."""
    return sorted(NOTEBOOKS.glob("*.ipynb")) + sorted((NOTEBOOKS / "solutions").glob("*.ipynb"))


def strip(nb) -> nbformat.NotebookNode:
    """The notebook without outputs and run-time metadata (modified in place and returned)."""
    for cell in nb.cells:
        cell.metadata = {k: v for k, v in cell.get("metadata", {}).items() if k in KEEP_CELL_METADATA}
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    return nb


def text_of(nb) -> str:
    s = nbformat.writes(nb)
    return s if s.endswith("\n") else s + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook needs stripping")
    args = ap.parse_args(argv)
    paths = args.paths or all_notebooks()
    dirty = []
    for path in paths:
        before = path.read_text()
        after = text_of(strip(nbformat.reads(before, as_version=4)))
        if after != before:
            dirty.append(path)
            if not args.check:
                path.write_text(after)
    for path in dirty:
        print(f"{'needs stripping' if args.check else 'stripped'}: {path}")
    return 1 if (args.check and dirty) else 0


if __name__ == "__main__":
    sys.exit(main())
