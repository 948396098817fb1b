"""The explorer the way learners use it: JupyterLab in a real (headless) browser.

Each test opens a FAST copy of a notebook in JupyterLab, runs all cells from the Run menu's command,
waits for the widgets, then clicks and drags like a learner and checks what the page shows:

* notebook 04: a modality toggle and the slice slider change the rendered PNG and the Dice readout;
  deselecting all four modalities shows the warning, reselecting hides it again;
* notebook 01: the slice viewer's slider changes its image;
* no cell shows a traceback or an error, and the browser console logs no error.

Screenshots (and the server log) go to tests/e2e/artifacts/ for a person to look at.
Skipped unless LCKD_E2E=1 (see conftest.py); run with ``make test-e2e``.
"""
from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

pytestmark = pytest.mark.e2e

RUN_ALL_TIMEOUT = float(os.environ.get("LCKD_E2E_RUN_TIMEOUT", "420"))  # s, all cells of one notebook
UPDATE_TIMEOUT = float(os.environ.get("LCKD_E2E_UPDATE_TIMEOUT", "60"))  # s, one widget round trip
VIEWPORT = {"width": 1400, "height": 1000}
MODALITIES = ("flair", "t1", "t1ce", "t2")

#: console messages of type "error" that are not the kit's fault, each with the reason.
#: Keep this list short and explicit; everything else fails the test.
BENIGN_CONSOLE_ERRORS: tuple[tuple[str, str], ...] = (
    # none needed so far
)
#: The browser may load nothing but the local JupyterLab: the test machines (and a workshop room) are
#: offline. Requests elsewhere (e.g. the "Open in Colab" badge image in a markdown cell) are aborted,
#: listed in the test output and in artifacts/<notebook>-external-requests.txt, and the console error
#: each one causes ("Failed to load resource") is not counted as the kit's error.


class KernelDied(AssertionError):
    pass


