"""The same bad settings get the same message in every face: the command line (naming the flag),
the app's Run handler and the widgets' form (naming the field label), and the API (the flag)."""
from __future__ import annotations

import pytest

from workbench.config import SETTINGS, QuantizeConfig, build_config
from workbench.errors import WorkbenchError
from workbench.methods import METHODS

# field, value, method it is given for, what follows the setting's name in the message
BAD = [
    ("calib_samples", 0, "gptq", "must be at least 1, got 0"),
    ("bits", 9, "gptq", "must be at most 8, got 9"),
    ("seqlen", 2.5, "gptq", "must be a whole number, got 2.5"),
    ("group_size", 0, "gptq", "must be -1 (one grid per output channel) or a positive width, got 0"),
    ("eval_windows", -2, "gptq", "must be at least -1, got -2"),
    ("dx_alpha", 2, "turboboa", "must be between 0.0 and 1.0, got 2.0"),
    ("rows_per_step", 0, "boa", "must be at least 1, got 0"),
    ("iters", 0, "aespa", "must be at least 1, got 0"),
    ("lr", -1, "aespa", "must be between 1e-06 and 10.0, got -1.0"),
    ("init", "awq", "aespa", "must be one of rtn, gptq, boa, got 'awq'"),
    ("device", "tpu", "gptq", "must be one of auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("model", " ", "gptq", "is empty; give smollm2-135m (embedded), a checkpoint directory, or a hub id"),
    ("grid_search", "best", "gptq", "must be one of minmax, mse, hessian, got 'best'"),
    ("method", "awq", "gptq", "must be one of rtn, gptq, boa, turboboa, turboboa-tuned, aespa, brecq, got 'awq'"),
    ("calib", " ", "gptq", "is empty; give wikitext2, a text file, or hf:NAME[:CONFIG[:SPLIT[:FIELD]]]"),
    ("eval_text", "", "gptq", "is empty; give text for perplexity: wikitext2-test (the WikiText-2 raw test split), "
                              "a text file, or hf:NAME[:CONFIG[:SPLIT[:FIELD]]]"),
    ("eval_windows", "x", "gptq", "must be a whole number, got 'x'"),
    ("seed", -1, "gptq", "must be at least 0, got -1"),
    ("seed", 2 ** 64, "gptq", "must be at most 4294967295, got 18446744073709551616"),
    ("bits", "four", "gptq", "must be a whole number, got 'four'"),
    ("symmetric", "maybe", "gptq", "must be on or off, got 'maybe'"),
    ("format", "gguf:q4_2", "gptq", "must be one of pack-quantized, fake-quant, gguf:q4_0, gguf:q4_1, gguf:q5_0, "
                                   "gguf:q5_1, gguf:q8_0, gguf:q2_k, gguf:q3_k, gguf:q4_k, gguf:q5_k, gguf:q6_k, "
                                   "got 'gguf:q4_2'"),
    ("max_blocks", -1, "gptq", "must be at least 1, got -1"),
    ("ignore", "re:(", "gptq", "has a bad regular expression 're:(': missing ), unterminated subpattern at position 0"),
    ("device", "meta", "gptq", "must be one of auto, cpu, cuda or cuda:N, got 'meta'"),
    ("device", "mps", "gptq", "must be one of auto, cpu, cuda or cuda:N, got 'mps'"),
    ("batch_size", 0, "gptq", "must be at least 1, got 0"),
    ("batch_size", -1, "gptq", "must be at least 1, got -1"),
    ("measure_batches", 0, "gptq", "must be at least 1, got 0"),
    ("damp", 1.5, "gptq", "must be between 0.0 and 0.999, got 1.5"),
    ("act_order", "sometimes", "gptq", "must be on or off, got 'sometimes'"),
    ("block_size", 0, "gptq", "must be at least 1, got 0"),
    ("refine_iters", 101, "turboboa", "must be at most 100, got 101"),
    ("passes", 0, "gptq", "must be at least 1, got 0"),
    ("tune_steps", -1, "turboboa-tuned", "must be at least 0, got -1"),
    ("tune_lr", 2, "turboboa-tuned", "must be between 1e-06 and 1.0, got 2.0"),
    ("tune_norms", "maybe", "turboboa-tuned", "must be on or off, got 'maybe'"),
    ("e2e_steps", 1.5, "turboboa-tuned", "must be a whole number, got 1.5"),
    ("e2e_lr", 0, "turboboa-tuned", "must be between 1e-06 and 1.0, got 0.0"),
    ("grid_at_start", "x", "boa", "must be on or off, got 'x'"),
    ("value_output", "q", "boa", "must be one of identity, o_proj, got 'q'"),
    ("lr", "inf", "aespa", "must be a finite number, got inf"),
    ("lr", "nan", "brecq", "must be a finite number, got nan"),
    ("offload", "ram", "gptq", "must be one of none, disk, auto, got 'ram'"),
    ("activation_memory", -1, "gptq", "must be at least 0.0, got -1.0"),
    ("activation_memory", "lots", "gptq", "must be a number, got 'lots'"),
    ("act_bits", 5, "gptq", "must be one of 4, 6, 8, 16, got 5"),
    ("act_symmetric", "maybe", "gptq", "must be on or off, got 'maybe'"),
    ("act_clip", 1.5, "gptq", "must be between 0.05 and 1.0, got 1.5"),
    ("kv_bits", 3, "gptq", "must be one of 4, 6, 8, 16, got 3"),
    ("rotate", "givens", "gptq", "must be one of none, hadamard, random, got 'givens'"),
    ("avg_bits", 1.5, "gptq", "must be between 2.0 and 16.0, got 1.5"),
    ("max_size", 0, "gptq", "must be more than 0 MB, got 0.0"),
    ("max_size", "big", "gptq", "must be a number, got 'big'"),
    ("sensitivity", "hessian", "gptq", "must be one of fisher, objective, got 'hessian'"),
    ("sensitivity_samples", 0, "gptq", "must be at least 1, got 0"),
    ("candidate_bits", "2,9", "gptq", "has widths outside 2-8 ('9'); give whole numbers from 2 to 8, comma-separated"),
    ("split_fused", "maybe", "gptq", "must be on or off, got 'maybe'"),
    ("plan", "no-such-plan.json", "gptq", "file 'no-such-plan.json' does not exist; give a plan written by --plan-out "
                                          "(a JSON file)"),
    ("keep_bits", "q8", "gptq", "item 'q8' is not KIND[@BLOCKS]:BITS (e.g. q:8 or down@0-2:4)"),
    ("keep_bits", "down@0-2:9", "gptq", "item 'down@0-2:9': bits must be whole numbers from 2 to 8, got 9"),
]
IDS = [f"{f}={v!r}" for f, v, _, _ in BAD]


def expected(field: str, face: str, body: str) -> str:
    return f"{SETTINGS[field].who(face)} {body}"


@pytest.mark.parametrize("field,value,method,body", BAD, ids=IDS)
def test_command_line(tiny_checkpoints, tmp_path, capsys, field, value, method, body):
    from workbench.cli import main
    if SETTINGS[field].kind is bool:
        pytest.skip("an on/off flag takes no value on the command line: it cannot be given a bad one")
    args = ["quantize", "--model", tiny_checkpoints["llama"], "--method", method, "--report", str(tmp_path / "r.json"),
            "--quiet", SETTINGS[field].flag, str(value)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"workbench: error: {expected(field, 'cli', body)}"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("field,value,method,body", BAD, ids=IDS)
def test_api(field, value, method, body):
    with pytest.raises(WorkbenchError) as info:
        QuantizeConfig(**{"method": method, field: value}).validate()
    assert str(info.value) == expected(field, "api", body)


@pytest.fixture(scope="module")
def app_form():
    import gradio as gr

    from workbench.ui.form import build_form
    from workbench.ui.quantize_tab import build_quantize_tab
    from workbench.ui.session import Session
    from workbench.workspace import ModelCache
    with gr.Blocks():
        session = gr.State(Session)
        form = build_form({"device": "cpu"})
        view = build_quantize_tab(form, session, ModelCache())
    return form, view


@pytest.mark.parametrize("field,value,method,body", BAD, ids=IDS)
def test_app_run_handler(app_form, field, value, method, body):
    from workbench.ui.quantize_tab import stream_quantize
    from workbench.ui.session import Session
    from workbench.ui.views import message_html
    if "app" not in SETTINGS[field].faces:
        pytest.skip(f"the app has no {field} field (its tabs choose it)")
    form, view = app_form
    values = [value if name == field else c.value for name, c in form.fields.items()]
    first = next(stream_quantize(Session(), None, form, view, method, values))
    assert first == {view.status: message_html(f"Invalid settings: {expected(field, 'app', body)}", "error")}


@pytest.mark.parametrize("field,value,method,body", BAD, ids=IDS)
def test_widgets_form(field, value, method, body):
    pytest.importorskip("ipywidgets")
    from workbench.widgets import SettingsForm
    if "widgets" not in SETTINGS[field].faces:
        pytest.skip(f"the widgets have no {field} field")
    form = SettingsForm(method=method)
    with pytest.raises(WorkbenchError) as info:
        form.set(**{field: value})
    assert str(info.value) == expected(field, "widgets", body)
    with pytest.raises(WorkbenchError) as info:          # a starting value is checked the same way
        SettingsForm(**{"method": method, field: value})
    assert str(info.value) == expected(field, "widgets", body)


def test_a_setting_for_another_method_is_refused_or_left_out():
    with pytest.raises(WorkbenchError, match="^--iters applies to aespa, brecq, not gptq$"):
        build_config({"method": "gptq", "iters": 5}, "cli")
    with pytest.raises(WorkbenchError, match="^Value output factor applies to boa, turboboa, turboboa-tuned, aespa, not rtn$"):
        build_config({"method": "rtn", "value_output": "o_proj"}, "app")
    # a form serves every method: what does not apply to a method keeps its default there
    from workbench.config import for_method
    values = {"iters": 7, "rows_per_step": 4, "dx_alpha": 0.25, "init": "BoA"}
    assert (for_method(values, "gptq", "app").iters, for_method(values, "gptq", "app").rows_per_step) == (None, None)
    boa, turbo, aespa = (for_method(values, m, "app") for m in ("boa", "turboboa", "aespa"))
    assert (boa.rows_per_step, boa.dx_alpha) == (4, None) and (turbo.rows_per_step, turbo.dx_alpha) == (4, 0.25)
    assert (aespa.iters, aespa.init) == (7, "boa")
    assert hash(turbo) == hash(for_method(values, "turboboa", "app"))      # configs are cache keys


def test_every_declared_setting_reaches_every_face():
    import argparse

    from workbench.flags import add_setting_flags
    from workbench.methods import METHODS
    parser = argparse.ArgumentParser()
    add_setting_flags(parser)
    flags = {a.dest for a in parser._actions}
    for name, s in SETTINGS.items():
        assert s.methods is None or set(s.methods) <= set(METHODS), name
        assert name in flags or "cli" not in s.faces
        assert s.label and s.help


def test_every_setting_has_a_bad_value_above():
    """The README's table "What bad input gets" points here for every setting: each one is tried."""
    assert {f for f, *_ in BAD} == set(SETTINGS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_untouched_forms_run_every_method_with_its_own_solver_defaults(app_form, method):
    """A form left as it opens gives each method the solver of the API (a slider, which cannot
    be empty, stands for the method's default where it starts)."""
    pytest.importorskip("ipywidgets")
    from workbench.widgets import SettingsForm
    form, _ = app_form
    api = QuantizeConfig(method=method)
    app = form.config([c.value for c in form.fields.values()], method)
    widgets = SettingsForm(method=method).config(method)
    if METHODS[method].solver is not None:
        assert app.solver() == api.solver() == widgets.solver()
    assert app.dx_alpha is None and widgets.dx_alpha is None
