"""``ignore``: layers left in full precision, in every face, and what they leave behind."""
from __future__ import annotations

import json

import pytest
import torch

import workbench
from workbench.config import QuantizeConfig, build_config
from workbench.errors import WorkbenchError
from workbench.models.loading import load_model
from workbench.patterns import matches

SMALL = dict(bits=3, group_size=16, calib_samples=4, seqlen=32, eval_windows=-1, device="cpu", batch_size=2)


def test_patterns_read_names_globs_and_regexes():
    name = "model.layers.1.mlp.down_proj"
    assert matches(name, (name,)) and matches(name, ("*.down_proj",)) and matches(name, ("re:.*mlp",))
    assert not matches(name, ("model.layers.1",)) and not matches(name, ("*.up_proj", "re:lm_head"))
    assert matches(name, ("re:model\\.layers\\.1\\.",))          # re.match: a prefix is enough


@pytest.mark.parametrize("method", ["gptq", "turboboa", "brecq"])
def test_ignored_layers_keep_their_weights_and_leave_the_report(tiny_checkpoints, method):
    model = tiny_checkpoints["llama"]
    fp = load_model(model).model.state_dict()
    events = []
    extra = {"iters": 5} if method == "brecq" else {}
    result = workbench.quantize(model=model, method=method, ignore=("*.down_proj", "model.layers.0.self_attn.q_proj"),
                                on_event=events.append, **SMALL, **extra)
    names = [r.name for r in result.report.layers]
    assert len(names) == 14 - 3 and not any(n.endswith("down_proj") for n in names)
    assert "model.layers.0.self_attn.q_proj" not in names and "model.layers.1.self_attn.q_proj" in names
    assert set(result.packed) == set(names)
    state = result.model.state_dict()
    for kept in ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"):
        assert torch.equal(state[f"{kept}.weight"], fp[f"{kept}.weight"])
    k = "model.layers.0.self_attn.k_proj.weight"
    assert not torch.equal(state[k], fp[k])
    start = next(e for e in events if e.kind == "start")
    assert start.total == 11 and sum(e.kind == "layer_finished" for e in events) == 11
    assert result.report.config["ignore"] == ("*.down_proj", "model.layers.0.self_attn.q_proj")


def test_a_pattern_that_matches_nothing_or_is_no_regex_is_refused(tiny_checkpoints):
    with pytest.raises(WorkbenchError, match=r"--ignore pattern '\*\.dwn_proj' matches no linear layer"):
        workbench.quantize(model=tiny_checkpoints["llama"], ignore=("*.dwn_proj",), **SMALL)
    with pytest.raises(WorkbenchError, match=r"^Keep in full precision has a bad regular expression 're:\('"):
        build_config({"ignore": "re:("}, "app")


def test_every_face_reads_the_patterns(tiny_checkpoints, tmp_path, capsys):
    from workbench.cli import main
    report = tmp_path / "r.json"
    args = ["quantize", "--model", tiny_checkpoints["opt"], "--ignore", "*.fc2, re:.*layers\\.1\\.self_attn",
            "--report", str(report), "--quiet", *[f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]]
    assert main(args) == 0
    data = json.loads(report.read_text())
    assert data["config"]["ignore"] == ["*.fc2", "re:.*layers\\.1\\.self_attn"]
    assert [r["kind"] for r in data["layers"]] == ["q", "k", "v", "o", "fc1", "fc1"]
    # the app's form and the widgets' form give the same config from the same text
    import gradio as gr

    from workbench.ui.form import build_form
    with gr.Blocks():
        form = build_form()
    values = [("*.fc2, re:x" if name == "ignore" else c.value) for name, c in form.fields.items()]
    assert form.config(values, "gptq").ignore == ("*.fc2", "re:x")
    pytest.importorskip("ipywidgets")
    from workbench.widgets import SettingsForm
    w = SettingsForm()
    w.set(ignore="*.fc2, re:x")
    assert w.config().ignore == ("*.fc2", "re:x") and QuantizeConfig(ignore=["*.fc2"]).validate().ignore == ("*.fc2",)


def test_the_export_leaves_ignored_layers_in_float(tiny_checkpoints, tmp_path):
    pytest.importorskip("compressed_tensors")
    result = workbench.quantize(model=tiny_checkpoints["llama"], method="rtn", ignore=("*.down_proj",),
                                **{**SMALL, "bits": 4})
    workbench.export.save_quantized(result, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"} <= set(config["ignore"])
    back = workbench.load_quantized(tmp_path / "ckpt")
    assert "model.layers.0.mlp.down_proj" not in back.packed and len(back.packed) == 12
