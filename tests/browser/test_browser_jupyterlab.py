"""The cluster widget and the timeline render as widgets in a real JupyterLab, in a real browser.

Starts a private JupyterLab on 127.0.0.1 (see ``labserver``), opens
``cluster_widget.ipynb`` in headless Chromium (Debian's ``chromium``, driven
by Playwright), runs all its cells, and checks what a user would see: the
cluster widget with one row per worker, the timeline as an SVG with bars,
and neither "Loading widget..." nor a widget's text repr. Screenshots go to
``tests/browser/artifacts/`` (git-ignored).

Without Chromium, Playwright or JupyterLab the test is skipped; under CI
(``CI`` set) it fails instead, since ``.ci/run`` installs them.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

import pytest
from labserver import CHROMIUM_ARGS, LabServer, copy_notebook, find_chromium

pytestmark = pytest.mark.browser

HERE = Path(__file__).parent
NOTEBOOK = HERE / "cluster_widget.ipynb"
ARTIFACTS = HERE / "artifacts"
N_WORKERS = 2  # the notebook's %qjam_hosts local:2
N_SLICES = 8  # 400,000 items in slices of 50,000

#: Lab settings: every cell stays in the DOM (no windowing), and no news or update checks.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": '{"windowingMode": "none"}',
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        '{"fetchNews": "false", "checkForUpdates": false}',
}

#: The open notebook's kernel status, code cells' execution counts and error outputs.
NOTEBOOK_STATE_JS = """() => {
  const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.content || !panel.sessionContext) return null;
  const session = panel.sessionContext.session;
  const cells = panel.content.widgets.filter(c => c.model.type === 'code');
  return {
    kernel: session && session.kernel ? session.kernel.status : null,
    counts: cells.map(c => c.model.executionCount),
    errors: cells.flatMap((c, i) => c.model.outputs.toJSON()
      .filter(o => o.output_type === 'error' || o.output_type === 'stream' && o.name === 'stderr'
                   && /Error|Traceback/.test(o.text))
      .map(o => `cell ${i + 1}: ` + (o.output_type === 'error' ? `${o.ename}: ${o.evalue}` : o.text))),
  };
}"""

#: What the widgets rendered: per cluster widget its worker rows, per timeline its SVG bars.
WIDGETS_JS = """() => ({
  clusters: [...document.querySelectorAll('.qjam-cluster')].map(
    el => el.querySelectorAll('.qjam-worker-row').length),
  timelines: [...document.querySelectorAll('.qjam-timeline')].map(el => ({
    bars: el.querySelectorAll('svg rect.qjam-slice').length,
    cached: el.querySelectorAll('svg rect.qjam-slice.cached.done').length})),
  text: document.querySelector('.jp-Notebook') ? document.querySelector('.jp-Notebook').innerText : '',
})"""


def _need(what: str, ok: bool, install: str) -> None:
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing: .ci/run installs it ({install})")
    pytest.skip(f"{what} is not installed ({install})")


@pytest.fixture
def chromium() -> str:
    path = find_chromium()
    _need("Chromium", path is not None, "apt-get install chromium, or set QJAM_CHROMIUM")
    return path


@pytest.fixture
def playwright_api():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    _need("Playwright", sync_playwright is not None, "pip install -e '.[test]'")
    return sync_playwright


@pytest.fixture
def lab(tmp_path):
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        _need("JupyterLab", False, "pip install -e '.[test]'")
    server = LabServer(tmp_path)
    for rel, text in LAB_SETTINGS.items():
        path = tmp_path / "lab" / "settings" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    with server:
        yield server


def test_cluster_widget_and_timeline_render_as_widgets(lab, chromium, playwright_api, tmp_path):
    name = copy_notebook(NOTEBOOK, lab)
    ARTIFACTS.mkdir(exist_ok=True)
    console: list[str] = []
    outside: list[str] = []
    with playwright_api() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1180, "height": 1800}, timeout=60_000,
        )
        try:
            context.route("**/*", lambda route: _local_only(route, outside))
            page = context.pages[0] if context.pages else context.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
            try:
                _run_and_check(page, lab, name, console)
            finally:
                try:
                    page.screenshot(path=str(ARTIFACTS / "jupyterlab.png"), full_page=True)
                except Exception as exc:  # a crashed page: keep the test's own error
                    print(f"no screenshot: {exc}")
        finally:
            context.close()
    assert not outside, f"the page asked for addresses outside 127.0.0.1 (blocked): {outside}"


def _local_only(route, outside: list[str]) -> None:
    """Let requests to this machine through; block and note any other (nothing may leave 127.0.0.0/8)."""
    host = urllib.parse.urlsplit(route.request.url).hostname or ""
    if route.request.url.startswith(("data:", "blob:")) or host.startswith("127.") or host == "localhost":
        route.continue_()
    else:
        outside.append(route.request.url)
        route.abort()


def _run_and_check(page, lab: LabServer, name: str, console: list[str]) -> None:
    page.goto(lab.lab_url(name), wait_until="domcontentloaded", timeout=60_000)
    # The notebook is open and its kernel started and idle.
    page.wait_for_function(f"() => {{ const s = ({NOTEBOOK_STATE_JS})(); return s && s.kernel === 'idle'; }}",
                           timeout=60_000, polling=250)
    page.evaluate("() => window.jupyterapp.shell.collapseLeft()")  # the file browser, out of the screenshot
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    # Every code cell ran (or one failed) and the kernel is idle again.
    try:
        page.wait_for_function(
            f"() => {{ const s = ({NOTEBOOK_STATE_JS})(); return s && (s.errors.length > 0 "
            "|| s.kernel === 'idle' && s.counts.every(n => n !== null)); }",
            timeout=90_000, polling=250)
    except Exception as exc:
        raise AssertionError(f"the notebook did not finish running: {page.evaluate(NOTEBOOK_STATE_JS)}; "
                             f"browser console errors: {console}\nserver log:\n{lab.log_tail()}") from exc
    state = page.evaluate(NOTEBOOK_STATE_JS)
    assert not state["errors"], f"cells failed: {state['errors']}"

    # Widget views are built from the kernel's comm messages, after the cells ran: poll until
    # they show what the last call did, then say precisely what is missing if they never do.
    want = (f"w.clusters.length > 0 && w.clusters.every(n => n === {N_WORKERS}) && w.timelines.length > 0 && "
            f"w.timelines.every(t => t.bars === {N_SLICES} && t.cached === {N_SLICES})")
    try:
        page.wait_for_function(f"() => {{ const w = ({WIDGETS_JS})(); return {want}; }}", timeout=30_000, polling=250)
    except Exception:
        pass  # the assertions below say what is missing
    widgets = page.evaluate(WIDGETS_JS)
    shown = widgets["text"]
    assert "Loading widget" not in shown, f"a widget never rendered; browser console errors: {console}"
    assert "Error displaying widget" not in shown, f"browser console errors: {console}"
    assert "VBox(children=" not in shown and "HBox(children=" not in shown, \
        f"a widget showed as its text repr, not as a widget:\n{shown[:2000]}"
    assert "sums agree" in shown
    assert widgets["clusters"], f"no element with class qjam-cluster; the notebook shows:\n{shown[:2000]}"
    assert all(n == N_WORKERS for n in widgets["clusters"]), \
        f"qjam-worker-row elements per cluster widget: {widgets['clusters']}, expected {N_WORKERS} each"
    assert widgets["timelines"], f"no element with class qjam-timeline; the notebook shows:\n{shown[:2000]}"
    # The timelines show the last call: one bar per slice, every slice served from the cache.
    assert all(t["bars"] == N_SLICES for t in widgets["timelines"]), \
        f"slice bars (svg rect.qjam-slice) per timeline: {widgets['timelines']}, expected {N_SLICES}"
    assert all(t["cached"] == N_SLICES for t in widgets["timelines"]), \
        f"cached, done slice bars per timeline: {widgets['timelines']}, expected all {N_SLICES}"

    cluster = page.locator(".qjam-cluster").first
    cluster.scroll_into_view_if_needed()
    cluster.screenshot(path=str(ARTIFACTS / "cluster_widget.png"))
