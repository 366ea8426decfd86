"""GenerateWidget on tiny runs: the same continuations as the core, both texts and the top-5 table shown,
bad fields refused with their labels, Cancel."""
from __future__ import annotations

import pytest

pytest.importorskip("ipywidgets")

from tests.test_generate import brute_force  # noqa: E402
from workbench import workspace  # noqa: E402
from workbench.config import QuantizeConfig  # noqa: E402
from workbench.diagnostics.reconstruction import Reconstruction  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.widgets import GenerateWidget  # noqa: E402

SMALL = dict(calib_samples=4, seqlen=32, eval_windows=-1, bits=3, group_size=16, device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def run(tiny_checkpoints):
    models = workspace.ModelCache()
    cfg = QuantizeConfig(model=tiny_checkpoints["llama"], method="rtn", **SMALL)
    result = workspace.quantize_copy(cfg, models=models)
    return models, cfg, result


def test_the_widget_shows_both_texts_and_the_table(run):
    models, cfg, result = run
    w = GenerateWidget(result, models=models, prompt="The game began", tokens=16)
    assert w.prompt.value == "The game began" and w.tokens.value == "16" and w.label == "RTN w3 g16"
    d = w.run()
    assert w.state == "done" and d is w.diff
    shared = models.get(cfg.model)
    ids = shared.tokenizer("The game began")["input_ids"]
    assert d.fp.tokens == brute_force(shared.loaded.model, ids, 16)[0]
    assert d.quant.tokens == brute_force(result.model, ids, 16)[0]
    assert w.texts.value.count('class="wb-try-row"') == 2 and "The game began" in w.texts.value
    assert len(w.top) == 5 and "full precision token" in w.table.value and "RTN w3 g16 p" in w.table.value
    assert ("first divergence" if d.first is not None else "never part") in w.table.value
    # an Outcome's model is rebuilt from its codes: the same continuation
    outcome = workspace.Outcome(cfg, result.report, Reconstruction(), packed=result.packed)
    again = GenerateWidget(outcome, models=models).run(prompt="The game began", tokens=16)
    assert again.quant.tokens == d.quant.tokens and again.fp.tokens == d.fp.tokens


def test_bad_fields_are_refused_with_their_labels(run):
    models, _, result = run
    with pytest.raises(WorkbenchError, match="GenerateWidget takes a QuantizeResult"):
        GenerateWidget("a model", models=models)
    with pytest.raises(WorkbenchError, match="Tokens must be at least 1, got 0"):
        GenerateWidget(result, models=models, tokens=0)
    w = GenerateWidget(result, models=models)
    with pytest.raises(WorkbenchError, match="Prompt is empty"):
        w.run(prompt="  ")
    w.tokens.value = "many"
    w._click_run()                              # the button: the message in the status line, no run
    assert "Tokens must be a whole number, got &#x27;many&#x27;" in w.runner.status.value and w.state == "idle"
    w.tokens.value = "250"
    w._click_run()
    with pytest.raises(WorkbenchError, match="lower Tokens to"):
        w.wait()
    assert w.state == "error" and "more than the model&#x27;s 256 (max_position_embeddings)" in w.runner.status.value


def test_cancel_stops_a_long_generation(run):
    models, _, result = run
    w = GenerateWidget(result, models=models, tokens=200)
    w.run(wait=False)
    assert w.cancel()
    assert w.wait() == "cancelled" and w.diff is None
