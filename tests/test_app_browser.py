"""The app: settings, sessions and jobs directly, then a real browser driving a tiny model end to end.

The browser test starts the app in this process on a free port with a tiny checkpoint injected,
and drives /usr/bin/chromium through Playwright. Screenshots go to test-artifacts/.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest

import workbench
from workbench.errors import Cancelled, WorkbenchError
from workbench.jobs import Job
from workbench.ui import build_app
from workbench.ui.session import Session, files_root
from workbench.workspace import ModelCache

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TINY = dict(calib_samples=4, seqlen=64, eval_windows=2, bits=3, group_size=16, max_blocks=None, device="cpu",
            batch_size=2)


# -- without a browser ------------------------------------------------------------------------

def test_sessions_are_separate_and_survive_gradio_copies():
    import copy
    a, b = Session(), Session()
    assert copy.deepcopy(a) is a and a.results is not b.results
    release = threading.Event()
    a.start(lambda post, cancel: release.wait(5), "wait")
    assert a.busy and not b.busy
    with pytest.raises(WorkbenchError, match="already going"):
        a.start(lambda post, cancel: None, "second")
    assert not b.cancel() and a.cancel()
    release.set()
    a.job.join(5)


def test_job_streams_messages_and_stops_on_cancel():
    def work(post, cancel):
        for i in range(1000):
            post("step", i)
            if cancel.is_set():
                raise Cancelled("stop")
            time.sleep(0.01)
    job = Job(work).start()
    seen = []
    for msg in job.messages(idle=0.05):
        if msg is not None:
            seen.append(msg.kind)
            if len(seen) == 3:
                job.cancel.set()
    assert seen[-1] == "cancelled" and seen.count("step") >= 3
    failing = Job(lambda post, cancel: 1 / 0).start()
    last = [m for m in failing.messages() if m is not None][-1]
    assert last.kind == "error" and isinstance(last.payload, ZeroDivisionError)


def test_job_calls_a_consumer_on_its_thread():
    seen = []
    job = Job(lambda post, cancel: post("step", 1) or 42, on_message=seen.append).start()
    job.join(5)
    assert [(m.kind, m.payload) for m in seen] == [("step", 1), ("result", 42)]
    assert job.state == "done" and job.result == 42 and job.seconds >= 0


def test_the_form_is_derived_from_the_declarations():
    import gradio as gr

    from workbench.config import SETTINGS
    from workbench.ui.form import build_form
    with gr.Blocks():
        form = build_form(TINY)
    assert sorted(form.fields) == sorted(n for n, s in SETTINGS.items() if "app" in s.faces)
    assert form.fields["calib_samples"].value == 4 and form.fields["max_blocks"].value == 0   # 0: all blocks
    assert form.fields["rows_per_step"].value == ""                                     # the method's default
    shown = {n for n, (_, methods) in form.method_fields().items() if "turboboa" in methods}
    assert {"rows_per_step", "dx_alpha", "refine_iters"} <= shown and "iters" not in shown
    assert [u["visible"] for u in form.visibility("brecq")] == [
        "brecq" in methods for _, methods in form.method_fields().values()]


# -- in a browser ---------------------------------------------------------------------------

def _need_browser():
    try:
        import playwright.sync_api  # noqa: F401
        missing = None if Path(CHROMIUM).exists() else f"{CHROMIUM} is missing (apt-get install chromium)"
    except ImportError:
        missing = "playwright is not installed"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser test cannot run in CI: {missing}")
        pytest.skip(missing)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("app-runs")


@pytest.fixture(scope="module")
def app_url(tiny_checkpoints, runs_dir):
    _need_browser()
    demo = build_app(default_model=tiny_checkpoints["llama"], start=TINY, models=ModelCache(), runs_dir=runs_dir)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(files_root())])
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def _shot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def _set(page, elem_id, value):
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Enter" if elem_id in ("wb-group-size", "wb-model", "wb-calib", "wb-device") else "Tab")


@pytest.mark.browser
def test_quantize_compare_inspect_in_a_browser(app_url, browser, runs_dir):
    page = open_app(browser, app_url)

    # a bad setting is refused in the page, before any work
    _set(page, "wb-calib-samples", 0)
    page.locator("#wb-run").click()
    page.wait_for_selector("#wb-q-status .wb-error")
    assert "Calibration samples must be at least 1" in page.locator("#wb-q-status").inner_text()
    _set(page, "wb-calib-samples", TINY["calib_samples"])

    # Quantize with BoA: progress, perplexity, a drawn curve, the table and the downloads
    page.locator("#wb-method").get_by_text("BoA", exact=True).click()
    page.locator("#wb-run").click()
    page.wait_for_selector("#wb-q-ppl :text('Perplexity')")
    assert "full precision" in page.locator("#wb-q-ppl").inner_text()
    assert page.locator("#wb-q-progress .wb-progress[data-state='done']").count() == 1
    assert page.locator("#wb-q-plot .scatterlayer .trace").count() == 1
    assert page.locator("#wb-q-plot .scatterlayer .trace .point").count() == 14      # 2 blocks x 7 layers
    assert "self_attn.q_proj" in page.locator("#wb-q-table").inner_text()
    files = page.locator("#wb-q-files").inner_text()
    assert ".json" in files and ".csv" in files
    _shot(page, "app-quantize.png")

    # save the run under the workspace and download it as a zip: the files `quantize --save` writes
    page.locator("#wb-save-panel").get_by_text("Save the quantized model").click()
    page.locator("#wb-save-name textarea, #wb-save-name input").first.fill("../escape")
    page.locator("#wb-save").click()
    page.wait_for_selector("#wb-save-status .wb-error")
    assert "no slashes" in page.locator("#wb-save-status").inner_text()
    page.locator("#wb-save-name textarea, #wb-save-name input").first.fill("boa-tiny")
    page.locator("#wb-save").click()
    page.wait_for_selector("#wb-save-status .wb-ok")
    assert "pack-quantized to" in page.locator("#wb-save-status").inner_text()
    with page.expect_download() as download:
        page.locator("#wb-save-zip a").first.click()
    zipped = runs_dir / "downloaded.zip"
    download.value.save_as(zipped)
    with zipfile.ZipFile(zipped) as z:
        assert "boa-tiny/config.json" in z.namelist() and "boa-tiny/export.json" in z.namelist()
    back = workbench.load_quantized(runs_dir / "boa-tiny")
    assert len(back.packed) == 14 and back.scheme.bits == TINY["bits"]
    page.locator("#wb-save").click()                      # the folder exists now: refused without Replace
    page.wait_for_selector("#wb-save-status :text('Replace an existing folder')")
    assert str(runs_dir) not in page.locator("#wb-save-status").inner_text()
    _shot(page, "app-save.png")

    # another visitor sees none of it, and their Cancel touches nothing
    other = browser.new_context().new_page()
    other.goto(app_url)
    other.wait_for_selector("#wb-run")
    assert "Perplexity" not in other.locator("#wb-q-ppl").inner_text()
    other.locator("#wb-cancel").click()
    other.wait_for_selector("#wb-q-status :text('nothing is running')")
    other.context.close()

    # a failing run shows its error as a message, not a trace
    _set(page, "wb-group-size", 48)
    page.locator("#wb-run").click()
    page.wait_for_selector("#wb-q-status .wb-error")
    status = page.locator("#wb-q-status").inner_text()
    assert "does not divide" in status and "Traceback" not in page.content()
    _set(page, "wb-group-size", TINY["group_size"])

    # Compare: four curves, four heatmaps, a table; BoA comes from the cache of the Quantize run
    page.get_by_role("tab", name="Compare").click()
    page.locator("#wb-compare-run").click()
    page.wait_for_selector("#wb-c-status .wb-ok")
    table = page.locator("#wb-c-table").inner_text()
    assert all(m in table for m in ("RTN", "GPTQ", "BoA", "TurboBoA")) and "cached" in table
    assert page.locator("#wb-c-curves .scatterlayer .trace").count() == 4
    assert page.locator("#wb-c-heatmaps .heatmaplayer .hm").count() == 4
    _shot(page, "app-compare.png")
    started = time.perf_counter()
    page.locator("#wb-compare-run").click()
    page.wait_for_selector("#wb-c-status :text('from this page')")
    assert time.perf_counter() - started < 10

    # Inspect: spectra of a layer and its heads, conditioning across layers, error vs spectrum
    page.get_by_role("tab", name="Inspect").click()
    page.locator("#wb-i-run").click()
    page.wait_for_selector("#wb-i-status .wb-ok")
    assert page.locator("#wb-i-spectrum .scatterlayer .trace").count() >= 1
    assert page.locator("#wb-i-heads .scatterlayer .trace").count() == 4             # query heads
    assert page.locator("#wb-i-heatmap .heatmaplayer .hm").count() == 1
    assert page.locator("#wb-i-scatter .scatterlayer .trace").count() == 4           # one per method run
    # the activation-outlier picture: a layer's input channels before and after rotation
    page.locator("#wb-i-outliers-run").click()
    page.wait_for_selector("#wb-i-outliers-status .wb-ok")
    assert page.locator("#wb-i-outliers .scatterlayer .trace").count() == 2
    _shot(page, "app-inspect.png")

    # aespa: its rounding options come with it, and a short run draws every layer
    page.get_by_role("tab", name="Quantize").click()
    assert not page.locator("#wb-iters").is_visible()
    page.locator("#wb-method").get_by_text("aespa", exact=True).click()
    page.wait_for_selector("#wb-iters", state="visible")
    assert page.locator("#wb-init").is_visible()
    _set(page, "wb-iters", 10)
    page.locator("#wb-run").click()
    page.wait_for_selector("#wb-q-status :text('aespa finished')")
    assert page.locator("#wb-q-plot .scatterlayer .trace .point").count() == 14
    page.locator("#wb-method").get_by_text("BRECQ", exact=True).click()
    page.wait_for_selector("#wb-init", state="hidden")                               # BRECQ starts from RTN
    assert page.locator("#wb-iters").is_visible()
    page.close()


def _open_offline(browser, path: Path, shot: str) -> tuple[int, int, int]:
    """Open a downloaded page with the network off: (figure divs, figures plotly drew, heatmap panels drawn).
    Fails on any fetch beyond the file itself."""
    context = browser.new_context(offline=True, viewport={"width": 1300, "height": 900})
    page = context.new_page()
    fetched = []
    page.on("request", lambda r: fetched.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_selector(".plotly-graph-div .main-svg")
    page.wait_for_function("[...document.querySelectorAll('.plotly-graph-div')].every(d => d.querySelector("
                           "'.main-svg'))")
    found = page.locator(".plotly-graph-div").count(), page.locator(".plotly-graph-div > div > .svg-container").count()
    heatmaps = page.locator(".heatmaplayer .hm").count()
    _shot(page, shot)
    context.close()
    assert all(u.startswith("file:") for u in fetched), fetched
    return (*found, heatmaps)


@pytest.mark.browser
def test_html_report_buttons_download_a_page_that_opens_offline(app_url, browser, runs_dir):
    page = open_app(browser, app_url)
    page.locator("#wb-q-report").click()                                 # nothing run yet: said, not written
    page.wait_for_selector("#wb-q-report-status .wb-error")
    assert "press Run first" in page.locator("#wb-q-report-status").inner_text()

    # Inspect first: the page then carries the spectra of the model
    page.get_by_role("tab", name="Inspect").click()
    page.locator("#wb-i-run").click()
    page.wait_for_selector("#wb-i-status .wb-ok")
    page.get_by_role("tab", name="Quantize").click()
    page.locator("#wb-method").get_by_text("GPTQ", exact=True).click()
    page.locator("#wb-run").click()
    page.wait_for_selector("#wb-q-ppl :text('Perplexity')")
    page.locator("#wb-q-report").click()
    page.wait_for_selector("#wb-q-report-status .wb-ok")
    note = page.locator("#wb-q-report-status").inner_text()
    assert "1 run and the spectra of 1 model, 12 figures" in note and "opens offline" in note
    with page.expect_download() as download:
        page.locator("#wb-q-report-file a").first.click()
    saved = runs_dir / "quantize-report.html"
    download.value.save_as(saved)
    text = saved.read_text()
    assert "<h1>Quant Workbench report: GPTQ on " in text and "ppl quantized" in text
    divs, drawn, heatmaps = _open_offline(browser, saved, "report-quantize.png")
    assert divs == drawn == 12 and heatmaps == 3          # after and before o_proj, conditioning across layers

    # Compare: one page of the four methods (GPTQ from this page's cache)
    page.get_by_role("tab", name="Compare").click()
    page.locator("#wb-compare-run").click()
    page.wait_for_selector("#wb-c-status .wb-ok")
    page.locator("#wb-c-report").click()
    page.wait_for_selector("#wb-c-report-status .wb-ok")
    assert "4 runs" in page.locator("#wb-c-report-status").inner_text()
    with page.expect_download() as download:
        page.locator("#wb-c-report-file a").first.click()
    saved = runs_dir / "compare-report.html"
    download.value.save_as(saved)
    text = saved.read_text()
    assert all(f"<td>{m}</td>" in text for m in ("RTN", "GPTQ", "BoA", "TurboBoA"))
    divs, drawn, heatmaps = _open_offline(browser, saved, "report-compare.png")
    assert divs == drawn == 12 and heatmaps == 4 + 4 + 1     # a panel per method, twice; conditioning
    _shot(page, "app-compare-report.png")
    page.close()


def open_app(browser, url: str, ready: str | None = "#wb-run", height: int = 1000):
    """A new page on the app at ``url``, waited on until ``ready`` (one of the page's own elements) shows."""
    page = browser.new_page(viewport={"width": 1400, "height": height})
    page.set_default_timeout(120_000)
    page.goto(url)
    if ready is not None:
        page.wait_for_selector(ready)
    return page


def _choose(page, elem_id, option):
    """Pick ``option`` (its shown text, or a pattern of it) from the dropdown ``elem_id``."""
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=isinstance(option, str) or None).click()


