"""GGUF export: the solver's codes on each type's lattice, written exactly, read by gguf and llama.cpp."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import workbench
from tests.conftest import tiny_llama
from workbench.errors import WorkbenchError
from workbench.export_gguf import find_gguf, rotary_rows
from workbench.quant.grid import GridConfig, group_params
from workbench.quant.lattice import LATTICES, SUPER_BLOCK

RUN = dict(calib_samples=4, seqlen=64, eval_windows=-1, batch_size=2, device="cpu")
KINDS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory, tokenizer):
    """A tiny LLaMA whose rows are 256 and 512 wide: every GGUF type fits it."""
    d = tmp_path_factory.mktemp("wide-llama")
    tiny_llama(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)


def file_weights(path) -> dict[str, np.ndarray]:
    """Every tensor of the file as gguf's dequantizer reads it, by GGUF name."""
    import gguf
    from gguf.quants import dequantize
    reader = gguf.GGUFReader(find_gguf(path))
    return {t.name: dequantize(t.data, t.tensor_type) for t in reader.tensors}


def assert_file_holds_model(path, model):
    """The file's quantized linears equal the in-memory model's weights bit for bit."""
    weights = file_weights(path)
    cfg = model.config
    for i, block in enumerate(model.model.layers):
        modules = dict(block.named_modules())
        for hf, name in KINDS.items():
            W = modules[hf].weight.detach().float()
            if name in ("attn_q", "attn_k"):
                W = W[rotary_rows(W.shape[0], cfg.num_attention_heads if name == "attn_q" else cfg.num_key_value_heads)]
            got = weights[f"blk.{i}.{name}.weight"].reshape(W.shape)
            assert np.abs(got - W.numpy()).max() == 0, f"blk.{i}.{name}"


@pytest.mark.parametrize("search", ["minmax", "mse"])
@pytest.mark.parametrize("name", list(LATTICES))
def test_grids_are_on_the_lattice(name, search):
    lat = LATTICES[name]
    W = torch.randn(6, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    scale, zero = group_params(W, GridConfig.for_lattice(name, search))
    assert torch.equal(scale, scale.half().float()) or lat.super_block
    if lat.super_block:   # each scale an integer multiple 1..levels of one float16 per super-block
        s = scale.reshape(6, -1, SUPER_BLOCK // lat.sub_block)
        d = (s.amax(-1, keepdim=True) / lat.scale_levels).half().float()
        k = s / d
        assert torch.equal(k, k.round()) and k.min() >= 1 and k.max() <= lat.scale_levels
        assert torch.equal(d, d.half().float())
    if lat.min_offset:
        assert zero.min() >= 0 if lat.super_block else torch.equal(zero, zero.half().float())
    else:
        assert torch.all(zero == 2 ** (lat.bits - 1))


@pytest.mark.parametrize("name", list(LATTICES))
def test_every_type_writes_the_in_memory_weights_exactly(wide_llama, tmp_path, name):
    result = workbench.quantize(model=wide_llama, method="rtn", format=f"gguf:{name}", save_dir=tmp_path / "out", **RUN)
    assert_file_holds_model(tmp_path / "out", result.model)
    info = workbench.export.ExportInfo.from_json(tmp_path / "out" / "export.json")
    assert info.format == f"gguf:{name}" and info.quantized_layers == 14
    assert info.float16_bytes / info.quantized_bytes == pytest.approx(16 * LATTICES[name].block /
                                                                      (8 * _type_size(name)), rel=1e-6)


def _type_size(name):
    import gguf
    return gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, name.upper())][1]


@pytest.mark.parametrize("method,name", [("gptq", "q4_0"), ("gptq", "q4_1"), ("turboboa", "q4_k"),
                                         ("boa", "q3_k"), ("aespa", "q6_k")])
def test_solvers_compensate_on_the_lattice(wide_llama, tmp_path, method, name):
    """The solvers' codes (after compensation, TurboBoA's refinement, aespa's learned rounding)
    stay on the lattice, and the file holds them exactly."""
    extra = {"iters": 20} if method == "aespa" else {}
    result = workbench.quantize(model=wide_llama, method=method, format=f"gguf:{name}", save_dir=tmp_path / "out",
                                **RUN, **extra)
    assert_file_holds_model(tmp_path / "out", result.model)
    cfg = result.report.config
    assert (cfg["bits"], cfg["group_size"], cfg["format"]) == (LATTICES[name].bits, LATTICES[name].sub_block,
                                                                f"gguf:{name}")


def test_read_back_gives_the_dequantized_model(wide_llama, tmp_path):
    result = workbench.quantize(model=wide_llama, method="gptq", format="gguf:q4_1", save_dir=tmp_path / "out", **RUN)
    back = workbench.load_quantized(tmp_path / "out")
    same = dict(back.model.named_parameters())
    for name, p in result.model.named_parameters():
        if "layers" in name:   # the embedding was written in float16
            assert torch.equal(same[name].float(), p.float()), name
    assert back.source.endswith("-q4_1.gguf") and back.info.format == "gguf:q4_1"


def test_row_width_the_type_cannot_hold_is_refused_before_any_work(tiny_checkpoints):
    events = []
    with pytest.raises(WorkbenchError, match=r"blocks of 256 .* 64 inputs.*q4_0, q4_1, q5_0, q5_1, q8_0$"):
        workbench.quantize(model=tiny_checkpoints["llama"], format="gguf:q4_k", on_event=events.append, **RUN)
    assert not [e for e in events if e.kind == "layer_finished"]


