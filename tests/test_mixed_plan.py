"""Plans, plan files and ``--keep-bits``: parsed, checked against the model before any work, and the
rules between the mixed-precision settings."""
from __future__ import annotations

import json

import pytest

import workbench
from workbench.config import QuantizeConfig
from workbench.errors import WorkbenchError
from workbench.mixed.overrides import Override, apply_overrides, parse_override
from workbench.mixed.plan import Layer, Plan, read_plan, run_layers, write_plan
from workbench.mixed.setup import allocation_widths, request_of, tied_items
from workbench.mixed.sizes import packed_bytes
from workbench.models.loading import load_model

SMALL = dict(group_size=16, calib_samples=4, seqlen=32, eval_windows=-1, device="cpu", batch_size=2)
Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    return load_model(tiny_checkpoints["llama"])


def test_override_items_parse():
    assert parse_override("q:8") == Override("q", None, 8)
    assert parse_override(" down@0-2:4 ") == Override("down", (0, 2), 4)
    assert parse_override("MLP@3:2") == Override("mlp", (3, 3), 2)
    assert [parse_override(t).text() for t in ("q:8", "down@0-2:4", "mlp@3:2")] == ["q:8", "down@0-2:4", "mlp@3:2"]
    for bad, says in [("q", "is not KIND"), ("q:", "is not KIND"), ("@0:4", "is not KIND"), ("q@a:4", "is not KIND"),
                      ("q:1", "from 2 to 8, got 1"), ("q:4.5", "got '4.5'"), ("q@3-1:4", "block range 3-1 is empty")]:
        with pytest.raises(WorkbenchError, match=says):
            parse_override(bad)


def test_overrides_name_kinds_halves_and_block_ranges(llama):
    fam = llama.family
    run = {l.name for l in run_layers(llama.model, fam, None, ())}
    got = apply_overrides([parse_override(t) for t in ("attn:4", "q@1:8", "mlp:3", "down@0-0:2")], fam, 2, run)
    assert got[Q0] == 4 and got["model.layers.1.self_attn.q_proj"] == 8
    assert got["model.layers.1.self_attn.o_proj"] == 4 and got["model.layers.0.mlp.gate_proj"] == 3
    assert got["model.layers.0.mlp.down_proj"] == 2 and got["model.layers.1.mlp.down_proj"] == 3
    assert set(got) == run
    with pytest.raises(WorkbenchError, match=r"^--keep-bits fc1:4: 'fc1' is not a kind of this model's linears; use "
                                             r"one of q, k, v, o, gate, up, down, attn, mlp$"):
        apply_overrides([parse_override("fc1:4")], fam, 2, run)
    with pytest.raises(WorkbenchError, match=r"^--keep-bits q@1-5:4: the model has blocks 0-1; give blocks in that "
                                             r"range$"):
        apply_overrides([parse_override("q@1-5:4")], fam, 2, run)
    with pytest.raises(WorkbenchError, match="names only layers the run leaves in full precision"):
        apply_overrides([parse_override("q@1:4")], fam, 2, {Q0})


def test_fused_layers_are_one_item_unless_split(llama):
    layers = run_layers(llama.model, llama.family, 1, ())
    items = [[l.kind for l in item] for item in tied_items(layers, llama.family, split=False)]
    assert items == [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]
    assert len(tied_items(layers, llama.family, split=True)) == 7


def test_plan_file_round_trip(tmp_path, llama):
    layers = run_layers(llama.model, llama.family, None, ())
    bits = {l.name: 2 + i % 7 for i, l in enumerate(layers)}
    path = write_plan(tmp_path / "plan.json", Plan(bits, {"source": "budget", "avg_bits": 4.2, "layers": bits}))
    data = json.loads(path.read_text())
    assert data["format"] == "workbench-mixed-plan" and data["avg_bits"] == 4.2
    assert read_plan(path) == bits
    (tmp_path / "bare.json").write_text(json.dumps(bits))        # a mapping alone, as written by hand
    assert read_plan(tmp_path / "bare.json") == bits
    cfg = QuantizeConfig(model="x", plan=str(path), keep_bits=("down@1:8",), **SMALL).validate()
    request = request_of(llama.model, llama.family, cfg)
    assert request.budget is None and request.fixed == {**bits, "model.layers.1.mlp.down_proj": 8}


def _plan(tmp_path, body) -> str:
    path = tmp_path / "plan.json"
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return str(path)


def test_bad_plan_files_are_refused_with_the_fix(tmp_path):
    cases = [("{not json", r"is not JSON \(Expecting property name enclosed in double quotes at line 1 column 2\); "
                           r"write it as \{\"layers\": \{\"LAYER NAME\": BITS, ...\}\}"),
             ({"layers": {}}, "holds no widths"),
             ([2, 3], "holds no widths"),
             ({"layers": {Q0: 9, "model.layers.0.self_attn.k_proj": "4"}},
              r"gives widths outside 2-8 \(model.layers.0.self_attn.q_proj: 9, model.layers.0.self_attn.k_proj: '4'\); "
              r"bits must be whole numbers from 2 to 8")]
    for body, says in cases:
        with pytest.raises(WorkbenchError, match=r"^--plan file '.*plan.json' " + says):
            QuantizeConfig(plan=_plan(tmp_path, body)).validate()


