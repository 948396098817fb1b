"""Browser tests: JupyterLab + headless Chromium, run by ``make test-e2e`` (tests/e2e/run.sh).

They are skipped unless ``LCKD_E2E=1`` (run.sh sets it), so the plain ``make test`` (``pytest``
over ``tests/``) collects them, reports them as skipped and needs neither a browser nor Playwright:
nothing here imports Playwright at collection time.

Fixtures (all session-scoped, always torn down):

* ``lab_root``   -- a temporary copy of the repository layout with FAST-mode copies of the notebooks;
* ``lab_server`` -- ``jupyter lab`` on a free port with a random token, in its own process group;
  teardown shuts its kernels down, stops the group and kills any kernel left behind;
* ``browser``    -- Playwright's Chromium driving the system ``/usr/bin/chromium``
  (``LCKD_CHROMIUM`` overrides the path); Playwright never downloads a browser.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
NOTEBOOKS = ("01_data_tour.ipynb", "04_missing_modality_explorer.ipynb")
#: top-level repository entries the notebooks may reach with relative paths (``../data_samples``)
LINKED = ("data_samples", "checkpoints", "lckd_kit", "docs", "README.md", "pyproject.toml")
SERVER_START_TIMEOUT = float(os.environ.get("LCKD_E2E_SERVER_TIMEOUT", "90"))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LCKD_E2E") == "1":
        return
    skip = pytest.mark.skip(reason="browser test: run `make test-e2e` (or LCKD_E2E=1 bash tests/e2e/run.sh)")
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item, so that fixtures can take a screenshot on failure."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


# ----------------------------------------------------------------------------------------------
# notebooks: FAST copies in a mirror of the repository layout


def inject_fast(nb: dict, name: str) -> dict:
    """Papermill-style: a cell ``FAST = True`` right after the cell tagged ``parameters``; saved outputs
    and execution counts are cleared so that everything on the page comes from this run."""
    cells = nb["cells"]
    for c in cells:
        if c.get("cell_type") == "code":
            c["outputs"], c["execution_count"] = [], None
    idx = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not idx:
        raise AssertionError(f"{name}: no cell tagged 'parameters' -- the e2e test needs one to set FAST = True")
    cells.insert(idx[0] + 1, {
        "cell_type": "code", "execution_count": None, "id": "e2e-injected-parameters",
        "metadata": {"tags": ["injected-parameters"]}, "outputs": [],
        "source": "# injected by tests/e2e: run the notebook in its fast mode\nFAST = True\n",
    })
    return nb


def synthetic_explorer_notebook() -> dict:
    """A stand-in notebook (``LCKD_E2E_SYNTHETIC=1``): the Explorer on a 32³ phantom, random small model,
    and a SliceViewer -- tests the widgets in the browser independently of the real notebooks."""
    src = [
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from lckd_kit import phantom\n"
        "from lckd_kit.labels import labels_to_regions\n"
        "from lckd_kit.transforms import normalize_image\n"
        "from lckd_kit.model import build_model\n"
        "from lckd_kit.widgets import Explorer, ExplorerState, SliceViewer\n"
        "raw = phantom.make_case(0, grid=32)\n"
        "image = normalize_image(raw['image'].astype('float32'))\n"
        "label = labels_to_regions(raw['label'], 'brats2018')\n"
        "torch.manual_seed(0)\n"
        "model = build_model('small').eval()",
        "SliceViewer(image, label, raw['spacing'], name='phantom 0')",
        "Explorer(ExplorerState(model, image, label, raw['spacing'], name='phantom 0', normalized=True))",
    ]
    return {
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [],
                   "source": s} for i, s in enumerate(src)],
    }


@pytest.fixture(scope="session")
def lab_root(tmp_path_factory) -> Path:
    """``<tmp>/notebooks/*.ipynb`` (FAST copies) beside links to the repository's data folders, so that
    paths relative to a notebook resolve as in the repository while anything a notebook writes next to
    itself lands in the temporary folder."""
    root = tmp_path_factory.mktemp("lab")
    nbdir = root / "notebooks"
    nbdir.mkdir()
    for entry in LINKED:
        if (REPO / entry).exists():
            (root / entry).symlink_to(REPO / entry)
    for name in NOTEBOOKS:
        src = REPO / "notebooks" / name
        if src.exists():
            nb = inject_fast(json.loads(src.read_text(encoding="utf-8")), name)
            (nbdir / name).write_text(json.dumps(nb, indent=1), encoding="utf-8")
    if os.environ.get("LCKD_E2E_SYNTHETIC") == "1":
        (nbdir / "e2e_synthetic_explorer.ipynb").write_text(json.dumps(synthetic_explorer_notebook(), indent=1),
                                                             encoding="utf-8")
    return root


# ----------------------------------------------------------------------------------------------
# the JupyterLab server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lab_settings(settings_dir: Path) -> None:
    """User settings of the throw-away profile: no news/update pop-ups (no network anyway)."""
    d = settings_dir / "@jupyterlab" / "apputils-extension"
    d.mkdir(parents=True, exist_ok=True)
    (d / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}), encoding="utf-8")


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (our private runtime dir: our kernels)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            pids.append(int(p.name))
    return pids


class LabServer:
    def __init__(self, root: Path, work: Path):
        self.root = root
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.runtime = work / "runtime"
        self.log_path = ARTIFACTS / "jupyter-server.log"
        settings, workspaces = work / "settings", work / "workspaces"
        for d in (self.runtime, settings, workspaces):
            d.mkdir(parents=True, exist_ok=True)
        _lab_settings(settings)
        env = dict(os.environ)
        env.update({
            "JUPYTER_RUNTIME_DIR": str(self.runtime),
            "JUPYTER_CONFIG_DIR": str(work / "config"),  # ignore ~/.jupyter
            "IPYTHONDIR": str(work / "ipython"),
            "JUPYTER_PLATFORM_DIRS": "1",
            "MPLBACKEND": "Agg",
            "PYTHONUNBUFFERED": "1",
            # the kernels import this working tree's kit even where `pip install -e .` has not run yet
            "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        })
        jupyter = Path(sys.executable).parent / "jupyter"
        self.cmd = [
            str(jupyter), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
            "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
            f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={workspaces}",
            "--LabApp.extension_manager=readonly",  # no PyPI look-ups from the extension manager
        ]
        if os.geteuid() == 0:  # CI and the dev machines run as root
            self.cmd.append("--allow-root")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def api(self, path: str, method: str = "GET", timeout: float = 10.0):
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"

    def wait_ready(self) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < SERVER_START_TIMEOUT:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.api("/api/status", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"jupyter lab did not answer within {SERVER_START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def kernels(self) -> list[dict]:
        try:
            return self.api("/api/kernels")
        except Exception:  # noqa: BLE001 - diagnostics only
            return []

    def shutdown_kernel(self, path: str) -> None:
        """End the session (and kernel) of one notebook, e.g. once its test is done."""
        try:
            for s in self.api("/api/sessions"):
                if s.get("path") == path:
                    self.api(f"/api/sessions/{s['id']}", method="DELETE", timeout=15)
        except Exception:  # noqa: BLE001 - best effort; stop() ends everything anyway
            pass

    def stop(self) -> None:
        try:  # kernels live in their own sessions: ask the server to shut them down first
            for k in self.kernels():
                try:
                    self.api(f"/api/kernels/{k['id']}", method="DELETE", timeout=15)
                except Exception:  # noqa: BLE001
                    pass
        finally:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                if self.proc.poll() is not None:
                    break
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                except subprocess.TimeoutExpired:
                    pass
            # any kernel still alive was started by this server: its connection file is in our runtime dir
            for pid in _pids_using(str(self.runtime)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._log.close()


@pytest.fixture(scope="session")
def lab_server(lab_root, tmp_path_factory):
    server = LabServer(lab_root, tmp_path_factory.mktemp("jupyter"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------
# the browser


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    exe = os.environ.get("LCKD_CHROMIUM", "/usr/bin/chromium")
    if not Path(exe).exists():
        pytest.fail(f"no Chromium at {exe}: run tests/e2e/run.sh (installs Debian's chromium) or set LCKD_CHROMIUM")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True,
                              args=["--disable-dev-shm-usage", "--disable-gpu", "--no-first-run"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session", autouse=True)
def _clean_artifacts():
    if os.environ.get("LCKD_E2E") == "1":
        shutil.rmtree(ARTIFACTS, ignore_errors=True)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield
