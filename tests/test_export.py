"""Export: compressed-tensors pack-quantized and float16 fake-quant checkpoints, read back."""
import json
import os

import pytest
import torch

pytest.importorskip("compressed_tensors")

import workbench
from workbench import export
from workbench.cli import main
from workbench.data import evaluation_windows
from workbench.evaluate import perplexity
from workbench.export import ExportSettings, load_quantized, save_fake_quant, save_quantized

RUN = dict(method="gptq", calib_samples=4, seqlen=64, eval_windows=2, batch_size=2, device="cpu")
FLOAT32 = ExportSettings(dtype="float32")


def quantize(model, **over):
    return workbench.quantize(model=model, **{**RUN, "bits": 4, "group_size": 16, **over})


def ids(n=2, length=48):
    return torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model, x):
    return model(x).logits.float()


def plain_load(path, **kw):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def assert_same_codes(packed, loaded, exact_scales=True):
    assert set(packed) == set(loaded)
    for name, p in packed.items():
        q = loaded[name]
        assert torch.equal(p.codes, q.codes), name
        assert torch.equal(p.zero, q.zero), name
        expected = p.scale if exact_scales else p.scale.half().float()
        assert torch.equal(expected, q.scale), name


def no_leftovers(parent):
    return not [p for p in os.listdir(parent) if p.startswith(".")]


@pytest.fixture(scope="module")
def run(tiny_checkpoints, tmp_path_factory):
    """One quantize run on the tiny LLaMA that writes its checkpoint (float16, the default)."""
    out = tmp_path_factory.mktemp("export") / "w4g16"
    return quantize(tiny_checkpoints["llama"], save_dir=out), out


def test_float32_export_round_trips_exactly(run, tmp_path):
    result, _ = run
    info = save_quantized(result, tmp_path / "ckpt", settings=FLOAT32)
    ck = load_quantized(tmp_path / "ckpt")
    assert_same_codes(result.packed, ck.packed)
    x = ids()
    expected = logits(result.model, x)
    torch.testing.assert_close(logits(ck.model, x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(plain_load(tmp_path / "ckpt", dtype=torch.float32), x), expected,
                               atol=1e-5, rtol=1e-5)
    assert ck.info == info and ck.scheme == export.WeightScheme(4, 16, False)


def test_quantize_save_dir_writes_pack_quantized(run):
    result, out = run
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["quantization_status"] == "compressed" and q["ignore"] == ["lm_head"]
    weights = q["config_groups"]["group_0"]["weights"]
    assert q["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"], weights["symmetric"]) == \
        (4, "group", 16, False)
    assert config["dtype"] == "float16"
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        name = "model.layers.0.self_attn.q_proj"
        assert f.get_tensor(f"{name}.weight_packed").dtype == torch.int32
        assert f.get_tensor(f"{name}.weight_packed").shape == (64, 64 * 4 // 32)
        assert f.get_tensor(f"{name}.weight_scale").dtype == torch.float16
        assert f.get_tensor(f"{name}.weight_zero_point").dtype == torch.int32
        assert f"{name}.weight" not in f.keys()
    assert (out / "tokenizer.json").exists() and no_leftovers(out.parent)
    info = json.loads((out / "export.json").read_text())
    assert info["quantized_layers"] == len(result.packed) == 14
    assert info["float16_bytes"] == sum(p.codes.numel() * 2 for p in result.packed.values())
    # 4-bit codes + float16 scale and 4-bit zero per 16 weights: 16 * 16 / (16 * 4 + 16 + 4) bits
    assert info["ratio"] == pytest.approx(256 / 84, rel=0.02)


def test_float16_export_matches_in_memory_model(run, tokenizer):
    result, out = run
    ck = load_quantized(out)
    assert_same_codes(result.packed, ck.packed, exact_scales=False)
    windows = evaluation_windows(tokenizer, "wikitext2-test", 64, 4)
    assert perplexity(ck.model, windows) == pytest.approx(perplexity(result.model, windows), rel=1e-3)
    x = ids()
    torch.testing.assert_close(logits(ck.model, x), logits(result.model, x), atol=2e-3, rtol=1e-2)
    model = plain_load(out)            # as a serving user would: the checkpoint's own dtype
    assert model.dtype == torch.float16
    torch.testing.assert_close(logits(model, x), logits(result.model, x), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, -1, False), (4, 16, True), (8, -1, True),
                                                       (3, 16, False), (2, 32, True)])
