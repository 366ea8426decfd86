"""A save never destroys its source, a bit width the format cannot pack is refused before any work,
and the report is written before the model, so a failing save does not lose the run."""
import json
import shutil

import pytest

import workbench.api as api
from workbench import export
from workbench.cli import main

FAST = ["--seqlen", "32", "--calib-samples", "2", "--eval-windows", "-1", "--group-size", "16", "--max-blocks", "1",
        "--device", "cpu", "--quiet"]


def refused(capsys, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.fixture
def model(tiny_checkpoints, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_checkpoints["llama"], d)
    return d


def no_work(monkeypatch):
    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def test_overwrite_of_the_model_folder_is_refused(model, tmp_path, capsys, monkeypatch):
    before = sorted(p.name for p in model.iterdir())
    no_work(monkeypatch)
    assert main(["quantize", "--model", str(model), "--save", str(model), "--overwrite", *FAST]) == 2
    refused(capsys, "the model being quantized")
    assert sorted(p.name for p in model.iterdir()) == before


def test_overwrite_of_a_folder_holding_the_model_is_refused(model, tmp_path, capsys, monkeypatch):
    (tmp_path / "config.json").write_text("{}")       # looks like a checkpoint itself
    no_work(monkeypatch)
    assert main(["quantize", "--model", str(model), "--save", str(tmp_path), "--overwrite", *FAST]) == 2
    refused(capsys, "holds")
    assert (model / "config.json").exists()


def test_overwrite_of_the_embedded_models_cache_is_refused(model, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    embedded = cache / "smollm2-135m-float32"
    embedded.mkdir(parents=True)
    (embedded / "config.json").write_text("{}")
    monkeypatch.setenv("WORKBENCH_CACHE", str(cache))
    no_work(monkeypatch)
    assert main(["quantize", "--model", str(model), "--save", str(embedded), "--overwrite", *FAST]) == 2
    refused(capsys, "the embedded model's cache")
    assert (embedded / "config.json").read_text() == "{}"


def test_bits_the_format_cannot_pack_are_refused_before_any_work(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export, "supported_bits", lambda: (4, 8))
    no_work(monkeypatch)
    report = tmp_path / "r.json"
    assert main(["quantize", "--model", str(model), "--bits", "3", "--save", str(tmp_path / "q"),
                 "--report", str(report), *FAST]) == 2
    refused(capsys, "cannot pack 3-bit weights; supported bit widths: 4, 8")
    assert not report.exists() and not (tmp_path / "q").exists()


def test_the_report_is_written_before_the_model(model, tmp_path, capsys, monkeypatch):
    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(api, "save_quantized", full_disk)
    report = tmp_path / "r.json"
    with pytest.raises(OSError):
        main(["quantize", "--model", str(model), "--save", str(tmp_path / "q"), "--report", str(report), *FAST])
    assert json.loads(report.read_text())["method"] == "gptq"
    assert not (tmp_path / "q").exists()