class Lab:
    """One notebook open in JupyterLab, with the console log and the checks a learner would make."""

    def __init__(self, browser, server, notebook: str, shot_prefix: str):
        self.server = server
        self.notebook = notebook
        self.path = f"notebooks/{notebook}"
        self.workspace = f"e2e-{shot_prefix}-{secrets.token_hex(4)}"
        self.prefix = shot_prefix
        self.root = None
        self.console_errors: list[str] = []
        self.external_requests: list[str] = []
        self.context = browser.new_context(viewport=VIEWPORT)
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda err: self.console_errors.append(f"pageerror: {err}"))

    def _is_local(self, url: str) -> bool:
        return url.startswith((self.server.url, "blob:", "data:", "about:"))

    def _route(self, route) -> None:
        url = route.request.url
        if self._is_local(url):
            route.continue_()
        else:
            self.external_requests.append(url)
            route.abort("internetdisconnected")

    def _on_console(self, msg) -> None:
        if msg.type != "error":
            return
        url = (msg.location or {}).get("url", "")
        if msg.text.startswith("Failed to load resource") and url and not self._is_local(url):
            return  # an aborted external request (see above): recorded in external_requests
        text = f"{msg.text} (at {url})" if url else msg.text
        if any(re.search(pat, text) for pat, _ in BENIGN_CONSOLE_ERRORS):
            return
        self.console_errors.append(f"console.error: {text}")

    def close(self) -> None:
        if self.external_requests:
            urls = sorted(set(self.external_requests))
            print(f"\n{self.notebook}: blocked requests outside JupyterLab (offline machine): " + ", ".join(urls))
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / f"{self.prefix}-external-requests.txt").write_text("\n".join(urls) + "\n")
        self.context.close()
        self.server.shutdown_kernel(self.path)  # frees the CPU for the next notebook

    # -- opening and running ---------------------------------------------------------------------

    def js(self, body: str, arg=None):
        """Evaluate ``body`` with ``panel`` (this notebook's NotebookPanel, or undefined) and ``arg`` in scope."""
        return self.page.evaluate(
            f"""([path, arg]) => {{
                   const app = window.jupyterapp;
                   const panel = app && Array.from(app.shell.widgets('main'))
                                           .find(w => w.context && w.context.path === path);
                   {body}
               }}""", [self.path, arg])

    def open(self) -> None:
        # a workspace of its own: nothing restored from an earlier test (tabs of other notebooks)
        url = (f"{self.server.url}/lab/workspaces/{self.workspace}/tree/{self.path}"
               f"?token={self.server.token}")
        self.page.goto(url, wait_until="domcontentloaded", timeout=90_000)
        self.page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell", timeout=90_000)
        self.page.wait_for_function(
            """path => { const p = Array.from(window.jupyterapp.shell.widgets('main'))
                                      .find(w => w.context && w.context.path === path);
                         const k = p && p.context.isReady && p.sessionContext.session
                                   && p.sessionContext.session.kernel;
                         return k && k.status === 'idle'; }""", arg=self.path, timeout=120_000)
        panel_id = self.js("return panel.id;")
        self.root = self.page.locator(f'[id="{panel_id}"]')
        self.root.locator(".jp-Cell").first.wait_for(timeout=30_000)

    def run_all(self) -> float:
        """Run > Run All Cells (the command behind the menu item) on this notebook; returns the seconds.

        The command's promise resolves when the last cell finished, or early (with false) when a cell
        failed; the kernel is checked while waiting."""
        t0 = time.monotonic()
        self.js("""app.shell.activateById(panel.id);
                   window.__e2eRun = {done: false, ok: null, error: null};
                   app.commands.execute('notebook:run-all-cells').then(
                       ok => { window.__e2eRun.done = true; window.__e2eRun.ok = ok; },
                       err => { window.__e2eRun.done = true; window.__e2eRun.error = String(err); });""")
        while True:
            state = self.page.evaluate("() => window.__e2eRun")
            self.check_kernel()
            if state["done"]:
                break
            if time.monotonic() - t0 > RUN_ALL_TIMEOUT:
                self.screenshot("timeout")
                raise AssertionError(f"{self.notebook}: cells still running after {RUN_ALL_TIMEOUT:.0f} s; "
                                     f"raise LCKD_E2E_RUN_TIMEOUT if the machine is slow")
            time.sleep(0.5)
        if state["error"] or state["ok"] is False:
            self.screenshot("run-all-failed")
            errors = self.errors_in_outputs()
            raise AssertionError(f"{self.notebook}: Run All stopped ({state['error'] or 'a cell failed'}):\n"
                                 + ("\n---\n".join(errors) or "(no error text on the page)"))
        unrun = self.js("""return panel.content.widgets.filter(c => c.model.type === 'code'
                               && c.model.sharedModel.getSource().trim() !== ''
                               && c.model.executionCount === null).length;""")
        assert unrun == 0, f"{self.notebook}: Run All finished but {unrun} code cell(s) did not run"
        return time.monotonic() - t0

    def check_kernel(self) -> None:
        """Fail with a clear message when the kernel died (crash, out of memory) or restarted."""
        status = self.js("""const k = panel && panel.sessionContext.session && panel.sessionContext.session.kernel;
                            return k ? k.status : 'none';""")
        dialog = self.page.locator(".jp-Dialog")
        dialog_text = dialog.first.inner_text() if dialog.count() else ""
        if status in ("dead", "restarting", "autorestarting", "none") or re.search(r"died|Kernel Restarting",
                                                                                   dialog_text):
            self.screenshot("kernel-died")
            raise KernelDied(
                f"{self.notebook}: the kernel died (status {status!r}; dialog: {dialog_text.strip()[:300]!r}). "
                f"Often out of memory or a crash in native code. Last lines of the server log "
                f"({self.server.log_path}):\n{self.server.log_tail(30)}")

    # -- what the page shows -------------------------------------------------------------------

    def errors_in_outputs(self) -> list[str]:
        """Tracebacks/errors shown in this notebook's outputs (error outputs use the stderr mime type too)."""
        root = self.root if self.root is not None else self.page
        texts = root.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"], '
                             ".jp-OutputArea-output .jp-RenderedText").evaluate_all("els => els.map(e => e.textContent)")
        bad = [t.strip()[-1500:] for t in texts if "Traceback" in t or re.search(r"\b[A-Z]\w*Error\b", t)]
        return sorted(set(bad))

    def stderr_notes(self) -> list[str]:
        """Non-error stderr outputs (warnings, progress bars): printed for a person to judge."""
        texts = self.root.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
                                  ).evaluate_all("els => els.map(e => e.textContent)")
        return [" ".join(t.split())[:300] for t in texts if t.strip()]

    def assert_clean(self, when: str) -> None:
        self.check_kernel()
        errors = self.errors_in_outputs()
        assert not errors, f"{self.notebook} {when}: error output in the notebook:\n" + "\n---\n".join(errors)
        assert not self.console_errors, (f"{self.notebook} {when}: browser console errors:\n"
                                         + "\n".join(self.console_errors))

    def screenshot(self, name: str, selector: str | None = None, until: str | None = None) -> None:
        """A screenshot of the window, or of the element ``selector`` (down to the bottom of ``until``,
        an element inside it, when given: the controls and the image without the plots below them)."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.prefix}-{name}.png"
        try:
            if selector is None:
                self.page.screenshot(path=str(path))
                return
            # JupyterLab scrolls inside its notebook panel, so an element taller than the window is cut
            # off: make the window tall enough for the element, then restore it.
            base = self.root if self.root is not None else self.page
            loc = base.locator(selector).first
            end = loc.locator(until).first if until else loc
            box, last = loc.bounding_box(), end.bounding_box()
            height = int(last["y"] + last["height"] - box["y"]) + 8
            if height + 250 > VIEWPORT["height"]:
                self.page.set_viewport_size({"width": VIEWPORT["width"], "height": min(height + 250, 4000)})
                self.page.wait_for_timeout(300)  # let JupyterLab re-lay out
            try:
                loc.evaluate("el => el.scrollIntoView({block: 'start'})")  # no waiting for 'stable' (3-D plots)
                self.page.wait_for_timeout(200)
                box = loc.bounding_box()
                self.page.screenshot(path=str(path), clip={"x": box["x"], "y": box["y"], "width": box["width"],
                                                           "height": min(height, box["height"])})
            finally:
                self.page.set_viewport_size(VIEWPORT)
        except Exception as err:  # noqa: BLE001 - a screenshot must never hide the real failure
            print(f"screenshot {path.name} failed: {err}")

    def widget(self, css: str):
        """The element of the (first) widget with CSS class ``css`` in this notebook; the class sits on the
        widget's own element (the <img> of an Image, the <button> of a ToggleButton)."""
        loc = self.root.locator(f".{css}").first
        try:
            loc.wait_for(state="attached", timeout=UPDATE_TIMEOUT * 1000)
        except Exception:  # noqa: BLE001
            plain = self.root.locator(".jp-OutputArea-output[data-mime-type='text/plain']").evaluate_all(
                "els => els.map(e => e.textContent)")
            hint = [t for t in plain if re.search(r"\b(VBox|HBox|Image|IntSlider)\(", t)]
            self.screenshot(f"missing-{css}")
            raise AssertionError(
                f"{self.notebook}: no element .{css} in the notebook"
                + (f"; widgets were shown as text ({hint[0][:200]!r}): the ipywidgets front-end "
                   f"(jupyterlab_widgets) did not load" if hint else "")) from None
        return loc

    def image_digest(self, css: str) -> str:
        """SHA-256 of the PNG the Image widget shows (its src is a blob: URL that changes on every update)."""
        return self.widget(css).evaluate(
            """async el => { const img = el.tagName === 'IMG' ? el : el.querySelector('img');
                             if (!img || !img.src) return '';
                             const buf = await (await fetch(img.src)).arrayBuffer();
                             const h = await crypto.subtle.digest('SHA-256', buf);
                             return buf.byteLength + ':' + Array.from(new Uint8Array(h))
                                   .map(b => b.toString(16).padStart(2, '0')).join(''); }""")

    def scroll_to_top_of(self, css: str) -> None:
        """Scroll the notebook so that the widget's top is at the top of the window (as a learner would)."""
        self.widget(css).evaluate("el => el.scrollIntoView({block: 'start'})")
        self.page.wait_for_timeout(300)

    @staticmethod
    def is_active(toggle) -> bool:
        """An ipywidgets ToggleButton is pressed (value True) when it carries the class mod-active."""
        return "mod-active" in (toggle.get_attribute("class") or "").split()

    @staticmethod
    def shown(loc) -> bool:
        """Displayed (no ``display: none`` on it or an ancestor), whether or not it is scrolled into view."""
        return loc.evaluate("el => el.offsetParent !== null && getComputedStyle(el).display !== 'none'")

    def text(self, css: str) -> str:
        """The text a learner reads (textContent: also right for cells the browser has not painted yet)."""
        return " ".join((self.widget(css).text_content() or "").split())

    def wait_for(self, what: str, predicate, timeout: float = UPDATE_TIMEOUT):
        """Poll ``predicate()`` until it returns something truthy; checks the kernel while waiting."""
        t0 = time.monotonic()
        while True:
            value = predicate()
            if value:
                return value
            self.check_kernel()
            if time.monotonic() - t0 > timeout:
                self.screenshot("timeout-" + re.sub(r"\W+", "-", what)[:40])
                raise AssertionError(f"{self.notebook}: {what} did not happen within {timeout:.0f} s")
            time.sleep(0.2)

    def image_changes(self, css: str, before: str, what: str) -> str:
        return self.wait_for(f"{what} changes the image", lambda: (d := self.image_digest(css)) not in ("", before) and d)

    def move_slider(self, css: str) -> tuple[int, int]:
        """Move an ipywidgets IntSlider one step with the arrow key on its handle, as a learner can;
        returns (old, new). One key press is one change sent to the kernel (``continuous_update=False``)
        and so one render: the next image is the final one, not an intermediate slice."""
        slider = self.widget(css)
        handle = slider.locator(".noUi-handle").first
        handle.scroll_into_view_if_needed()
        old = int(float(handle.get_attribute("aria-valuenow")))
        hi = int(float(handle.get_attribute("aria-valuemax")))
        key, new = ("ArrowRight", old + 1) if old < hi else ("ArrowLeft", old - 1)
        handle.focus()
        handle.press(key)
        readout = slider.locator(".widget-readout").first
        self.wait_for(f"the slider readout shows {new}", lambda: (readout.text_content() or "").strip() == str(new))
        return old, new


