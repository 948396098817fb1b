#!/usr/bin/env python
"""Copy the repository's address from ``pyproject.toml`` into the notebooks and the README.

    python tools/set_repo_url.py            # rewrite the Colab badges and the notebooks' setup cells
    python tools/set_repo_url.py --check    # exit 1 if anything disagrees with pyproject.toml

The address lives in one place, ``[project.urls] Repository`` in ``pyproject.toml``. A fork changes
it there and runs this script: every Colab badge (``colab.research.google.com/github/<org>/<repo>``)
and every setup cell's default ``REPO_URL`` then point at the fork.
"""
from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BADGE = re.compile(r"colab\.research\.google\.com/github/[^/\s]+/[^/\s]+/blob/")
SETUP = re.compile(r'(REPO_URL = os\.environ\.get\("LCKD_KIT_REPO", ")[^"]*("\))')


def repository() -> str:
    url = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    return url.rstrip("/").removesuffix(".git")


def files() -> list[Path]:
    nbs = ROOT / "notebooks"
    return sorted(nbs.glob("*.ipynb")) + sorted((nbs / "solutions").glob("*.ipynb")) + [ROOT / "README.md",
                                                                                         nbs / "README.md"]


def rewrite(text: str, url: str) -> str:
    org_repo = url.split("github.com/", 1)[1]
    text = BADGE.sub(f"colab.research.google.com/github/{org_repo}/blob/", text)
    return SETUP.sub(lambda m: m.group(1) + url + m.group(2), text)


def updated(path: Path, url: str) -> str:
    """The file's text with ``url`` everywhere it belongs (notebooks edited cell by cell)."""
    before = path.read_text()
    if path.suffix != ".ipynb":
        return rewrite(before, url)
    import nbformat

    nb = nbformat.reads(before, as_version=4)
    changed = False
    for cell in nb.cells:
        new = rewrite(cell.source, url)
        changed |= new != cell.source
        cell.source = new
    if not changed:
        return before
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file disagrees")
    args = ap.parse_args(argv)
    url = repository()
    if "github.com/" not in url:
        print(f"pyproject.toml: Repository {url!r} is not a github.com address (Colab opens GitHub notebooks)")
        return 1
    stale = []
    for path in files():
        before = path.read_text()
        after = updated(path, url)
        if after != before:
            stale.append(path)
            if not args.check:
                path.write_text(after)
    for path in stale:
        print(f"{'disagrees with pyproject.toml' if args.check else 'updated'}: {path.relative_to(ROOT)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
