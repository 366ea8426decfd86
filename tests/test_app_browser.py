"""The app: settings, sessions and jobs directly, then a real browser driving a tiny model end to end.

The browser test starts the app in this process on a free port with a tiny checkpoint injected,
and drives /usr/bin/chromium through Playwright. Screenshots go to test-artifacts/.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from workbench.errors import Cancelled, WorkbenchError
from workbench.ui import AppDefaults, build_app
from workbench.ui.jobs import Job
from workbench.ui.models import ModelCache
from workbench.ui.session import FILES_ROOT, Session
from workbench.ui.settings import make_settings
from workbench.ui.work import quantize_one

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TINY = AppDefaults(calib_samples=4, seqlen=64, eval_windows=2, bits=3, group_size=16, max_blocks=0, method="gptq",
                   device="cpu", batch_size=2)
FORM = dict(model="m", calib="wikitext2", calib_samples=4, seqlen=64, eval_windows=2, bits=3, group_size=16,
            max_blocks=0, device="cpu", rows_per_step=8, dx_alpha=0.5, refine_iters=2)


# -- without a browser ------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("calib_samples", 0, "Calibration samples must be at least 1"),
    ("bits", 9, "Bits must be at most 8"),
    ("group_size", 0, "Group size"),
    ("seqlen", 2.5, "Sequence length must be a whole number"),
    ("model", "  ", "Model is empty"),
    ("dx_alpha", 2, "dx alpha"),
    ("device", "tpu", "Device .tpu. is not a device"),
])
def test_invalid_settings_are_refused_with_a_message(field, value, message):
    with pytest.raises(WorkbenchError, match=message):
        make_settings(**{**FORM, field: value})


def test_settings_route_turboboa_options_only_to_turboboa():
    s = make_settings(**{**FORM, "max_blocks": 0, "dx_alpha": 0.25})
    assert s.max_blocks is None and s.heldout_windows == 2
    assert s.config("turboboa").dx_alpha == 0.25 and s.config("gptq").dx_alpha is None
    # the cache key: equal forms give equal, hashable settings
    assert make_settings(**FORM) == make_settings(**FORM) and hash(make_settings(**FORM)) == hash(make_settings(**FORM))


def test_settings_route_learned_rounding_options_to_their_methods():
    s = make_settings(**{**FORM, "iters": 7, "lr": 0.05, "init": "BoA"})
    aespa, brecq, gptq = s.config("aespa"), s.config("brecq"), s.config("gptq")
    assert (aespa.iters, aespa.lr, aespa.init) == (7, 0.05, "boa")
    assert (brecq.iters, brecq.lr, brecq.init) == (7, 0.05, None)     # BRECQ starts from round to nearest
    assert (gptq.iters, gptq.lr, gptq.init) == (None, None, None)
    with pytest.raises(WorkbenchError, match="Rounding steps must be at least 1"):
        make_settings(**{**FORM, "iters": 0})
    with pytest.raises(WorkbenchError, match="Start from must be one of rtn, gptq, boa"):
        make_settings(**{**FORM, "init": "awq"})
    with pytest.raises(WorkbenchError, match="Learning rate must be between"):
        make_settings(**{**FORM, "lr": 0})


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


def test_cancelled_run_leaves_the_shared_model_alone(tiny_checkpoints):
    import torch
    models = ModelCache()
    shared = models.get(tiny_checkpoints["llama"])
    before = {k: v.clone() for k, v in shared.loaded.model.state_dict().items()}
    cancel = threading.Event()
    settings = make_settings(**{**FORM, "model": tiny_checkpoints["llama"]})

    def post(kind, payload=None):
        if kind == "event" and payload[1].kind == "layer_finished":
            cancel.set()
    with pytest.raises(Cancelled):
        quantize_one(shared, settings, "gptq", post, cancel)
    assert all(torch.equal(before[k], v) for k, v in shared.loaded.model.state_dict().items())
    assert models.get(tiny_checkpoints["llama"]) is shared          # loaded once, shared


def test_extra_tabs_hook():
    built = []
    demo = build_app(default_model="unused", defaults=TINY, extra_tabs=[("Extra", lambda: built.append(1))])
    assert built == [1] and any(getattr(b, "label", None) == "Extra" for b in demo.blocks.values())


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
def app_url(tiny_checkpoints):
    _need_browser()
    demo = build_app(default_model=tiny_checkpoints["llama"], defaults=TINY, extra_tabs=[], models=ModelCache())
    port = _free_port()
    FILES_ROOT.mkdir(parents=True, exist_ok=True)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(FILES_ROOT)])
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
    box = page.locator(f"#{elem_id} input").first
    box.fill(str(value))
    box.press("Enter" if elem_id in ("wb-group", "wb-model", "wb-calib") else "Tab")


@pytest.mark.browser
def test_quantize_compare_inspect_in_a_browser(app_url, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(120_000)
    page.goto(app_url)
    page.wait_for_selector("#wb-run")

    # a bad setting is refused in the page, before any work
    _set(page, "wb-samples", 0)
    page.locator("#wb-run").click()
    page.wait_for_selector("#wb-q-status .wb-error")
    assert "Calibration samples must be at least 1" in page.locator("#wb-q-status").inner_text()
    _set(page, "wb-samples", TINY.calib_samples)

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

    # another visitor sees none of it, and their Cancel touches nothing
    other = browser.new_context().new_page()
    other.goto(app_url)
    other.wait_for_selector("#wb-run")
    assert "Perplexity" not in other.locator("#wb-q-ppl").inner_text()
    other.locator("#wb-cancel").click()
    other.wait_for_selector("#wb-q-status :text('nothing is running')")
    other.context.close()

    # a failing run shows its error as a message, not a trace
    _set(page, "wb-group", 48)
    page.locator("#wb-run").click()
    page.wait_for_selector("#wb-q-status .wb-error")
    status = page.locator("#wb-q-status").inner_text()
    assert "does not divide" in status and "Traceback" not in page.content()
    _set(page, "wb-group", TINY.group_size)

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