def test_settings_that_contradict_the_type_are_refused():
    with pytest.raises(WorkbenchError, match="--bits 3 does not fit --format gguf:q4_0"):
        workbench.QuantizeConfig(format="gguf:q4_0", bits=3).validate()
    with pytest.raises(WorkbenchError, match="aespa rounds on integer zero points"):
        workbench.QuantizeConfig(format="gguf:q4_1", method="aespa").validate()
    cfg = workbench.QuantizeConfig(format="gguf:q5_1").validate()
    assert (cfg.bits, cfg.group_size, cfg.symmetric) == (5, 32, False)


def test_existing_target_is_refused_and_overwrite_replaces_it(wide_llama, tmp_path):
    target = tmp_path / "out"
    workbench.quantize(model=wide_llama, method="rtn", format="gguf:q8_0", save_dir=target, **RUN)
    first = find_gguf(target).stat().st_mtime_ns
    with pytest.raises(WorkbenchError, match="exists; pass --overwrite"):
        workbench.quantize(model=wide_llama, method="rtn", format="gguf:q8_0", save_dir=target, **RUN)
    workbench.quantize(model=wide_llama, method="rtn", format="gguf:q8_0", save_dir=target, overwrite=True, **RUN)
    assert find_gguf(target).stat().st_mtime_ns != first
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_interrupted_write_leaves_nothing(wide_llama, tmp_path, monkeypatch):
    import gguf

    def fail(self, *args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        workbench.quantize(model=wide_llama, method="rtn", format="gguf:q4_0", save_dir=tmp_path / "out", **RUN)
    assert os.listdir(tmp_path) == []


def test_cli_writes_a_gguf_file(wide_llama, tmp_path, capsys):
    from workbench.cli import main
    code = main(["quantize", "--model", wide_llama, "--method", "gptq", "--format", "gguf:q5_0", "--calib-samples",
                 "4", "--seqlen", "64", "--eval-windows", "-1", "--device", "cpu", "--quiet", "--save",
                 str(tmp_path / "out")])
    assert code == 0
    assert find_gguf(tmp_path / "out").name.endswith("-q5_0.gguf")


def test_llama_cpp_runs_the_file(wide_llama, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by scripts/setup.sh")
    from workbench import llamacpp
    from workbench.evaluate import perplexity
    workbench.quantize(model=wide_llama, method="gptq", format="gguf:q4_0", save_dir=tmp_path / "out", **RUN)
    back = workbench.load_quantized(tmp_path / "out")
    x = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    theirs = llamacpp.logits(tmp_path / "out", x)
    with torch.no_grad():
        ours = back.model(x).logits.numpy()
    # llama.cpp's CPU kernels round the activations to 8 bits in every quantized product (q8_0
    # against q4_0), a relative error of about 1% of the logits' range, not float16's 0.1%
    assert np.abs(theirs - ours).max() <= 0.03 * np.abs(ours).max()
    assert llamacpp.perplexity(tmp_path / "out", x) == pytest.approx(perplexity(back.model, x), rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["q4_0", "q4_1"])
def test_embedded_model_two_blocks_written_exactly(tmp_path, name):
    result = workbench.quantize(model="smollm2-135m", method="gptq", format=f"gguf:{name}", max_blocks=2,
                                save_dir=tmp_path / "out", **RUN)
    weights = file_weights(tmp_path / "out")
    model = result.model
    for i in range(2):
        modules = dict(model.model.layers[i].named_modules())
        for hf, gname in KINDS.items():
            W = modules[hf].weight.detach().float()
            if gname in ("attn_q", "attn_k"):
                W = W[rotary_rows(W.shape[0], 9 if gname == "attn_q" else 3)]
            assert np.abs(weights[f"blk.{i}.{gname}.weight"].reshape(W.shape) - W.numpy()).max() == 0
    # the blocks not quantized and the embedding keep the source file's bytes (Q4_1 and Q8_0)
    import gguf
    reader = gguf.GGUFReader(find_gguf(tmp_path / "out"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.5.attn_q.weight"] == "Q4_1"
    assert types["blk.0.attn_q.weight"] == name.upper()
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("tokenizer.ggml.pre", "llama.block"))}
    assert fields == {"tokenizer.ggml.pre": "smollm", "llama.block_count": 30}


def test_a_saved_app_run_is_the_file_quantize_writes(wide_llama, tmp_path):
    """The app saves a finished run (its codes put back into the cached model): the same bytes as
    ``workbench quantize --save`` of the same settings."""
    from workbench import workspace
    cfg = workbench.QuantizeConfig(model=wide_llama, method="gptq", format="gguf:q4_1", **{**RUN, "eval_windows": 2})
    outcome = workspace.run(cfg, models=workspace.ModelCache(), heldout=2)
    workspace.save_outcome(outcome, tmp_path / "app", models=workspace.ModelCache())
    workbench.quantize(cfg, save_dir=tmp_path / "cli")
    assert find_gguf(tmp_path / "app").read_bytes() == find_gguf(tmp_path / "cli").read_bytes()
    outcome.packed = None
    with pytest.raises(WorkbenchError, match="run it again"):
        workspace.save_outcome(outcome, tmp_path / "again")
