"""The app's Genie tab: its form and tables directly, its handler on a tiny CNN, then in Chromium.

The browser test starts the app in this process with a tiny CNN saved as a bare safetensors
file, runs Genie on it with tiny settings and checks the gallery (one captioned image per
calibration image), the accuracy table and the every-source table; screenshots go to
test-artifacts/.
"""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from tests.genie.genie_nets import randomize_bn
from tests.test_app_browser import ARTIFACTS, _free_port, _need_browser, _shot, open_app
from tests.test_app_browser import browser  # noqa: F401  (the same Chromium fixture)
from workbench.errors import WorkbenchError
from workbench.genie.model import DEFAULT_WEIGHTS, DigitsResNet, ModelConfig
from workbench.genie.pipeline import SOURCES
from workbench.ui import build_app
from workbench.ui.exposure import EXPOSURE
from workbench.ui.genie_tab import START, accuracy_table, genie_config, sources_table, stream_genie
from workbench.ui.session import Session, files_root
from workbench.workspace import ModelCache

CAPTION = re.compile(r"^\d · (\d+(\.\d)?%|>99\.9%)$")
SAMPLES = 12


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_bn(DigitsResNet(ModelConfig(widths=(8, 16, 16))), (1, 16, 16))
    path = tmp_path_factory.mktemp("cnn") / "tiny-cnn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def values(path="", kind="file", **over):
    """The form's values in its input order, tiny unless told otherwise."""
    v = dict(kind=kind, path=path, architecture="digits-resnet", samples=SAMPLES, weight_bits=4, act_bits=4,
             source="genie", distill_steps=4, distill_batch=SAMPLES, iters=3, seed=0)
    v.update(over)
    return [v[k] for k in ("kind", "path", "architecture", "samples", "weight_bits", "act_bits", "source",
                           "distill_steps", "distill_batch", "iters", "seed")]


# -- without a browser --------------------------------------------------------------------------

def test_the_form_becomes_a_run_config(cnn_file):
    cfg = genie_config(*values(kind="shipped", path="ignored", samples=64.0, source="genie-swing", act_bits=0))
    assert cfg.model == str(DEFAULT_WEIGHTS) and cfg.samples == 64 and cfg.data == "genie" and cfg.swing
    assert cfg.setting == "W4" and cfg.source == "genie-swing" and cfg.device == "auto"
    cfg = genie_config(*values(cnn_file, source="real"))
    assert cfg.model == cnn_file and cfg.data == "real" and not cfg.swing and cfg.setting == "W4A4"
    # the tab opens on the shipped CNN at W4A4 with Genie-D
    assert (START["weight_bits"], START["act_bits"], START["source"]) == (4, 4, "genie")


@pytest.mark.parametrize("over, message", [
    (dict(path="  "), "Model weights: give the path of a .safetensors file"),
    (dict(samples=0), "Samples must be a whole number from 1 to 4096, got 0"),
    (dict(samples=2.5), "Samples must be a whole number from 1 to 4096, got 2.5"),
    (dict(samples=None), "Samples must be a whole number"),
    (dict(weight_bits=9), "Weight bits must be a whole number from 2 to 8, got 9"),
    (dict(act_bits=1), "Activation bits must be float (0) or a whole number from 2 to 8, got 1"),
    (dict(iters=0), "Genie-M steps per block must be a whole number from 1 to 100000, got 0"),
    (dict(distill_steps=-1), "Distillation steps must be a whole number from 0"),
    (dict(seed=-1), "Seed must be a whole number from 0"),
    (dict(source="imagenet"), "Data source must be one of noise, pixels, Genie-D"),
    (dict(architecture="vgg"), "Architecture must be one of digits-resnet, got 'vgg'"),
])
def test_bad_form_values_name_the_field(cnn_file, over, message):
    with pytest.raises(WorkbenchError, match=re.escape(message)):
        genie_config(*values(**{"path": cnn_file, **over}))


