"""Try it in real Chromium on the tiny injected LM: quantize, press Generate, see both texts with the first
divergence marked and the top-5 table; the page's refusals; then every method of a comparison on one prompt.
Screenshots go to test-artifacts/."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests import test_app_browser as shared
from tests.test_app_browser import _set, _shot, open_app
from workbench.ui.session import SAVABLE_CAPACITY, Session

# the browser test's app (the tiny injected LM) and Chromium fixtures
app_url, browser, runs_dir = shared.app_url, shared.browser, shared.runs_dir


def test_the_latest_comparison_keeps_its_codes_for_try_it():
    sess = Session()
    compared = [SimpleNamespace(config=("compare", i), packed={"layer": i}) for i in range(4)]
    sess.last_compare = compared
    for o in compared:
        sess.remember(o)
    later = [SimpleNamespace(config=("later", i), packed={"layer": i}) for i in range(SAVABLE_CAPACITY + 2)]
    for o in later:
        sess.remember(o)
    assert all(o.packed is not None for o in compared)
    assert [o.packed is None for o in later] == [True, True] + [False] * SAVABLE_CAPACITY
    sess.last_compare = []                                   # a new comparison: the old one's codes may go
    sess.remember(SimpleNamespace(config="next", packed={}))
    assert all(o.packed is None for o in compared)


def _generate(page, prefix: str):
    """Press Generate and wait for this press's own answer (every press shows "starting..." first)."""
    status = f"#{prefix}-status"
    page.evaluate(f"document.querySelectorAll('{status} .wb-message').forEach(e => e.dataset.stale = '1')")
    page.locator(f"#{prefix}-run").click()
    fresh = ":not([data-stale])"
    page.wait_for_selector(", ".join(f"{status} .wb-{k}{fresh}" for k in ("ok", "error", "warn")))
    return page.locator(status).inner_text()


def _prompt(page, prefix: str, text: str):
    page.locator(f"#{prefix}-prompt textarea").fill(text)


@pytest.mark.browser
def test_try_it_in_a_browser(app_url, browser):
    page = open_app(browser, app_url, ready="#wb-try-run")

    assert "run a quantization first" in _generate(page, "wb-try")

    page.locator("#wb-method").get_by_text("RTN", exact=True).click()
    page.locator("#wb-run").click()
    page.wait_for_selector("#wb-q-ppl :text('Perplexity')")

    _prompt(page, "wb-try", "<b>The game</b> began")
    _set(page, "wb-try-tokens", 24)
    status = _generate(page, "wb-try")
    assert "generated up to 24 tokens" in status and "Traceback" not in page.content()
    rows = page.locator("#wb-try-texts .wb-try-row")
    assert rows.count() == 2
    fp, quant = (rows.nth(i).locator(".wb-try-text").inner_text() for i in range(2))
    assert fp.startswith("<b>The game</b> began") and quant.startswith("<b>The game</b> began")   # escaped, shown
    assert page.locator("#wb-try-texts b:text('The game')").count() == 0
    assert len(fp) > len("<b>The game</b> began") and len(quant) > len("<b>The game</b> began")
    tokens = [page.locator(f"#wb-try-texts .wb-try-row[data-model='{m}'] .wb-tok").count() for m in ("fp", "quant")]
    assert all(0 < n <= 24 for n in tokens)
    first = page.locator("#wb-try-texts .wb-try").get_attribute("data-first")
    if first:       # the texts part: the token is outlined in both, and the table is taken there
        assert page.locator("#wb-try-texts .wb-first").count() == 2
        assert f"parts at token {int(first) + 1}" in page.locator("#wb-try-texts").inner_text()
    table = page.locator("#wb-try-top")
    assert table.is_visible() and "full precision token" in table.inner_text()
    assert table.locator("[role=grid]").get_attribute("aria-rowcount") == "6"       # a header and 5 ranks
    _shot(page, "app-try-it.png")

    # the page's refusals, in its words
    _prompt(page, "wb-try", "   ")
    assert "Prompt is empty" in _generate(page, "wb-try")
    _prompt(page, "wb-try", "The game began")
    _set(page, "wb-try-tokens", 250)
    assert "more than the model's 256 (max_position_embeddings); lower Tokens to" in _generate(page, "wb-try")
    _set(page, "wb-try-tokens", 0)
    assert "Tokens must be at least 1" in _generate(page, "wb-try")

    # Compare: nothing before a comparison, then every method and full precision on one prompt
    page.get_by_role("tab", name="Compare").click()
    page.wait_for_selector("#wb-c-try-run")
    assert "run a comparison first" in _generate(page, "wb-c-try")
    page.locator("#wb-compare-run").click()
    page.wait_for_selector("#wb-c-status .wb-ok")
    _set(page, "wb-c-try-tokens", 16)
    status = _generate(page, "wb-c-try")
    assert all(m in status for m in ("RTN", "GPTQ", "BoA", "TurboBoA"))
    models = page.locator("#wb-c-try-texts .wb-try-row")
    assert models.count() == 5
    assert [models.nth(i).get_attribute("data-model") for i in range(5)] == ["fp", "rtn", "gptq", "boa", "turboboa"]
    _shot(page, "app-compare-try-it.png")
    page.close()
