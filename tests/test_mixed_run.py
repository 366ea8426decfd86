"""Mixed-precision runs: every method quantizes each layer on its own width, a budget is planned from
the measured sensitivity and kept, and the checkpoint stores (and loads back) one scheme per width."""
from __future__ import annotations

import json

import pytest
import torch

import workbench
from workbench.cli import main
from workbench.export import ExportSettings, load_quantized, save_quantized
from workbench.mixed.sizes import packed_bytes
from workbench.models.loading import load_model

SMALL = dict(group_size=16, calib_samples=4, seqlen=32, eval_windows=-1, device="cpu", batch_size=2)
# base width 4, overridden by kind and block: every width the grids take, q/k/v and gate/up split
KEEP = ("q:2", "v:3", "up@1:8", "down@0:3")


def plain_logits(path, x):
    """Logits of the checkpoint loaded by transformers alone; None when it refuses it."""
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    except (RuntimeError, ValueError):
        return None
    with torch.no_grad():
        return model(x).logits


def expected_bits(name: str) -> int:
    block = int(name.split(".")[2])
    for kind, bits in (("q_proj", 2), ("v_proj", 3)):
        if name.endswith(kind):
            return bits
    if name.endswith("up_proj") and block == 1:
        return 8
    if name.endswith("down_proj") and block == 0:
        return 3
    return 4


def assert_on_their_widths(result, expected):
    modules = dict(result.model.named_modules())
    assert {n: q.grid.bits for n, q in result.packed.items()} == expected
    for name, q in result.packed.items():
        top = 2 ** expected[name] - 1
        assert int(q.codes.max()) <= top and float(q.zero.max()) <= top, name
        assert len(torch.unique(q.codes)) > 2 ** (expected[name] - 1), name     # the width is used, not a narrower one
        torch.testing.assert_close(q.dequantize(), modules[name].weight.data, rtol=0, atol=1e-6)
    assert {r.name: r.extra["bits"] for r in result.report.layers} == expected
    assert result.report.plan["layers"] == expected


@pytest.mark.parametrize("method", ["rtn", "gptq", "boa", "turboboa", "aespa", "brecq"])
def test_every_method_quantizes_each_layer_on_its_width(tiny_checkpoints, method):
    extra = {"iters": 5} if method in ("aespa", "brecq") else {}
    result = workbench.quantize(model=tiny_checkpoints["llama"], method=method, keep_bits=KEEP, **SMALL, **extra)
    assert_on_their_widths(result, {n: expected_bits(n) for n in result.packed})
    plan = result.report.plan
    assert plan["source"] == "keep-bits" and plan["layer_counts"] == {"2": 2, "3": 3, "4": 8, "8": 1}


@pytest.fixture(scope="module")
def budget_run(tiny_checkpoints, tmp_path_factory):
    """A GPTQ run on a budget of 3.6 bits per weight, saved, with its report and plan file."""
    out = tmp_path_factory.mktemp("mixed")
    result = workbench.quantize(model=tiny_checkpoints["llama"], method="gptq", avg_bits=3.6,
                                report_path=out / "r.json", plan_out=out / "plan.json", save_dir=out / "ckpt", **SMALL)
    return result, out


def test_a_budget_is_planned_within_its_size_and_reported(budget_run):
    result, out = budget_run
    plan = result.report.plan
    weights = sum(q.codes.numel() for q in result.packed.values())
    assert plan["source"] == "budget" and plan["budget"] == {"avg_bits": 3.6} and plan["sensitivity"] == "fisher"
    assert plan["budget_bytes"] == int(3.6 * weights / 8) and plan["size_bytes"] <= plan["budget_bytes"]
    assert plan["avg_bits"] == pytest.approx(8 * plan["size_bytes"] / weights) and plan["avg_bits"] <= 3.6
    assert len(set(plan["layers"].values())) > 1 and plan["exact"]
    # q/k/v and gate/up of a block share a width (vLLM serves a fused layer on one scheme)
    for b in range(2):
        assert len({plan["layers"][f"model.layers.{b}.self_attn.{k}_proj"] for k in "qkv"}) == 1
        assert len({plan["layers"][f"model.layers.{b}.mlp.{k}_proj"] for k in ("gate", "up")}) == 1
    assert set(plan["costs"]) == set(plan["layers"])
    # no widths given: the two whose uniform sizes lie either side of the budget, each measured
    lo, hi = plan["candidates"]
    assert not plan["candidates_given"] and set(plan["layers"].values()) == {lo, hi}
    uniform = {b: sum(packed_bytes(*result.packed[n].shape, b, 16, False) for n in plan["layers"]) for b in (lo, hi)}
    assert lo < hi and uniform[lo] <= plan["budget_bytes"] <= uniform[hi]
    assert all(c[str(lo)] >= c[str(hi)] >= 0 for c in plan["costs"].values())
    assert_on_their_widths(result, plan["layers"])
    timings = result.report.timings
    assert timings["sensitivity"] > 0 and timings["allocation"] > 0
    back = workbench.Report.from_json(out / "r.json")
    assert back.plan["layers"] == plan["layers"] and back.timings["sensitivity"] == timings["sensitivity"]