def test_the_model_path_follows_the_exposure_rules(cnn_file, tmp_path):
    saved = (EXPOSURE.public, EXPOSURE.roots)
    try:
        EXPOSURE.configure(True, [])
        with pytest.raises(WorkbenchError, match="^Model weights cannot be a file path on this server.*shipped"):
            genie_config(*values(cnn_file))
        genie_config(*values(kind="shipped"))                 # the shipped CNN needs no path
        EXPOSURE.configure(True, [tmp_path])
        with pytest.raises(WorkbenchError, match="^Model weights must lie under the folders the operator allowed; "
                                                 "the shipped digits CNN works everywhere"):
            genie_config(*values(cnn_file))
        EXPOSURE.configure(True, [cnn_file.rsplit("/", 1)[0]])
        assert genie_config(*values(cnn_file)).model == cnn_file
    finally:
        EXPOSURE.public, EXPOSURE.roots = saved


def test_tables_show_what_has_finished(cnn_file):
    cfg = genie_config(*values(cnn_file))
    empty = accuracy_table(cfg, None, None)
    assert list(empty["top-1 accuracy %"]) == ["waiting"] * 3
    baseline = {"fp": 97.5, "rtn": {"accuracy": 90.25, "seconds": 1.04}}
    table = accuracy_table(cfg, baseline, {"quant_accuracy": 96.0, "distill_seconds": 2.0, "quant_seconds": 3.5})
    assert list(table["top-1 accuracy %"]) == ["97.50", "90.25", "96.00"]
    assert list(table["change vs full precision"]) == ["", "-7.25", "-1.50"]
    assert table["seconds"].iloc[2] == "5.5" and "12 images, Genie-D" in table["calibration"].iloc[2]
    rows = sources_table(cfg, baseline, {"noise": {"quant_accuracy": 50.0, "distill_seconds": 0.0,
                                                   "quant_seconds": 1.0}}, {"noise": "done", "pixels": "running"})
    assert list(rows.iloc[0])[:5] == ["W4A4 top-1 %", "97.50", "90.25", "50.00", "running"]
    assert list(rows.iloc[0])[5:] == ["waiting"] * (len(SOURCES) - 2)
    assert list(rows.columns)[3:] == ["Genie-M + noise", "Genie-M + pixels", "Genie-M + Genie-D",
                                      "Genie-M + Genie-D + swing", "Genie-M + real digits"]


def _view():
    import gradio as gr

    from workbench.ui.genie_tab import build_genie_tab
    with gr.Blocks():
        return build_genie_tab(gr.State(Session))


def test_the_handler_streams_every_source_and_writes_the_report(cnn_file):
    import json
    view, sess = _view(), Session()
    updates = list(stream_genie(sess, view, values(cnn_file), every=True))
    last = updates[-1]
    assert "finished" in last[view.status]
    table = last[view.sources]
    assert all(re.fullmatch(r"\d+\.\d\d", v) for v in table.iloc[0][1:]), table.iloc[0]
    # the sources filled in one after another: each update holds no more numbers than the next
    filled = [sum(bool(re.fullmatch(r"\d+\.\d\d", v)) for v in u[view.sources].iloc[0][3:])
              for u in updates if view.sources in u]
    assert filled == sorted(filled) and filled[-1] == len(SOURCES) and len(set(filled)) == len(SOURCES) + 1
    galleries = [u[view.gallery] for u in updates if view.gallery in u and u[view.gallery]]
    assert galleries and all(len(g) == SAMPLES and all(CAPTION.match(c) for _, c in g) for g in galleries)
    [path] = last[view.files]
    body = json.loads(open(path).read())
    assert sorted(body["runs"]) == sorted(SOURCES) and body["rtn"]["accuracy"] >= 0
    assert body["runs"]["genie"]["settings"]["samples"] == SAMPLES


