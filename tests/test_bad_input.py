"""Bad input on the command line: exit status 2, one line on stderr naming the problem, nothing written.

Each case here ended in a traceback (or a run that failed late) before: ``workbench quantize``
and ``workbench genie`` now refuse it before any work.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from workbench.cli import main

FAST = ["--seqlen", "32", "--calib-samples", "2", "--eval-windows", "-1", "--quiet"]


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_refused(code, err, folder, needle, before=()):
    """Exit 2, one line on stderr that starts like every CLI error and says ``needle``, and the
    folder holds what it held before (no report, no temp file)."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert lines[0].startswith("workbench: error:") and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert sorted(os.listdir(folder)) == sorted(before)


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.mark.parametrize("extra,needle", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--batch-size", "-1"], "--batch-size must be at least 1, got -1"),
    (["--device", "foo"], "--device must be one of auto, cpu, cuda or cuda:N, got 'foo'"),
    (["--device", "mps"], "--device must be one of auto, cpu, cuda or cuda:N, got 'mps'"),
    (["--device", "meta"], "--device must be one of auto, cpu, cuda or cuda:N, got 'meta'"),
    (["--device", "cuda:7"], "--device cuda:7"),
    (["--seed", str(2 ** 64)], "--seed must be at most"),
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--lr", "inf", "--method", "aespa"], "--lr must be a finite number, got inf"),
    (["--lr", "nan", "--method", "brecq"], "--lr must be a finite number, got nan"),
    (["--calib", "hf:a:b:c:d:e"], "hf:NAME[:CONFIG[:SPLIT[:FIELD]]]"),
    (["--eval-text", "hf:a:b:c:d:e", "--eval-windows", "2"], "hf:NAME[:CONFIG[:SPLIT[:FIELD]]]"),
    (["--seqlen", "512"], "--seqlen 512 is longer than the model's 256 positions"),
])
def test_bad_flags(tiny_checkpoints, out, capsys, extra, needle):
    report = out / "r.json"
    code, _, err = run_cli(["quantize", "--model", tiny_checkpoints["llama"], "--report", str(report),
                            "--device", "cpu", *FAST, *extra], capsys)
    assert_refused(code, err, out, needle)


def test_cuda_index_beyond_the_devices_is_refused(tiny_checkpoints, out, capsys, monkeypatch):
    # as on a machine with one GPU: cuda:0 would be accepted, cuda:1 is not there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    report = out / "r.json"
    code, _, err = run_cli(["quantize", "--model", tiny_checkpoints["llama"], "--report", str(report),
                            *FAST, "--device", "cuda:1"], capsys)
    assert_refused(code, err, out, "--device cuda:1: this machine has 1 CUDA device (cuda:0)")


@pytest.mark.parametrize("remove,needle", [
    (("*.safetensors", "*.bin"), "holds a config.json but no weights"),
    (("tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt"), "holds no tokenizer"),
])
def test_incomplete_model_folder(tiny_checkpoints, tmp_path, out, capsys, remove, needle):
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoints["llama"], model)
    for pattern in remove:
        for f in model.glob(pattern):
            f.unlink()
    report = out / "r.json"
    code, _, err = run_cli(["quantize", "--model", str(model), "--report", str(report), *FAST], capsys)
    assert_refused(code, err, out, needle)


def test_mistral_sliding_window_is_refused(tokenizer, tmp_path, out, capsys):
    from transformers import MistralConfig, MistralForCausalLM
    model = tmp_path / "mistral"
    MistralForCausalLM(MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     sliding_window=16)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    report = out / "r.json"
    code, _, err = run_cli(["quantize", "--model", str(model), "--report", str(report), *FAST], capsys)
    assert_refused(code, err, out, "sliding window of 16 tokens")


def _calib_non_utf8(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\xe9 au lait ".encode("latin-1") * 200)
    return str(p), "is not UTF-8 text"


def _calib_directory(tmp_path):
    return str(tmp_path), "is a directory"


def _calib_unreadable(tmp_path):
    # readable by no one, even root: the kernel refuses reads of this process's memory at offset 0
    return "/proc/self/mem", "cannot be read"


@pytest.mark.parametrize("make", [_calib_non_utf8, _calib_directory, _calib_unreadable])
def test_bad_calibration_path(tiny_checkpoints, tmp_path, out, capsys, make):
    calib, needle = make(tmp_path)
    report = out / "r.json"
    code, _, err = run_cli(["quantize", "--model", tiny_checkpoints["llama"], "--report", str(report),
                            "--calib", calib, *FAST], capsys)
    assert_refused(code, err, out, needle)


def test_report_path_that_is_a_directory(tiny_checkpoints, out, capsys):
    (out / "r.json").mkdir()
    code, _, err = run_cli(["quantize", "--model", tiny_checkpoints["llama"], "--report", str(out / "r.json"),
                            *FAST], capsys)
    assert_refused(code, err, out, "is a directory; give a file name", before=["r.json"])


@pytest.mark.parametrize("device,needle", [
    ("foo", "--device must be one of auto, cpu, cuda or cuda:N, got 'foo'"),
    ("meta", "--device must be one of auto, cpu, cuda or cuda:N, got 'meta'"),
    ("cuda:9", "--device cuda:9"),
])
def test_genie_bad_device(out, capsys, device, needle):
    report = out / "g.json"
    code, _, err = run_cli(["genie", "--device", device, "--report", str(report), "--quiet"], capsys)
    assert_refused(code, err, out, needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_genie_cuda_without_a_gpu(out, capsys):
    report = out / "g.json"
    code, _, err = run_cli(["genie", "--device", "cuda", "--report", str(report), "--quiet"], capsys)
    assert_refused(code, err, out, "no CUDA device is available")


@pytest.mark.parametrize("flag,value,needle", [
    ("--samples", "0", "samples must be a positive integer"),
    ("--weight-bits", "9", "bits"),
    ("--report", "DIR", "is a directory"),
])
def test_genie_bad_values(out, capsys, flag, value, needle):
    before = []
    if value == "DIR":
        (out / "d").mkdir()
        value, before = str(out / "d"), ["d"]
    code, _, err = run_cli(["genie", flag, value, "--quiet"], capsys)
    assert_refused(code, err, out, needle, before=before)