def test_variants_round_trip(tiny_checkpoints, tmp_path, bits, group_size, symmetric):
    result = quantize(tiny_checkpoints["llama"], bits=bits, group_size=group_size, symmetric=symmetric,
                      eval_windows=-1)
    info = save_quantized(result, tmp_path / "ckpt", settings=FLOAT32)
    assert (info.bits, info.group_size, info.symmetric) == (bits, group_size, symmetric)
    weights = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"][
        "config_groups"]["group_0"]["weights"]
    assert weights["strategy"] == ("channel" if group_size == -1 else "group")
    ck = load_quantized(tmp_path / "ckpt")
    assert_same_codes(result.packed, ck.packed)
    x = ids()
    expected = logits(result.model, x)
    torch.testing.assert_close(logits(ck.model, x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(plain_load(tmp_path / "ckpt", dtype=torch.float32), x), expected,
                               atol=1e-5, rtol=1e-5)


def test_tied_embeddings_and_biases(tiny_checkpoints, tmp_path):
    """OPT ties lm_head to the embeddings and has biases on every linear."""
    result = quantize(tiny_checkpoints["opt"], eval_windows=-1)
    assert result.model.config.tie_word_embeddings
    save_quantized(result, tmp_path / "ckpt", settings=FLOAT32)
    ck = load_quantized(tmp_path / "ckpt")
    assert_same_codes(result.packed, ck.packed)
    x = ids()
    torch.testing.assert_close(logits(ck.model, x), logits(result.model, x), atol=1e-5, rtol=1e-5)


def test_existing_directory_is_refused_before_any_work(tiny_checkpoints, tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "config.json").write_text("{}")
    events = []
    with pytest.raises(workbench.WorkbenchError, match="exists; pass --overwrite"):
        quantize(tiny_checkpoints["llama"], save_dir=target, on_event=events.append)
    assert events == [] and (target / "config.json").read_text() == "{}"


def test_overwrite_replaces_a_checkpoint_but_not_other_directories(run, tmp_path):
    result, _ = run
    target = tmp_path / "ckpt"
    save_fake_quant(result, target)
    with pytest.raises(workbench.WorkbenchError, match="exists; pass --overwrite"):
        save_quantized(result, target)
    save_quantized(result, target, overwrite=True)
    assert json.loads((target / "export.json").read_text())["format"] == "pack-quantized"
    assert no_leftovers(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    with pytest.raises(workbench.WorkbenchError, match="holds no checkpoint"):
        save_quantized(result, home, overwrite=True)
    assert (home / "notes.txt").read_text() == "keep me"
    with pytest.raises(workbench.WorkbenchError, match="does not exist"):
        save_quantized(result, tmp_path / "missing" / "ckpt")


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_no_directory(run, tmp_path, monkeypatch, error):
    result, _ = run
    written = []

    def fail(dir, *args):
        written.extend(os.listdir(dir))    # the model files are there by now
        raise error("disk full")
    monkeypatch.setattr(export, "measure", fail)
    with pytest.raises(error):
        save_quantized(result, tmp_path / "ckpt")
    assert "model.safetensors" in written
    assert not (tmp_path / "ckpt").exists() and no_leftovers(tmp_path)


def test_interrupted_overwrite_keeps_the_old_checkpoint(run, tmp_path, monkeypatch):
    result, _ = run
    target = tmp_path / "ckpt"
    save_fake_quant(result, target)
    before = sorted(os.listdir(target))
    monkeypatch.setattr(export, "measure", lambda *a: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        save_quantized(result, target, overwrite=True)
    assert sorted(os.listdir(target)) == before and no_leftovers(tmp_path)
    assert json.loads((target / "export.json").read_text())["format"] == "fake-quant"


def test_cli_save(tiny_checkpoints, tmp_path, capsys):
    target = tmp_path / "ckpt"
    args = ["quantize", "--model", tiny_checkpoints["llama"], "--bits", "4", "--group-size", "32",
            "--calib-samples", "2", "--seqlen", "32", "--eval-windows", "-1", "--device", "cpu", "--quiet",
            "--save", str(target)]
    assert main(args) == 0
    ck = load_quantized(target)
    assert ck.scheme == export.WeightScheme(4, 32, False) and len(ck.packed) == 14
    capsys.readouterr()
    assert main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_fake_quant_export(run, tmp_path):
    result, _ = run
    info = save_fake_quant(result, tmp_path / "fake")
    config = json.loads((tmp_path / "fake" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float16"
    assert info.format == "fake-quant" and info.ratio == 1.0
    model = plain_load(tmp_path / "fake", dtype=torch.float32)
    for name, p in result.packed.items():
        weight = model.get_submodule(name).weight
        assert weight.dtype == torch.float32
        torch.testing.assert_close(weight, result.model.get_submodule(name).weight.half().float())
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(result.model, x), atol=2e-3, rtol=1e-2)
    with pytest.raises(workbench.WorkbenchError, match="not a compressed-tensors pack-quantized"):
        load_quantized(tmp_path / "fake")


def test_unpackable_bits_are_named(run, tmp_path, monkeypatch):
    result, _ = run
    monkeypatch.setattr(export, "supported_bits", lambda: (4, 8))
    with pytest.raises(workbench.WorkbenchError, match="supported bit widths: 4, 8"):
        save_quantized(_with_bits(result, 3), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def _with_bits(result, bits):
    """The same run as if its layers' grids said ``bits`` (export reads the grid from the layers)."""
    import dataclasses
    packed = {k: dataclasses.replace(q, grid=dataclasses.replace(q.grid, bits=bits)) for k, q in result.packed.items()}
    return workbench.QuantizeResult(result.model, result.tokenizer, result.report, packed)


def test_model_changed_after_quantize_is_refused(run, tmp_path):
    result, _ = run
    layer = result.model.get_submodule("model.layers.0.mlp.up_proj")
    saved = layer.weight.data.clone()
    layer.weight.data += 0.01
    try:
        with pytest.raises(workbench.WorkbenchError, match="no longer matches its codes"):
            save_quantized(result, tmp_path / "ckpt")
    finally:
        layer.weight.data = saved
    assert not (tmp_path / "ckpt").exists()