def test_the_checkpoint_stores_one_scheme_per_width_and_loads_back(budget_run, tmp_path):
    result, out = budget_run
    plan = result.report.plan
    config = json.loads((out / "ckpt" / "config.json").read_text())["quantization_config"]
    groups = config["config_groups"].values()
    assert sorted(g["weights"]["num_bits"] for g in groups) == sorted(set(plan["layers"].values()))
    for g in groups:
        assert sorted(g["targets"]) == sorted(n for n, b in plan["layers"].items() if b == g["weights"]["num_bits"])
    info = json.loads((out / "ckpt" / "export.json").read_text())
    # the allocation's sizes are the export's, byte for byte
    assert info["quantized_bytes"] == plan["size_bytes"] and info["bits"] is None
    assert info["layer_bits"] == plan["layers"]
    ck = load_quantized(out / "ckpt")
    assert ck.scheme is None and {n: q.grid.bits for n, q in ck.packed.items()} == plan["layers"]
    for name, q in result.packed.items():
        assert torch.equal(ck.packed[name].codes, q.codes) and torch.equal(ck.packed[name].zero, q.zero), name
    # float32 scales: the loaded model computes exactly the in-memory one
    save_quantized(result, tmp_path / "f32", settings=ExportSettings(dtype="float32"))
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(tmp_path / "f32").model(x).logits, result.model(x).logits,
                                   atol=1e-5, rtol=1e-5)


def test_a_written_plan_is_reused_and_may_be_edited(budget_run, tiny_checkpoints, tmp_path):
    result, out = budget_run
    data = json.loads((out / "plan.json").read_text())
    assert data["layers"] == result.report.plan["layers"] and data["size_bytes"] == result.report.plan["size_bytes"]
    again = workbench.quantize(model=tiny_checkpoints["llama"], method="rtn", plan=str(out / "plan.json"), **SMALL)
    assert again.report.plan["layers"] == data["layers"] and again.report.plan["source"] == "plan"
    data["layers"]["model.layers.1.mlp.down_proj"] = 8
    (tmp_path / "edited.json").write_text(json.dumps(data))
    edited = workbench.quantize(model=tiny_checkpoints["llama"], method="rtn", plan=str(tmp_path / "edited.json"),
                                keep_bits=("q@0:5",), **SMALL)
    assert edited.packed["model.layers.1.mlp.down_proj"].grid.bits == 8
    assert edited.packed["model.layers.0.self_attn.q_proj"].grid.bits == 5


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_size_budget_in_mb_with_fixed_layers(tiny_checkpoints, tmp_path, symmetric):
    result = workbench.quantize(model=tiny_checkpoints["llama"], method="rtn", max_size=0.05, keep_bits=("down:8",),
                                sensitivity="objective", candidate_bits=(2, 3, 4), split_fused=True,
                                symmetric=symmetric, save_dir=tmp_path / "ckpt", **SMALL)
    plan = result.report.plan
    assert plan["budget_bytes"] == 50_000 and plan["size_bytes"] <= 50_000 and plan["sensitivity"] == "objective"
    assert all(b == 8 for n, b in plan["layers"].items() if n.endswith("down_proj"))
    assert all(b in (2, 3, 4) for n, b in plan["layers"].items() if not n.endswith("down_proj"))
    assert "model.layers.0.mlp.down_proj" not in plan["costs"]         # fixed: not measured
    info = json.loads((tmp_path / "ckpt" / "export.json").read_text())
    assert info["quantized_bytes"] == plan["size_bytes"] and info["symmetric"] is symmetric
    back = load_quantized(tmp_path / "ckpt")
    assert {n: q.grid.bits for n, q in back.packed.items()} == plan["layers"]
    for name, q in result.packed.items():
        assert torch.equal(back.packed[name].codes, q.codes), name
    # plain transformers reads symmetric mixed checkpoints, and never an asymmetric one on the wrong widths
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    plain = plain_logits(tmp_path / "ckpt", x)
    assert plain is not None or not symmetric
    if plain is not None:
        with torch.no_grad():
            torch.testing.assert_close(plain, back.model(x).logits, atol=1e-4, rtol=1e-4)


def test_the_command_line_plans_reports_and_writes_the_plan(tiny_checkpoints, tmp_path, capsys):
    args = ["quantize", "--model", tiny_checkpoints["opt"], "--method", "rtn", "--avg-bits", "5.5",
            "--sensitivity", "objective", "--candidate-bits", "3,4,8", "--keep-bits", "fc2@1:8",
            "--report", str(tmp_path / "r.json"), "--plan-out", str(tmp_path / "p.json"), "--quiet",
            *[f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]]
    assert main(args) == 0
    line = capsys.readouterr().out
    plan = json.loads((tmp_path / "p.json").read_text())
    assert f"rtn mixed {plan['avg_bits']:.3f} bits per weight" in line and "sensitivity" in line
    assert plan["layers"]["model.decoder.layers.1.fc2"] == 8 and plan["avg_bits"] <= 5.5
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["plan"]["layers"] == plan["layers"] and "allocation" in report["timings"]
    assert main(["quantize", "--model", tiny_checkpoints["opt"], "--keep-bits", "gate:4", "--seqlen", "32",
                 "--quiet"]) == 2
    assert "'gate' is not a kind of this model's linears; use one of q, k, v, o, fc1, fc2, attn, mlp" in \
        capsys.readouterr().err


def test_a_uniform_run_has_no_plan_and_one_group(tiny_checkpoints, tmp_path):
    result = workbench.quantize(model=tiny_checkpoints["llama"], method="rtn", save_dir=tmp_path / "ckpt", **SMALL)
    assert result.report.plan == {} and "bits" not in result.report.layers[0].extra
    groups = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert list(groups) == ["group_0"] and groups["group_0"]["targets"] == ["Linear"]
    assert load_quantized(tmp_path / "ckpt").scheme.bits == 4


def test_the_fused_family_of_opt_is_qkv_only(tiny_checkpoints):
    assert load_model(tiny_checkpoints["opt"]).family.fused == (("q", "k", "v"),)
