"""Numbers out of range: strict JSON with null and a flag, and a perplexity that overflows is infinite."""
import json
from types import SimpleNamespace

import torch
from torch import nn

from workbench.cli import main
from workbench.evaluate import perplexity
from workbench.jsonsafe import dumps, restore
from workbench.report import LayerRecord, Report


def strict(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_report_writes_null_with_a_flag_and_reads_the_values_back(tmp_path):
    r = Report(model="m", method="gptq", config={"damp": 0.01}, ppl_fp=12.5, ppl_quant=float("inf"),
               layers=[LayerRecord("a/b", 0, "q", float("nan"), 0.1, 1.0, {"x": float("-inf")})])
    path = r.to_json(tmp_path / "r.json")
    data = strict(path.read_text())
    assert data["ppl_quant"] is None and data["layers"][0]["loss"] is None
    assert data["non_finite"] == {"/ppl_quant": "inf", "/layers/0/loss": "nan", "/layers/0/extra/x": "-inf"}
    back = Report.from_json(path)
    assert back.ppl_quant == float("inf") and back.layers[0].extra["x"] == float("-inf")
    assert back.layers[0].loss != back.layers[0].loss     # nan
    assert back.ppl_fp == 12.5


def test_keys_with_slashes_round_trip():
    obj = {"a/b": [1.0, float("nan")], "c~d": {"e": float("inf")}}
    again = restore(strict(dumps(obj)))
    assert again["c~d"]["e"] == float("inf") and again["a/b"][0] == 1.0 and again["a/b"][1] != again["a/b"][1]


class Wrong(nn.Module):
    """Sure of the wrong next token: a loss of 1000 nats per token, past what exp can take."""

    def forward(self, ids, use_cache=False):
        logits = torch.zeros(*ids.shape, 8)
        logits[..., 1] = 1000.0
        return SimpleNamespace(logits=logits)


def test_a_perplexity_beyond_float_range_is_infinite_not_an_overflow():
    assert perplexity(Wrong(), torch.zeros(2, 6, dtype=torch.long)) == float("inf")


def test_the_cli_keeps_going_and_writes_null(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    import workbench.api as api
    monkeypatch.setattr(api, "perplexity", lambda *a, **k: float("inf"))
    report = tmp_path / "r.json"
    code = main(["quantize", "--model", tiny_checkpoints["llama"], "--seqlen", "32", "--calib-samples", "2",
                 "--eval-windows", "2", "--group-size", "16", "--max-blocks", "1", "--device", "cpu", "--quiet",
                 "--report", str(report)])
    assert code == 0, capsys.readouterr().err
    data = strict(report.read_text())
    assert data["ppl_quant"] is None and data["non_finite"]["/ppl_quant"] == "inf"
    assert "quant inf" in capsys.readouterr().out
