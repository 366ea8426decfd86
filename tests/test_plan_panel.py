"""The Quantize tab's Mixed precision panel, its handlers called directly on the tiny LLaMA: a plan within
its budget, planned again at once from the measured costs, pins, bad budgets refused in the page's words,
Run with this plan, and Compare's mixed row."""
from __future__ import annotations

import re

import gradio as gr
import pytest

from workbench.mixed.plan import read_plan
from workbench.ui.compare_tab import MIXED, mixed_config, summary_rows
from workbench.ui.form import build_form
from workbench.ui.plan_panel import FIELDS, stream_pin, stream_plan, stream_plan_run
from workbench.ui.quantize_tab import build_quantize_tab, stream_config
from workbench.ui.session import Session
from workbench.workspace import ModelCache

TINY = dict(calib_samples=4, seqlen=64, eval_windows=2, bits=3, group_size=16, max_blocks=None, device="cpu",
            batch_size=2)
LAYERS = 14


@pytest.fixture(scope="module")
def app(tiny_checkpoints):
    """The Quantize tab built once (its panel inside), a model cache and a session of its own."""
    models = ModelCache()
    with gr.Blocks():
        session = gr.State(Session)
        form = build_form({**TINY, "model": tiny_checkpoints["llama"]})
        view = build_quantize_tab(form, session, models)
    panel, controls = view.plan_panel
    return form, view, panel, controls, models


def form_values(form, **over):
    return [over.get(name, c.value) for name, c in form.fields.items()]


def mixed(controls, **over):
    return {n: over.get(n, controls.fields[n].value) for n in FIELDS}


def last(updates: list[dict]) -> dict:
    out = {}
    for u in updates:
        out.update(u)
    return out


@pytest.fixture(scope="module")
def planned(app):
    """A session holding a plan of 4.0 bits per weight."""
    form, view, panel, controls, models = app
    sess = Session()
    end = last(list(stream_plan(sess, models, form, panel, "gptq", form_values(form), mixed(controls, avg_bits=4.0))))
    return sess, end


def test_a_plan_stays_within_its_budget_and_is_drawn(app, planned):
    form, view, panel, controls, models = app
    sess, end = planned
    draft = sess.plan_draft
    record = draft.plan.record
    assert "planned in" in end[panel.status] and "measured in" in end[panel.status]
    assert record["size_bytes"] <= record["budget_bytes"] and draft.summary()["avg_bits"] <= 4.0
    assert len(draft.bits) == LAYERS and len(set(draft.bits.values())) > 1
    # the budget is spent: one more step of any layer would not fit
    assert draft.summary()["avg_bits"] > 3.5
    heatmap = end[panel.plot].data[0]
    assert heatmap.type == "heatmap" and list(heatmap.x) == ["q", "k", "v", "o", "gate", "up", "down"]
    assert [[int(v) for v in row] for row in heatmap.z] == [
        [draft.bits[f"model.layers.{b}.{p}"] for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                         "mlp.down_proj")] for b in range(2)]
    assert "predicted fisher cost" in heatmap.hovertext[0][0]
    summary = end[panel.summary]
    assert re.search(r"\*\*Plan:\*\* \d\.\d{3} bits per weight for a budget of 4\.00", summary)
    assert re.search(r"\*\*Predicted:\*\* perplexity [+-]\d+\.\d\d%", summary) and "press Run with this plan" in summary
    assert len(end[panel.layer]["choices"]) == LAYERS


def test_a_budget_below_the_smallest_plan_is_refused_in_the_page_words(app, planned):
    form, view, panel, controls, models = app
    sess, _ = planned
    before = sess.plan_draft
    end = last(list(stream_plan(sess, models, form, panel, "gptq", form_values(form), mixed(controls, avg_bits=2.0))))
    message = end[panel.status]
    assert "wb-error" in message and "Average bits 2.0 is below the smallest plan" in message
    assert re.search(r"give Average bits 3\.\d{4} or more", message) and "--" not in message
    assert "the plan shown is the one made before" in message
    assert sess.plan_draft is before and not list(sess.files_dir().glob("plan-*.json"))
    # settings the form refuses are refused before any work
    end = last(list(stream_plan(sess, models, form, panel, "gptq", form_values(form),
                                mixed(controls, candidate_bits="2,9"))))
    assert "Invalid settings: Candidate bits has widths outside 2-8" in end[panel.status]


