"""The kit as a user gets it: a plain (non-editable) `pip install .`, and the notebooks' first cell
installing it from the repository, as in Colab. Both in a fresh virtual environment that reuses this
one's dependencies (a .pth file), so nothing is downloaded; run from a folder outside the checkout.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

CHECK = textwrap.dedent("""
    import json, lckd_kit
    from pathlib import Path
    from lckd_kit import compare, paths, sweep
    from lckd_kit.checkpoint import load_model
    from lckd_kit.data import find_cases
    here = Path(lckd_kit.__file__).resolve().parent
    model, _ = load_model(paths.shipped_checkpoint())
    methods = {m: type(load_model(paths.method_checkpoint(m))[0]).__name__ for m in ("lckd", "dropout", "hemis", "regionfusion")}
    print(json.dumps({
        "package": str(here),
        "cases": len(find_cases(paths.data_samples_dir())),
        "spacing": list(model.config.spacing or []),
        "methods": methods,
        "compare_methods": compare.load_results().methods,
        "sweep_runs": len(sweep.load_sweep()["runs"]),
        "source_checkout": str(paths.source_checkout()),
    }))
""")


def _venv(path: Path) -> Path:
    """A fresh venv whose site-packages also sees this interpreter's (dependencies, not the kit)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    py = path / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # every installed distribution of ours except the kit itself (its editable install and metadata)
    deps = path / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().replace("-", "_").startswith(("lckd_kit", "__editable__")):
            (deps / entry.name).symlink_to(entry)
    (site / "_deps.pth").write_text(f"{deps}\n")
    return py


def _without_kit_on_path(env_py: Path) -> None:
    # the editable install of this checkout lives in our site-packages: hide it from the new venv
    out = subprocess.run([str(env_py), "-c", "import importlib.util as u; print(u.find_spec('lckd_kit'))"],
                         capture_output=True, text=True, cwd="/")
    if "None" not in out.stdout:
        pytest.skip(f"this environment's lckd_kit is visible from a fresh venv ({out.stdout.strip()}): "
                    "cannot test a clean install here")


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The committed state of the repository (what a user clones)."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout")
    dest = tmp_path_factory.mktemp("clone") / "lckd_kit"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(dest)], check=True)
    return dest


def test_plain_pip_install_brings_data_checkpoints_and_results(clone, tmp_path):
    py = _venv(tmp_path / "venv")
    _without_kit_on_path(py)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                    "--no-build-isolation", str(clone)], check=True, cwd=tmp_path)
    run = subprocess.run([str(py), "-c", CHECK], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert "site-packages" in got["package"] and got["source_checkout"] == "None"
    assert got["cases"] >= 2 and len(got["spacing"]) == 3
    assert got["methods"] == {"lckd": "LCKDNet", "dropout": "DropoutUNet", "hemis": "HeMISNet",
                              "regionfusion": "RegionFusionNet"}
    assert got["compare_methods"][:1] == ["lckd"] and got["sweep_runs"] > 0


def test_notebook_first_cell_installs_the_kit_outside_a_checkout(clone, tmp_path):
    """The Colab path: the setup cell, run where there is no checkout, installs from LCKD_KIT_REPO."""
    py = _venv(tmp_path / "venv")
    _without_kit_on_path(py)
    nb = nbformat.read(ROOT / "notebooks" / "01_data_tour.ipynb", as_version=4)
    setup = next(c for c in nb.cells if c.cell_type == "code").source
    # IPython's %pip is pip in the kernel's interpreter; the cell itself is otherwise plain Python
    pip_line = next(line for line in setup.splitlines() if line.strip().startswith("%pip install"))
    indent = pip_line[:len(pip_line) - len(pip_line.lstrip())]
    args = pip_line.strip()[len("%pip install"):].strip()
    call = (f"{indent}import shlex, subprocess\n{indent}subprocess.run([{sys.executable!r}, '-m', 'pip', '--python', "
            f"sys.executable, 'install', '--no-build-isolation'] + shlex.split(f{args!r}), check=True)")
    script = setup.replace(pip_line, call) + "\nimport lckd_kit\nprint(lckd_kit.__file__)\n"
    # file://localhost/...: pip 23 refuses a git+file:/// requirement ("looks like a path"), not this form
    env = {"LCKD_KIT_REPO": f"file://localhost{clone}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run([str(py), "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "site-packages" in run.stdout.strip().splitlines()[-1]
    again = subprocess.run([str(py), "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert again.returncode == 0 and "pip" not in again.stderr  # installed: the cell changes nothing
