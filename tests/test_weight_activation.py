"""Weight-activation quantization: the per-token quantizer, the rotation, and runs with both."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import workbench
from workbench.config import QuantizeConfig
from workbench.errors import WorkbenchError
from workbench.models import family_for
from workbench.quant.activation import CLIP_CANDIDATES, ActivationGrid, fake_quantize_heads, fake_quantize_tokens
from workbench.quant.hadamard import rotation
from workbench.rotate import rotate_model
from workbench.transformed import TransformedLinear, install

from tests.conftest import tiny_llama

SMALL = dict(bits=4, group_size=32, calib_samples=8, seqlen=64, eval_windows=4, batch_size=4)


def _with_norm_scales(model):
    """Norm scales other than 1, so that folding them is tested."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


@pytest.mark.parametrize("kind", ["hadamard", "random"])
@pytest.mark.parametrize("over", [{}, {"tie_word_embeddings": False},
                                  {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2,
                                   "intermediate_size": 192}])
def test_rotation_keeps_the_logits(kind, over):
    model = _with_norm_scales(tiny_llama(**over))
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        rotated = copy.deepcopy(model)
        found = rotate_model(rotated, family_for(rotated.config), kind, seed=3)
        out = rotated(ids).logits
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    assert set(found) == {"residual", "mlp", "attention", "head_dim"}
    if kind == "hadamard" and over.get("hidden_size") == 96:       # 96 = 12 * 8: a Paley factor
        assert found["residual"] == "96: hadamard 12x8"
    if kind == "random":
        assert all("random" in v for v in found.values())
    # the weights did change: the stream is rotated, not left alone
    assert not torch.allclose(rotated.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_online_transform_is_the_matrix_product():
    torch.manual_seed(0)
    layer = TransformedLinear.of(torch.nn.Linear(96, 8))
    R = rotation(96, "hadamard")
    layer.online = R
    x = torch.randn(3, 5, 96)
    assert torch.allclose(layer(x), F.linear(x @ R.matrix(torch.float32), layer.weight, layer.bias), atol=1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_per_token_quantizer_is_on_its_grid_and_idempotent(bits, symmetric):
    torch.manual_seed(0)
    x = torch.randn(4, 7, 64) * torch.rand(4, 7, 1) * 5
    q = fake_quantize_tokens(x, bits, symmetric)
    for row, qrow in zip(x.reshape(-1, 64), q.reshape(-1, 64)):
        levels = torch.unique(qrow)
        assert len(levels) <= 2 ** bits
        step = (levels[1:] - levels[:-1]).min()
        # every value is an integer multiple of the row's step (the grid contains 0)
        assert torch.allclose(qrow / step, torch.round(qrow / step), atol=1e-3)
        assert float((qrow - row).abs().max()) <= float(step) * 0.5 + 1e-5
    assert torch.allclose(fake_quantize_tokens(q, bits, symmetric), q, atol=1e-6)
    assert ActivationGrid(16, symmetric)(x) is x


def test_clipping_narrows_the_grid():
    x = torch.randn(2, 64)
    clipped = fake_quantize_tokens(x, 4, False, clip=0.5)
    assert float(clipped.max()) <= 0.5 * float(x.max()) + 1e-6


def test_kv_heads_are_quantized_each_on_its_own_grid():
    torch.manual_seed(0)
    t = torch.randn(2, 5, 3 * 16)
    t[..., :16] *= 100           # one head far larger: a shared grid would flatten the others
    q = fake_quantize_heads(t, 16, ActivationGrid(4))
    assert torch.equal(q[..., 16:32], fake_quantize_tokens(t[..., 16:32], 4, False))
    assert fake_quantize_heads(t, 16, ActivationGrid(16)) is t


def test_sixteen_bit_activations_change_nothing():
    model = tiny_llama()
    ids = torch.randint(0, 512, (2, 16))
    ref = model(ids).logits
    family = family_for(model.config)
    install(model, family, [(b, k) for b in range(2) for k in family.linears], ActivationGrid(16), ActivationGrid(16))
    assert torch.equal(model(ids).logits, ref)


def _outlier_checkpoint(tmp_path, tokenizer):
    """A tiny LLaMA whose residual stream has a few huge channels, as trained LLMs do."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :3] *= 30
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return str(tmp_path)


def test_rotation_removes_activation_outliers(tmp_path, tokenizer):
    ckpt = _outlier_checkpoint(tmp_path, tokenizer)
    errors = {}
    for rotate in ("none", "hadamard"):
        rep = workbench.quantize(model=ckpt, method="rtn", act_bits=4, rotate=rotate, **SMALL).report
        qkv = [r.extra["act_rel_error"] for r in rep.layers if r.kind == "q"]
        errors[rotate] = sum(qkv) / len(qkv)
    assert errors["hadamard"] < 0.5 * errors["none"]


@pytest.mark.parametrize("method", ["rtn", "gptq", "boa", "turboboa", "aespa", "brecq"])
def test_every_method_runs_rotated_with_quantized_activations(method, tiny_checkpoints):
    extra = {"iters": 5} if method in ("aespa", "brecq") else {}
    result = workbench.quantize(model=tiny_checkpoints["llama"], method=method, act_bits=4, kv_bits=4,
                                rotate="hadamard", **SMALL, **extra)
    rep = result.report
    assert rep.config["act_bits"] == 4 and rep.config["kv_bits"] == 4 and rep.config["rotate"] == "hadamard"
    assert rep.config["rotation"]["residual"] == "64: hadamard (Sylvester)"
    assert rep.ppl_quant is not None and rep.ppl_quant < 10 * rep.ppl_fp
    for r in rep.layers:
        assert 0 < r.extra["act_rel_error"] < 1
        assert r.extra["act_clip"] in CLIP_CANDIDATES
    # the quantizers are on the model that was evaluated
    k = family_for(result.model.config).linear(result.model.model.layers[0], "k")
    assert isinstance(k, TransformedLinear) and k.heads is not None and k.act.bits == 4


def test_a_given_clip_is_used_everywhere(tiny_checkpoints):
    rep = workbench.quantize(model=tiny_checkpoints["llama"], method="gptq", act_bits=6, act_clip=0.8,
                             max_blocks=1, **SMALL).report
    assert {r.extra["act_clip"] for r in rep.layers} == {0.8}
    assert {r.block for r in rep.layers} == {0}


@pytest.mark.parametrize("settings, words", [
    ({"act_clip": 0.9}, ["--act-clip", "--act-bits"]),
    ({"act_symmetric": True}, ["--act-symmetric", "--act-bits"]),
    ({"act_bits": 5}, ["--act-bits", "4, 6, 8, 16"]),
    ({"rotate": "givens"}, ["--rotate", "hadamard"]),
    ({"rotate": "hadamard", "offload": "disk"}, ["--offload", "none"]),
])
def test_bad_settings_are_refused(settings, words):
    with pytest.raises(WorkbenchError) as err:
        QuantizeConfig(**settings).validate()
    assert all(w in str(err.value) for w in words)


def test_opt_is_not_rotated(tiny_checkpoints):
    with pytest.raises(WorkbenchError, match="LayerNorm.*--rotate none"):
        workbench.quantize(model=tiny_checkpoints["opt"], method="rtn", rotate="hadamard", **SMALL)


def test_opt_quantizes_activations_without_rotation(tiny_checkpoints):
    rep = workbench.quantize(model=tiny_checkpoints["opt"], method="gptq", act_bits=8, **SMALL).report
    assert all(0 < r.extra["act_rel_error"] < 0.01 for r in rep.layers)


def test_a_transformed_run_is_not_saved(tiny_checkpoints, tmp_path):
    out = tmp_path / "q"
    with pytest.raises(WorkbenchError, match="--rotate"):
        workbench.quantize(model=tiny_checkpoints["llama"], method="rtn", rotate="hadamard", save_dir=out, **SMALL)
    assert not out.exists()


def test_the_outlier_picture_shows_what_rotation_removes(tokenizer):
    from workbench.diagnostics.outliers import outliers_before_after
    from workbench.figures import outlier_figure
    from workbench.figures.outliers import peak_ratio
    from workbench.models.loading import LoadedModel
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :3] *= 30
    loaded = LoadedModel("tiny", model, tokenizer, family_for(model.config), "tiny")
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    found = outliers_before_after(loaded, 1, "q", ids)
    assert found["before"].shape == found["after"].shape == (64,)
    assert peak_ratio(found["before"]) > 5 * peak_ratio(found["after"])
    assert torch.equal    # the model itself is not rotated(model.model.embed_tokens.weight[:, 3:], tiny_llama().model.embed_tokens.weight[:, 3:])
    fig = outlier_figure(found["before"], found["after"])
    assert len(fig.data) == 2 and all(len(t.y) == 64 for t in fig.data)
    with pytest.raises(WorkbenchError, match="blocks 0 to 1"):
        outliers_before_after(loaded, 5, "q", ids)


def test_the_app_runs_a_rotated_run_measures_it_in_its_own_basis_and_tries_it(tiny_checkpoints, tmp_path):
    from workbench import tryit, workspace
    models = workspace.ModelCache()
    errors = {}
    for rotate in ("none", "hadamard"):
        cfg = QuantizeConfig(model=tiny_checkpoints["llama"], method="gptq", act_bits=8, rotate=rotate, **SMALL)
        outcome = workspace.run(cfg, models=models)
        errors[rotate] = outcome.layers["heldout_rel_error"].tolist()
    # at 8-bit activations both runs are close to their full-precision models; compared in the wrong basis the
    # rotated run's layers would be off by the size of their outputs
    assert all(0 < e < 0.05 for e in errors["hadamard"])
    diff = tryit.try_outcome(outcome, prompt="The history of", tokens=8, models=models)
    assert 1 <= len(diff.quant.tokens) <= 8 and 1 <= len(diff.fp.tokens) <= 8
    with pytest.raises(WorkbenchError, match="rotates or quantizes activations"):
        workspace.save_outcome(outcome, tmp_path / "out", models=models)
    assert not (tmp_path / "out").exists()
