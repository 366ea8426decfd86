"""A float16 or bfloat16 model keeps its dtype for storage; the solvers work in float32 per layer, and
the result exports."""
import json

import pytest
import torch

import workbench
from tests.conftest import tiny_llama
from workbench.cli import main
from workbench.export import load_quantized, save_quantized
from workbench.models.loading import load_model

TINY = dict(calib_samples=2, seqlen=32, eval_windows=-1, group_size=16, max_blocks=1, device="cpu")


@pytest.fixture(scope="module", params=[torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def half_checkpoint(request, tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp(str(request.param).removeprefix("torch."))
    tiny_llama().to(request.param).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d, request.param


def test_the_stored_dtype_is_kept_when_loading(half_checkpoint):
    path, dtype = half_checkpoint
    assert next(load_model(str(path)).model.parameters()).dtype == dtype


def test_a_half_model_passed_to_the_api_quantizes_and_exports(half_checkpoint, tmp_path):
    path, dtype = half_checkpoint
    loaded = load_model(str(path))
    result = workbench.quantize(loaded=loaded, model=str(path), **TINY)
    layer = result.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.weight.dtype == dtype
    # the stored weight is the dequantized grid value in the model's dtype
    packed = result.packed["model.layers.0.self_attn.q_proj"]
    assert torch.equal(layer.weight, packed.dequantize().to(dtype))
    assert result.report.config["dtype"] == str(dtype).removeprefix("torch.")
    save_quantized(result, tmp_path / "q")
    back = load_quantized(tmp_path / "q")
    assert torch.equal(back.packed["model.layers.0.self_attn.q_proj"].codes, packed.codes.to(torch.uint8))


def test_the_cli_saves_a_half_model(half_checkpoint, tmp_path, capsys):
    path, _ = half_checkpoint
    report = tmp_path / "r.json"
    code = main(["quantize", "--model", str(path), "--seqlen", "32", "--calib-samples", "2", "--eval-windows", "2",
                 "--group-size", "16", "--max-blocks", "1", "--device", "cpu", "--quiet", "--report", str(report),
                 "--save", str(tmp_path / "q")])
    assert code == 0, capsys.readouterr().err
    assert json.loads(report.read_text())["ppl_quant"] > 0