def test_a_pin_plans_again_from_the_measured_costs(app, planned):
    form, view, panel, controls, models = app
    sess, _ = planned
    values = form_values(form)
    updates = list(stream_pin(sess, models, form, panel, controls, "gptq", "down@0", "8", values,
                              mixed(controls, avg_bits=4.0)))
    end = last(updates)
    draft = sess.plan_draft
    assert draft.seconds == 0 and "from the costs measured before" in end[panel.status]
    assert draft.bits["model.layers.0.mlp.down_proj"] == 8 and draft.pinned == {"model.layers.0.mlp.down_proj"}
    assert draft.plan.record["size_bytes"] <= draft.plan.record["budget_bytes"]
    assert end[controls.fields["keep_bits"]] == "down@0:8" and "1 pinned" in end[panel.summary]
    assert "8*" in [t for row in end[panel.plot].data[0].text for t in row]
    # pinning it again replaces the pin; a pin the budget cannot take leaves the field as it was
    end = last(list(stream_pin(sess, models, form, panel, controls, "gptq", "down@0", "4", values,
                               mixed(controls, avg_bits=4.0, keep_bits="down@0:8"))))
    assert end[controls.fields["keep_bits"]] == "down@0:4"
    end = last(list(stream_pin(sess, models, form, panel, controls, "gptq", "mlp@1", "8", values,
                               mixed(controls, avg_bits=3.2, keep_bits="down@0:4"))))
    message = end[panel.status]
    assert "below the smallest plan" in message and "the layers of Width overrides at theirs" in message
    assert controls.fields["keep_bits"] not in end
    end = last(list(stream_pin(sess, models, form, panel, controls, "gptq", None, "8", values, mixed(controls))))
    assert "choose the layer to pin" in end[panel.status]


def test_run_with_the_plan_measures_it_and_compare_adds_the_mixed_row(app, planned):
    form, view, panel, controls, models = app
    sess, _ = planned
    draft = sess.plan_draft
    values = form_values(form)
    end = last(list(stream_plan_run(sess, models, form, view, panel, "gptq", values, stream_config)))
    outcome = sess.last_quantize
    assert outcome.report.plan["layers"] == draft.bits and outcome.config.bits == 4
    assert read_plan(outcome.config.plan) == draft.bits
    assert "Measured with GPTQ:** perplexity" in end[panel.summary] and "ran with the plan" in end[panel.status]
    assert "GPTQ mixed" in end[view.ppl] and "mixed" in end[view.files][0]
    # the mixed row of Compare: the same config, so the run just made is its cached result
    cfg = mixed_config(sess, form, values, "gptq")
    assert cfg == outcome.config and sess.cached(cfg) is outcome
    table = summary_rows({MIXED: outcome}, {MIXED: "cached"}, {"rtn": form.config(values, "rtn"), MIXED: cfg})
    assert list(table["method"]) == ["RTN", f"GPTQ mixed {outcome.report.plan['avg_bits']:.2f} bits"]
    assert list(table["status"]) == ["waiting", "cached"]
    # a plan no longer fits other settings: said, with the way back
    with pytest.raises(Exception, match=r"the plan was made for Group size 16 \(now 32\); make the plan again"):
        mixed_config(sess, form, form_values(form, group_size=32), "gptq")
    with pytest.raises(Exception, match="there is no plan to add as the mixed row"):
        mixed_config(Session(), form, values, "gptq")
    end = last(list(stream_plan_run(Session(), models, form, view, panel, "gptq", values, stream_config)))
    assert "there is no plan yet: press Make plan first" in end[panel.status]


def test_make_plan_can_be_cancelled_and_keeps_no_half_plan(app):
    form, view, panel, controls, models = app
    sess = Session()
    values = form_values(form, calib_samples=16)
    seen = []
    for update in stream_plan(sess, models, form, panel, "gptq", values, mixed(controls, avg_bits=4.0)):
        seen.append(update)
        if "sensitivity" in update.get(panel.progress, "") and not sess.job.cancel.is_set():
            sess.cancel()
    end = last(seen)
    assert "planning cancelled" in end[panel.status] and 'data-state="cancelled"' in end[panel.progress]
    assert sess.plan_draft is None and not sess.busy


def test_objective_costs_predict_no_perplexity(app):
    form, view, panel, controls, models = app
    sess = Session()
    end = last(list(stream_plan(sess, models, form, panel, "gptq", form_values(form),
                                mixed(controls, avg_bits=4.0, sensitivity="objective"))))
    assert sess.plan_draft.predicted_change_pct() is None and sess.plan_draft.summary()["avg_bits"] <= 4.0
    assert "objective costs are relative output errors and predict no perplexity" in end[panel.summary]
    assert "predicted objective cost" in end[panel.plot].data[0].hovertext[0][0]
