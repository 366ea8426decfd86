"""The app under load, in real Chromium: two sessions run at once and each gets its own results, a
third session's oversized run is refused with the memory message while they go on, Cancel during
evaluation returns within seconds, and 20 runs in a row leave the server's resident memory within
10% of its level after the second run (the figures go to test-artifacts/app-soak.json)."""
from __future__ import annotations

import json
import time

import pytest

from tests.conftest import tiny_llama
from tests.test_app_browser import ARTIFACTS, _free_port, _need_browser, _set, _shot
from tests.test_app_browser import browser  # noqa: F401  (the same Chromium fixture)
from workbench.memory import rss_bytes
from workbench.ui import build_app
from workbench.ui.session import files_root
from workbench.workspace import SLOTS, ModelCache

START = dict(calib_samples=4, seqlen=64, eval_windows=2, bits=3, group_size=16, max_blocks=None, device="cpu",
             batch_size=2)
SOAK_RUNS = 20


@pytest.fixture(scope="module")
def fault_app(tmp_path_factory, tokenizer):
    _need_browser()
    model = tmp_path_factory.mktemp("long-llama")
    # positions enough for the form's largest windows, so the memory check is what refuses them
    tiny_llama(max_position_embeddings=32768).save_pretrained(model)
    tokenizer.save_pretrained(model)
    demo = build_app(default_model=str(model), start=START, models=ModelCache())
    port = _free_port()
    limit = SLOTS.limit
    SLOTS.set_limit(2)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(files_root())])
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
        SLOTS.set_limit(limit)


def open_page(browser, url):
    page = browser.new_context().new_page()
    page.set_default_timeout(180_000)
    page.goto(url)
    page.wait_for_selector("#wb-run")
    return page


def status(page) -> str:
    return page.locator("#wb-q-status").inner_text()


def wait_done(page):
    page.wait_for_selector("#wb-q-status .wb-ok, #wb-q-status .wb-error, #wb-q-status .wb-warn")
    return status(page)


@pytest.mark.browser
def test_sessions_under_load(fault_app, browser):
    a, b, c = (open_page(browser, fault_app) for _ in range(3))
    b.locator("#wb-method").get_by_text("RTN", exact=True).click()

    # two sessions at once
    a.locator("#wb-run").click()
    b.locator("#wb-run").click()
    a.wait_for_selector("#wb-q-progress .wb-progress")

    # a third asks for what cannot fit: refused at once, with the estimate and the free memory
    _set(c, "wb-calib-samples", 4096)
    _set(c, "wb-seqlen", 32768)
    c.locator("#wb-run").click()
    c.wait_for_selector("#wb-q-status .wb-error")
    refused = status(c)
    assert "needs about" in refused and "GiB is free" in refused, refused
    assert "Traceback" not in c.content()

    # the other two go on and finish with their own results
    done_a, done_b = wait_done(a), wait_done(b)
    assert "GPTQ finished" in done_a and "RTN finished" in done_b, (done_a, done_b)
    assert "GPTQ" in a.locator("#wb-q-ppl").inner_text() and "RTN" in b.locator("#wb-q-ppl").inner_text()
    _shot(a, "app-faults-a.png")
    _shot(c, "app-faults-refused.png")
    c.context.close()

    # Cancel during evaluation (every window of the test text: long enough to catch)
    _set(a, "wb-eval-windows", 0)
    a.locator("#wb-run").click()
    a.wait_for_selector("#wb-q-progress :text('perplexity')")
    t0 = time.perf_counter()
    a.locator("#wb-cancel").click()
    a.wait_for_selector("#wb-q-status :text('cancelled')")
    cancel_seconds = time.perf_counter() - t0
    assert cancel_seconds < 5, cancel_seconds
    a.context.close()

    # 20 runs in a row: the server's resident memory settles after the second
    b.locator("#wb-more").get_by_text("More settings").click()
    b.wait_for_selector("#wb-seed", state="visible")
    figures = []
    for i in range(SOAK_RUNS):
        _set(b, "wb-seed", 100 + i)            # new settings each time: nothing comes from the page's cache
        b.locator("#wb-run").click()
        try:
            b.wait_for_selector("#wb-q-status .wb-info", timeout=10_000)       # "running RTN..."
        except Exception:          # a run quicker than the page's poll: its result is there already
            pass
        wait_done(b)
        if "RTN finished" not in status(b):
            _shot(b, "app-soak-failed.png")
        assert "RTN finished" in status(b), status(b)
        figures.append(rss_bytes())
    after2, after20 = figures[1], figures[-1]
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "app-soak.json").write_text(json.dumps(
        {"rss_after_run_2_bytes": after2, "rss_after_run_20_bytes": after20, "rss_by_run_bytes": figures,
         "cancel_seconds": cancel_seconds}, indent=1))
    assert after20 <= 1.10 * after2, (after2 / 2 ** 20, after20 / 2 ** 20)
    b.context.close()
