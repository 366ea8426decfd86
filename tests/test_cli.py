import os
import subprocess
import sys

import pytest

from workbench.cli import main


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_clean_failure(code, err, report, needle):
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("workbench: error:"), err
    assert needle in lines[0]
    assert not os.path.exists(report)
    assert not [p for p in os.listdir(os.path.dirname(report)) if p.startswith(".")]


@pytest.mark.parametrize("extra,needle", [
    (["--bits", "9"], "--bits must be at most 8, got 9"),
    (["--bits", "1"], "--bits must be at least 2, got 1"),
    (["--bits", "four"], "--bits must be a whole number, got 'four'"),
    (["--method", "awq"], "--method must be one of rtn, gptq, boa, turboboa, turboboa-tuned, aespa, brecq, got 'awq'"),
    (["--iters", "5"], "--iters applies to aespa, brecq, not gptq"),
    (["--lr", "nan", "--method", "aespa"], "--lr must be a finite number, got nan"),
    (["--group-size", "24"], "group size 24 does not divide the input width 64"),
    (["--group-size", "0"], "--group-size must be -1 (one grid per output channel) or a positive width, got 0"),
    (["--eval-windows", "100000"], "fewer than the 100000 requested"),
    (["--calib-samples", "0"], "--calib-samples must be at least 1"),
])
def test_bad_settings(tiny_checkpoints, tmp_path, capsys, extra, needle):
    report = str(tmp_path / "r.json")
    code, _, err = run_cli(["quantize", "--model", tiny_checkpoints["llama"], "--report", report, "--quiet",
                            "--seqlen", "32", "--calib-samples", "2", "--device", "cpu", *extra], capsys)
    assert_clean_failure(code, err, report, needle)


def test_unknown_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = str(tmp_path / "r.json")
    code, _, err = run_cli(["quantize", "--model", "no-such-org/no-such-model", "--report", report], capsys)
    assert_clean_failure(code, err, report, "unknown model 'no-such-org/no-such-model'")


@pytest.mark.parametrize("content,needle", [("", "the text is empty"), ("just a few words", "too short for windows")])
def test_empty_or_short_calibration_text(tiny_checkpoints, tmp_path, capsys, content, needle):
    text = tmp_path / "calib.txt"
    text.write_text(content)
    report = str(tmp_path / "r.json")
    code, _, err = run_cli(["quantize", "--model", tiny_checkpoints["llama"], "--calib", str(text),
                            "--seqlen", "32", "--report", report, "--quiet"], capsys)
    assert_clean_failure(code, err, report, needle)


def test_unwritable_report_path(tiny_checkpoints, tmp_path, capsys):
    report = str(tmp_path / "missing-dir" / "r.json")
    code, _, err = run_cli(["quantize", "--model", tiny_checkpoints["llama"], "--report", report], capsys)
    assert code == 2 and "does not exist" in err
    assert not os.path.exists(report)


@pytest.mark.parametrize("method", ["gptq", "boa", "turboboa"])
def test_quantize_writes_report(tiny_checkpoints, tmp_path, method):
    report = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", "quantize", "--model", tiny_checkpoints["opt"],
                           "--method", method, "--bits", "4", "--group-size", "16", "--calib-samples", "2",
                           "--seqlen", "32", "--eval-windows", "2", "--report", str(report), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import json
    data = json.loads(report.read_text())
    assert {"model", "method", "config", "ppl_fp", "ppl_quant", "quant_seconds", "peak_memory_bytes",
            "layers"} <= set(data)
    assert data["layers"][0].keys() >= {"name", "block", "kind", "loss", "rel_error", "seconds"}
    assert "ppl fp" in proc.stdout
    assert data["method"] == method
    # the method's resolved options are recorded, not only what the command line set
    assert data["config"]["solver"]["rows_per_step"] == {"gptq": 1, "boa": 1, "turboboa": 8}[method]
    assert data["config"]["solver"]["act_order"] is True
