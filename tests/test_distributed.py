"""Data-parallel calibration: torchrun with two gloo processes against one process, same windows."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from workbench.distributed import Ranks

RUN = ["--calib-samples", "8", "--seqlen", "64", "--eval-windows", "4", "--batch-size", "2", "--device", "cpu",
       "--quiet"]


def test_balanced_assignment_and_shares():
    r = Ranks(0, 2)
    assert r.assign([9.0, 1.0, 1.0, 8.0]) == [0, 1, 0, 1]          # loads 10 and 9
    import torch
    ids = torch.arange(10).reshape(5, 2)
    assert Ranks(1, 2).share(ids).tolist() == [[2, 3], [6, 7]]
    # a batch at a time: rank 1 of 2 with batches of 2 windows gets windows 2, 3 (and 6, 7 of 8)
    assert Ranks(1, 2).share(torch.arange(5), chunk=2).tolist() == [2, 3]
    assert Ranks(0, 2).share(torch.arange(5), chunk=2).tolist() == [0, 1, 4]
    assert Ranks(2, 3).share(torch.arange(3), chunk=2).numel() == 0
    assert Ranks().broadcast("x", 0) == "x" and not Ranks().active


def _quantize(args, report, env=None, torchrun=False):
    cmd = ([shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun"),
            "--standalone", "--nproc-per-node", "2"] if torchrun else [sys.executable]) + \
          ["-m", "workbench", "quantize", *args, "--report", str(report)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(report.read_text())


@pytest.mark.parametrize("method", ["gptq", "turboboa"])
def test_two_processes_match_one(tiny_checkpoints, tmp_path, method):
    args = ["--model", tiny_checkpoints["llama"], "--method", method, *RUN]
    one = _quantize(args, tmp_path / "one.json")
    two = _quantize(args, tmp_path / "two.json", torchrun=True)
    assert two["config"]["processes"] == 2 and one["config"]["processes"] == 1
    assert two["ppl_fp"] == pytest.approx(one["ppl_fp"], rel=1e-6)
    # each rank's batches are the one process's and the statistics are summed in float64: every layer
    # gets the same statistics, so the same codes, block after block
    assert [a["name"] for a in one["layers"]] == [b["name"] for b in two["layers"]]
    assert [b["loss"] for b in two["layers"]] == pytest.approx([a["loss"] for a in one["layers"]], rel=1e-5)
    assert two["ppl_quant"] == pytest.approx(one["ppl_quant"], rel=1e-5)


def test_too_few_windows_for_a_batch_on_every_process(tiny_checkpoints, tmp_path):
    args = ["--model", tiny_checkpoints["llama"], "--method", "rtn", *RUN]
    args[args.index("--calib-samples") + 1] = "2"
    cmd = [shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun"),
           "--standalone", "--nproc-per-node", "2", "-m", "workbench", "quantize", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "--calib-samples 2 leaves some of the 2 processes without a batch of --batch-size 2" in done.stderr


def test_two_processes_plan_a_budget_as_one(tiny_checkpoints, tmp_path):
    """The sensitivity's statistics are summed over the ranks: every rank allocates the one process's plan."""
    args = ["--model", tiny_checkpoints["llama"], "--method", "rtn", "--group-size", "16", "--avg-bits", "3.6", *RUN]
    one = _quantize(args, tmp_path / "one.json")
    two = _quantize(args, tmp_path / "two.json", torchrun=True)
    assert two["plan"]["layers"] == one["plan"]["layers"] and len(set(one["plan"]["layers"].values())) > 1
    for name, costs in one["plan"]["costs"].items():
        assert two["plan"]["costs"][name] == pytest.approx(costs, rel=1e-6), name