@pytest.fixture
def lab(request, browser, lab_server):
    opened: list[Lab] = []

    def _open(notebook: str, prefix: str) -> Lab:
        lab = Lab(browser, lab_server, notebook, prefix)
        opened.append(lab)
        lab.open()
        return lab

    yield _open
    for lab in opened:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            lab.screenshot("failure")
        lab.close()


def _require(notebook: str) -> None:
    if os.environ.get("LCKD_E2E_SYNTHETIC") == "1":
        return
    if not (REPO / "notebooks" / notebook).exists():
        pytest.fail(f"notebooks/{notebook} does not exist")


def _nb(name: str) -> str:
    return "e2e_synthetic_explorer.ipynb" if os.environ.get("LCKD_E2E_SYNTHETIC") == "1" else name


def _dice_numbers(text: str) -> list[str]:
    return re.findall(r"\b(?:ET|TC|WT)\s+([01]\.\d{3})", text)


def test_missing_modality_explorer(lab):
    name = _nb("04_missing_modality_explorer.ipynb")
    _require("04_missing_modality_explorer.ipynb")
    t0 = time.monotonic()
    page = lab(name, "04")
    opened = time.monotonic() - t0
    ran = page.run_all()
    page.assert_clean("after Run All")
    print(f"\n04: opened in {opened:.1f} s, all cells ran in {ran:.1f} s")
    for note in page.stderr_notes():
        print(f"04 stderr output: {note}")
    print(f"04: {page.root.locator('.js-plotly-plot').count()} plotly figure(s) on the page, "
          f"{page.root.locator('.js-plotly-plot .gl-container canvas, .js-plotly-plot canvas').count()} canvas(es)")
    t_interact = time.monotonic()

    png0 = page.image_digest("lckd-image")
    dice0 = page.text("lckd-dice")
    assert _dice_numbers(dice0) or "no ground truth" in dice0, f"unexpected Dice readout {dice0!r}"
    page.scroll_to_top_of("lckd-explorer")
    page.screenshot("01-notebook")
    page.screenshot("02-explorer", ".lckd-explorer")

    # a learner toggles T1ce (notebook 04 leaves the explorer "without T1ce": then this adds it back)
    toggle = page.widget("lckd-toggle-t1ce")
    toggle.scroll_into_view_if_needed()
    had_t1ce = page.is_active(toggle)
    toggle.click()
    what = "dropping T1ce" if had_t1ce else "adding T1ce"
    png1 = page.image_changes("lckd-image", png0, what)
    dice1 = page.wait_for(f"the Dice readout changes after {what}", lambda: (t := page.text("lckd-dice")) != dice0 and t)
    subset = dice1.split(":")[0]
    assert ("T1ce" in subset) != had_t1ce, f"after {what} the Dice readout names {subset!r}"
    assert page.is_active(toggle) != had_t1ce, f"the T1ce button does not show the new state after {what}"
    if _dice_numbers(dice1) == _dice_numbers(dice0):
        print(f"note: Dice numbers unchanged after {what}: {dice0!r} -> {dice1!r}")
    page.screenshot("03-t1ce-toggled", ".lckd-explorer", until=".lckd-image")

    # ... and moves the slice slider
    old, new = page.move_slider("lckd-slice-slider")
    assert old != new
    png2 = page.image_changes("lckd-image", png1, f"moving the slice slider {old} -> {new}")
    page.screenshot("04-slice-moved", ".lckd-explorer", until=".lckd-image")
    assert png2 not in (png0, png1)

    # nothing selected: the warning appears, the view keeps the last valid selection
    last_valid = png2
    for m in MODALITIES:
        t = page.widget(f"lckd-toggle-{m}")
        if page.is_active(t):
            before = page.text("lckd-dice")
            last_valid = page.image_digest("lckd-image")
            t.click()
            page.wait_for(f"deselecting {m} updates the readout", lambda: page.text("lckd-dice") != before)
    warning = page.widget("lckd-warning")
    page.wait_for("the no-modality warning appears", lambda: page.shown(warning))
    assert "Select at least one modality" in page.text("lckd-warning"), page.text("lckd-warning")
    page.screenshot("05-nothing-selected", ".lckd-explorer", until=".lckd-image")
    png_none = page.image_digest("lckd-image")
    assert png_none == last_valid, "with nothing selected the image should keep the last valid view"

    # reselect all four: warning gone, a fresh render
    for m in MODALITIES:
        t = page.widget(f"lckd-toggle-{m}")
        before = page.text("lckd-dice")
        t.click()
        page.wait_for(f"selecting {m} updates the readout", lambda: page.text("lckd-dice") != before)
    page.wait_for("the warning disappears", lambda: not page.shown(warning))
    png3 = page.image_changes("lckd-image", png_none, "reselecting all modalities")
    assert _dice_numbers(page.text("lckd-dice")), page.text("lckd-dice")
    page.screenshot("06-all-reselected", ".lckd-explorer", until=".lckd-image")
    if had_t1ce:  # all four at the new slice: not seen before
        assert png3 != png2
    else:  # all four at the new slice, as after adding T1ce: the same view, the same picture
        assert png3 == png2, "the same subset and slice should render the same image"
    page.assert_clean("after the interactions")
    print(f"04: interactions and screenshots in {time.monotonic() - t_interact:.1f} s")


def test_data_tour_slice_viewer(lab):
    name = _nb("01_data_tour.ipynb")
    _require("01_data_tour.ipynb")
    t0 = time.monotonic()
    page = lab(name, "01")
    opened = time.monotonic() - t0
    ran = page.run_all()
    page.assert_clean("after Run All")
    print(f"\n01: opened in {opened:.1f} s, all cells ran in {ran:.1f} s")
    for note in page.stderr_notes():
        print(f"01 stderr output: {note}")

    png0 = page.image_digest("lckd-viewer-image")
    page.scroll_to_top_of("lckd-viewer")
    page.screenshot("01-notebook")
    page.screenshot("02-viewer", ".lckd-viewer")
    old, new = page.move_slider("lckd-viewer-slider")
    png1 = page.image_changes("lckd-viewer-image", png0, f"moving the viewer slider {old} -> {new}")
    page.screenshot("03-viewer-slice-moved", ".lckd-viewer")
    assert png1 != png0
    page.assert_clean("after the interactions")