@pytest.mark.browser
def test_mixed_precision_plan_in_a_browser(app_url, browser):
    page = open_app(browser, app_url, height=1100)
    page.locator("#wb-plan-panel").get_by_text("Mixed precision: a width per layer").click()

    # a budget below the smallest plan is refused in the panel, in its own words, with the least that fits
    _set(page, "wb-avg-bits", 2)
    page.locator("#wb-plan-make").click()
    page.wait_for_selector("#wb-plan-status .wb-error")
    status = page.locator("#wb-plan-status").inner_text()
    assert "Average bits 2.0 is below the smallest plan" in status and "give Average bits 3.1494 or more" in status

    # Make plan: the heatmap of the widths, the plan beside its budget and its predicted perplexity
    _set(page, "wb-avg-bits", 4)
    page.locator("#wb-plan-make").click()
    page.wait_for_selector("#wb-plan-status .wb-ok")
    assert page.locator("#wb-plan-progress .wb-progress[data-state='done']").count() == 1
    assert page.locator("#wb-plan-plot .heatmaplayer .hm").count() == 1
    summary = page.locator("#wb-plan-summary").inner_text()
    assert "bits per weight for a budget of 4.00" in summary and "Predicted: perplexity" in summary

    # click block 0's down_proj in the heatmap (x: its kind's column, y: its block): the Layer menu takes it
    _choose(page, "wb-plan-layer", re.compile(r"^block 1 · q \(\d bits\)$"))
    page.locator("#wb-plan-plot .nsewdrag").first.scroll_into_view_if_needed()
    cell = page.evaluate("""() => {
        const plot = document.querySelector('#wb-plan-plot .js-plotly-plot');
        const box = plot.querySelector('.nsewdrag').getBoundingClientRect();
        return {x: box.left + plot._fullLayout.xaxis.l2p(6), y: box.top + plot._fullLayout.yaxis.l2p(0)};
    }""")
    page.mouse.click(cell["x"], cell["y"])
    page.wait_for_function("document.querySelector('#wb-plan-layer input').value.startsWith('block 0 · down')")
    # pin it at 8 bits: planned again at once from the measured costs
    page.locator("#wb-plan-pin").click()
    page.wait_for_selector("#wb-plan-summary :text('1 pinned')")
    assert "from the costs measured before" in page.locator("#wb-plan-status").inner_text()
    assert page.locator("#wb-keep-bits textarea, #wb-keep-bits input").first.input_value() == "down@0:8"
    _shot(page, "app-plan.png")

    # Run with this plan: the run fills the tab's results, the measured perplexity joins the predicted one
    page.locator("#wb-plan-run").click()
    page.wait_for_selector("#wb-plan-summary :text('Measured with GPTQ')")
    assert "GPTQ mixed" in page.locator("#wb-q-ppl").inner_text()
    assert page.locator("#wb-q-plot .scatterlayer .trace .point").count() == 14
    _shot(page, "app-plan-run.png")

    # Compare with the plan as a mixed row (its run is the one just made, from this page's cache)
    page.get_by_role("tab", name="Compare").click()
    _choose(page, "wb-compare-mixed", "the plan with GPTQ")
    page.locator("#wb-compare-run").click()
    page.wait_for_selector("#wb-c-status .wb-ok")
    table = page.locator("#wb-c-table").inner_text()
    assert "GPTQ mixed" in table and "bits" in table and "cached" in table
    assert page.locator("#wb-c-curves .scatterlayer .trace").count() == 5
    _shot(page, "app-compare-mixed.png")
    page.close()