def test_cancel_ends_the_run_with_its_results_kept(cnn_file):
    view, sess = _view(), Session()
    seen = []
    for u in stream_genie(sess, view, values(cnn_file, distill_steps=5000), every=False):
        seen.append(u)
        if view.progress in u and "distilling" in u[view.progress]:
            sess.cancel()
    assert "cancelled" in seen[-1][view.status] and "data-state=\"cancelled\"" in seen[-1][view.progress]
    table = seen[-1][view.table]
    assert table["top-1 accuracy %"].iloc[2] == "cancelled" and re.fullmatch(r"\d+\.\d\d",
                                                                             table["top-1 accuracy %"].iloc[0])
    assert not sess.busy


# -- in a browser -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def genie_app(tiny_checkpoints):
    _need_browser()
    demo = build_app(default_model=tiny_checkpoints["llama"], models=ModelCache())
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(files_root())])
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def _fill(page, elem_id, value):
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")


@pytest.mark.browser
def test_genie_in_a_browser(genie_app, browser, cnn_file):  # noqa: F811
    page = open_app(browser, genie_app, ready=None)
    page.get_by_role("tab", name="Genie").click()
    page.wait_for_selector("#wb-g-run")

    # a bad value is refused in the page, naming the field
    _fill(page, "wb-g-samples", 0)
    page.locator("#wb-g-run").click()
    page.wait_for_selector("#wb-g-status .wb-error")
    assert "Samples must be a whole number" in page.locator("#wb-g-status").inner_text()

    # the tiny CNN from a file, tiny settings
    page.locator("#wb-g-kind").get_by_text("a .safetensors file").click()
    page.wait_for_selector("#wb-g-path", state="visible")
    _fill(page, "wb-g-path", cnn_file)
    _fill(page, "wb-g-samples", SAMPLES)
    page.locator("#wb-g-more").get_by_text("More Genie settings").click()
    _fill(page, "wb-g-steps", 6)
    _fill(page, "wb-g-batch", SAMPLES)
    _fill(page, "wb-g-iters", 4)
    page.locator("#wb-g-run").click()
    page.wait_for_selector("#wb-g-status .wb-ok")
    assert page.locator("#wb-g-progress .wb-progress[data-state='done']").count() == 1

    # the gallery: one image per calibration image, each captioned with the FP prediction
    gallery = page.locator("#wb-g-gallery")
    assert gallery.locator("img").count() == SAMPLES
    captions = [c.strip() for c in gallery.locator(".caption-label").all_inner_texts()]
    assert len(captions) == SAMPLES and all(CAPTION.match(c) for c in captions), captions
    # the loss curve and the blocks were drawn; the table is filled
    assert page.locator("#wb-g-loss .scatterlayer .trace").count() == 1
    assert page.locator("#wb-g-blocks .scatterlayer .trace .point").count() == 2 * 5
    table = page.locator("#wb-g-table").inner_text()
    assert "full precision" in table and "RTN W4A4" in table and "(this run)" in table
    assert "waiting" not in table and "running" not in table
    assert len(re.findall(r"\d+\.\d\d", table)) >= 3
    _shot(page, "app-genie.png")

    # every data source side by side
    page.locator("#wb-g-every").click()
    page.wait_for_selector("#wb-g-status :text('every data source finished')")
    sources = page.locator("#wb-g-sources").inner_text()
    assert "Genie-M + Genie-D + swing" in sources and "waiting" not in sources and "running" not in sources
    assert len(re.findall(r"\d+\.\d\d", sources)) == 2 + len(SOURCES)     # FP, RTN, one per source
    _shot(page, "app-genie-sources.png")

    # Cancel stops a long run
    _fill(page, "wb-g-steps", 5000)
    page.locator("#wb-g-run").click()
    page.wait_for_selector("#wb-g-progress :text('distilling')")
    page.locator("#wb-g-cancel").click()
    page.wait_for_selector("#wb-g-status .wb-warn:has-text('cancelled;')", timeout=30_000)
    # the Cancel button's answer and the run's own last update are separate messages; either may land first
    page.wait_for_selector("#wb-g-progress .wb-progress[data-state='cancelled']", timeout=30_000)
    assert page.locator("#wb-g-progress .wb-progress[data-state='cancelled']").count() == 1
    page.close()
    assert ARTIFACTS.joinpath("app-genie.png").stat().st_size > 10_000