def test_plans_that_do_not_fit_the_run_are_refused_before_any_work(tiny_checkpoints, tmp_path, llama):
    bits = {l.name: 3 for l in run_layers(llama.model, llama.family, None, ())}
    report = tmp_path / "r.json"
    cases = [({**bits, "model.layers.0.self_attn.qproj": 4}, {},
              r"names layers the model does not have \(model.layers.0.self_attn.qproj\); its names look like "
              r"model.layers.0.self_attn.q_proj: was the plan written for another model\?"),
             ({k: v for k, v in bits.items() if "layers.1." not in k}, {},
              r"gives no width to 7 layers the run quantizes \(model.layers.1.self_attn.q_proj, "
              r"model.layers.1.self_attn.k_proj, model.layers.1.self_attn.v_proj and 4 more\); add them to the plan, "
              r"or leave them in full precision with --ignore or --max-blocks"),
             (bits, {"max_blocks": 1}, r"gives widths to 7 layers the run leaves in full precision"),
             (bits, {"ignore": ("*.down_proj",)}, r"gives widths to 2 layers the run leaves in full precision")]
    for plan, extra, says in cases:
        path = _plan(tmp_path, {"layers": plan})
        with pytest.raises(WorkbenchError, match=r"^--plan '.*plan.json' " + says):
            workbench.quantize(model=tiny_checkpoints["llama"], plan=path, report_path=report, **SMALL, **extra)
        assert not report.exists()


def test_budgets_below_the_smallest_plan_are_refused_before_any_work(tiny_checkpoints, tmp_path):
    report = tmp_path / "r.json"
    # 2-bit codes, a float16 scale and a 2-bit zero point per 16 weights: 3.125 bits, and the shapes' 16 bytes a
    # layer (3.1493...); the least budget offered is rounded up
    with pytest.raises(WorkbenchError, match=r"^--avg-bits 3.0 is below the smallest plan: every layer at 2 bits "
                                             r"takes 3.1493 bits per weight, 0.029024 MB; give --avg-bits 3.1494 or "
                                             r"more$"):
        workbench.quantize(model=tiny_checkpoints["llama"], avg_bits=3.0, report_path=report, **SMALL)
    with pytest.raises(WorkbenchError, match=r"^--max-size 0.03 is below the smallest plan: every layer at 3 "
                                             r"bits, the layers of --keep-bits at theirs, takes .* give "
                                             r"--max-size 0.0"):
        workbench.quantize(model=tiny_checkpoints["llama"], max_size=0.03, candidate_bits=("3", "4"),
                           keep_bits=("q:8",), report_path=report, **SMALL)
    assert not report.exists()


@pytest.mark.parametrize("values,says", [
    (dict(avg_bits=3.5, max_size=1.0), "^--avg-bits and --max-size are two budgets; give one of them$"),
    (dict(avg_bits=3.5, plan="p.json"), "--plan gives every layer its width, and --avg-bits would choose them"),
    (dict(max_size=1.0, bits=3), "^--bits 3 would give every layer one width, and --max-size gives each its own; "
                                 "leave --bits out$"),
    (dict(sensitivity="objective"), "^--sensitivity shapes how a size budget is spent; give --avg-bits or "
                                    "--max-size, or leave --sensitivity out$"),
    (dict(candidate_bits=(2, 4)), "^--candidate-bits shapes how a size budget is spent"),
    (dict(split_fused=True, keep_bits=("q:8",)), "^--split-fused shapes how a size budget is spent"),
    (dict(keep_bits=("q:8",), format="gguf:q4_0"), "^--format gguf:q4_0 stores every layer on the type's one grid, "
                                                   "and --keep-bits gives layers different widths"),
    (dict(avg_bits=3.5, offload="disk"), "^--avg-bits runs with the model in memory; use --offload none$"),
    (dict(avg_bits=3.5, act_bits=8), "^--avg-bits measures each layer's sensitivity on the model's own weights"),
])
def test_rules_between_the_mixed_settings(tmp_path, monkeypatch, values, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.json").write_text(json.dumps({Q0: 4}))
    with pytest.raises(WorkbenchError, match=says):
        QuantizeConfig(**values).validate()


def test_widths_from_the_api_may_be_numbers():
    cfg = QuantizeConfig(avg_bits=3.0, candidate_bits=[4, 2, 3]).validate()
    assert cfg.candidate_bits == ("4", "2", "3") and cfg.candidates() == (2, 3, 4)


def test_plan_out_needs_a_mixed_run(tiny_checkpoints, tmp_path):
    with pytest.raises(WorkbenchError, match="^--plan-out writes the widths of a mixed-precision run"):
        workbench.quantize(model=tiny_checkpoints["llama"], plan_out=tmp_path / "p.json", **SMALL)


def test_a_budget_without_candidates_chooses_between_the_widths_around_it():
    layers = [Layer("a", 0, "q", 64, 128), Layer("b", 0, "down", 32, 256)]
    cfg = QuantizeConfig(avg_bits=3.5, group_size=64).validate()
    size = {b: sum(packed_bytes(l.d_out, l.d_in, b, 64, False) for l in layers) for b in (2, 3, 4, 8)}
    assert allocation_widths(cfg, layers, (size[3] + size[4]) // 2) == (3, 4)
    assert allocation_widths(cfg, layers, size[2] + 1) == (2, 3)
    assert allocation_widths(cfg, layers, size[4] + 1) == (4, 8)
    assert allocation_widths(cfg, layers, size[3]) == (3,)             # a uniform plan fits exactly
    assert allocation_widths(cfg, layers, size[8] * 2) == (8,)
    given = QuantizeConfig(avg_bits=3.5, group_size=64, candidate_bits=("2", "8")).validate()
    assert allocation_widths(given, layers, (size[3] + size[4]) // 2) == (2, 8)
