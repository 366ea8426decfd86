"""``workbench inspect`` on a tiny checkpoint."""
import json

from workbench.cli import main

SMALL = ["--calib-samples", "4", "--seqlen", "32", "--batch-size", "2", "--device", "cpu", "--group-size", "16"]


def test_inspect_writes_json_and_csv(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "inspect.json"
    rc = main(["inspect", "--model", tiny_checkpoints["opt"], "--report", str(out), "--csv", str(tmp_path),
               "--method", "boa", "--bits", "3", "--max-blocks", "1", "--heldout-windows", "2", *SMALL])
    assert rc == 0
    data = json.loads(out.read_text())
    frames = data["frames"]
    assert {"spectra_layers", "spectra_heads", "error_layers", "error_heads", "error_blocks",
            "report_layers"} <= set(frames)
    assert {r["kind"] for r in frames["spectra_layers"]} == {"q", "k", "v", "o", "fc1", "fc2"}
    assert len(frames["error_heads"]) == 4 and data["report"]["method"] == "boa"
    assert (tmp_path / "error_heads.csv").read_text().startswith("block,head,before_o")
    assert "spectra_layers" in capsys.readouterr().err


def test_inspect_spectra_only_and_bad_input(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["inspect", "--model", tiny_checkpoints["llama"], "--report", str(out), "--no-heads", *SMALL]) == 0
    frames = json.loads(out.read_text())["frames"]
    assert "error_layers" not in frames and len(frames["spectra_heads"]) == 0
    rc = main(["inspect", "--model", tiny_checkpoints["llama"], "--report", str(tmp_path / "missing" / "x.json"),
               *SMALL])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["inspect", "--model", tiny_checkpoints["llama"], "--report", str(out), "--method", "gptq",
               "--heldout-windows", "0", *SMALL])
    assert rc == 2 and "--heldout-windows" in capsys.readouterr().err
