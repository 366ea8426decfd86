"""Peak memory with ``--offload disk`` does not grow with the model's depth.

A checkpoint with many narrow-but-wide blocks (most of its bytes in the blocks) is quantized in a
fresh process, once in memory and once offloaded. Each child first warms up on a one-block
checkpoint of the same widths (imports, compiled kernels, tokenized text: costs that do not depend
on the model), then resets the kernel's high-water mark of its resident set (``/proc/self/clear_refs``)
and runs; its peak is ``VmHWM`` read from the OS afterwards, memory-mapped pages touched included.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.offload import deep_checkpoint
from workbench.data import BUILTIN_TEXTS

ROOT = Path(__file__).resolve().parent.parent
HIDDEN, INTERMEDIATE, BLOCKS = 512, 512, 48
CALIB, SEQLEN, EVAL = 4, 64, 2

CHILD = r"""
import json, sys
import workbench
from workbench.api import quantize


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


args = json.loads(sys.argv[1])
warm = json.loads(sys.argv[2])
quantize(**{**args, **warm})
open("/proc/self/clear_refs", "w").write("5")     # the high-water mark counts from here
baseline = status("VmRSS")
r = quantize(**args).report
print("RESULT " + json.dumps({"baseline": baseline, "peak": status("VmHWM"), "ppl_quant": r.ppl_quant,
                              "memory": r.memory}))
"""


def child(settings: dict, warm: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings), json.dumps(warm)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def deep(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("deep")
    text = root / "text.txt"      # a short text: tokenizing the shipped one costs more than a block
    text.write_text(BUILTIN_TEXTS["wikitext2"].read_text()[:20_000])
    return {"deep": deep_checkpoint(root / "deep", BLOCKS, HIDDEN, INTERMEDIATE, tokenizer=tokenizer),
            "one": deep_checkpoint(root / "one", 1, HIDDEN, INTERMEDIATE, tokenizer=tokenizer), "text": str(text)}


def test_offloaded_peak_is_one_block_plus_activations_not_the_model(deep):
    settings = dict(model=str(deep["deep"]), method="rtn", group_size=64, calib=deep["text"], eval_text=deep["text"],
                    calib_samples=CALIB, seqlen=SEQLEN, eval_windows=EVAL, batch_size=2, device="cpu")
    warm = {"model": str(deep["one"])}
    memory = child(settings, warm)
    disk = child({**settings, "offload": "disk"}, warm)
    assert disk["ppl_quant"] == memory["ppl_quant"]

    f32 = 4
    block = (HIDDEN * HIDDEN * 2 + HIDDEN * HIDDEN // 2 * 2 + 3 * HIDDEN * INTERMEDIATE) * f32
    model = BLOCKS * block
    embeddings = 512 * HIDDEN * f32
    # the block in use, its file pages while it is read, and the quantized copy of a layer; the block's stage
    # activations (gate, up and their product) and the hidden states between blocks; a layer's statistics (the
    # Hessian and its temporaries, the estimate's 4 x widest^2); what the allocators keep around
    activations = CALIB * SEQLEN * (3 * INTERMEDIATE + 4 * HIDDEN) * f32
    statistics = 4 * max(HIDDEN, INTERMEDIATE) ** 2 * f32
    bound = 3 * block + embeddings + activations + statistics + 16 * 2 ** 20
    grew = {name: r["peak"] - r["baseline"] for name, r in (("memory", memory), ("disk", disk))}
    report = {k: f"{v / 2 ** 20:.1f} MiB" for k, v in {**grew, "bound": bound, "model": model}.items()}
    assert grew["memory"] > 0.8 * model, report           # the in-memory run does hold the model
    assert grew["disk"] < bound, report
    assert grew["disk"] < 0.35 * grew["memory"], report
    assert disk["memory"]["quantize"]["weights_bytes"] < embeddings + 3 * block
