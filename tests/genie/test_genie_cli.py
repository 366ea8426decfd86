import argparse
import json
import os

import numpy as np
import pytest
from PIL import Image

from workbench.errors import WorkbenchError
from workbench.genie import cli


def parse(*argv):
    parser = argparse.ArgumentParser(prog="workbench")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["genie", *argv])


FAST = ["--samples", "16", "--distill-steps", "15", "--distill-batch", "16", "--iters", "20", "--quiet"]


def test_cli_writes_report_and_png(tmp_path, capsys):
    report, png = tmp_path / "r.json", tmp_path / "s.png"
    args = parse("--weight-bits", "4", "--act-bits", "4", "--swing", *FAST, "--report", str(report), "--samples-png", str(png))
    assert args.run is cli.run
    assert cli.run(args) == 0
    r = json.loads(report.read_text())
    assert r["data"] == "genie" and r["settings"]["weight_bits"] == 4 and r["settings"]["act_bits"] == 4
    assert r["settings"]["samples"] == 16 and r["settings"]["iters"] == 20 and r["settings"]["swing"] is True
    assert r["fp_accuracy"] == pytest.approx(r["recorded_fp_accuracy"], abs=0.3)
    assert 0 <= r["quant_accuracy"] <= 100
    assert r["distill_seconds"] > 0 and r["quant_seconds"] > 0
    assert [b["name"] for b in r["blocks"]] == ["stem", "layer1.0", "layer2.0", "layer3.0", "fc"]
    assert r["samples_png"] == str(png)
    img = np.asarray(Image.open(png))
    # 16 images of 16x16 upscaled 4x, 4 per row, 1-pixel borders
    assert img.shape == (4 * 65 + 1, 4 * 65 + 1) and img.dtype == np.uint8
    assert img.std() > 10
    assert sorted(os.listdir(tmp_path)) == ["r.json", "s.png"]     # no temp files left
    assert "accuracy fp" in capsys.readouterr().out


def test_cli_real_data_rtn(tmp_path):
    report = tmp_path / "r.json"
    assert cli.run(parse("--data", "real", "--method", "rtn", "--weight-bits", "8", *FAST, "--report", str(report))) == 0
    r = json.loads(report.read_text())
    assert r["data"] == "real" and r["distill_seconds"] < 1
    assert r["quant_accuracy"] >= r["fp_accuracy"] - 1.0          # 8-bit RTN is near lossless


@pytest.mark.parametrize("argv, match", [
    (["--weight-bits", "1"], "weight bits"),
    (["--weight-bits", "9"], "weight bits"),
    (["--act-bits", "12"], "activation bits"),
    (["--samples", "0"], "samples"),
    (["--report", "/nonexistent-dir/r.json"], "does not exist"),
])
def test_cli_bad_input(argv, match):
    with pytest.raises(WorkbenchError, match=match):
        cli.run(parse(*argv, "--quiet"))


def test_cli_refuses_directory_and_readonly_paths(tmp_path):
    with pytest.raises(WorkbenchError, match="directory"):
        cli.run(parse("--report", str(tmp_path), "--quiet"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):   # root writes anywhere: then only the directory case applies
            with pytest.raises(WorkbenchError, match="not writable"):
                cli.run(parse("--samples-png", str(locked / "s.png"), "--quiet"))
    finally:
        locked.chmod(0o700)


def test_cli_missing_model(tmp_path):
    with pytest.raises(WorkbenchError, match="not found"):
        cli.run(parse("--model", str(tmp_path / "none.safetensors"), *FAST))


def test_main_exit_code_on_bad_input(capsys):
    assert cli.main(["--weight-bits", "9"]) == 2
    assert "weight bits" in capsys.readouterr().err


def test_main_cli_has_the_genie_subcommand():
    from workbench.cli import build_parser
    args = build_parser().parse_args(["genie", "--weight-bits", "3", "--act-bits", "3", "--data", "noise"])
    assert args.run is cli.run
    cfg = cli.config_from_args(args)
    assert (cfg.weight_bits, cfg.act_bits, cfg.data, cfg.swing, cfg.ends_bits) == (3, 3, "noise", False, 8)
