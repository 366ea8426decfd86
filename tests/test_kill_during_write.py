"""SIGKILL during a write leaves the old file or the new one, never a partial one, and the next write
cleans what the kill left behind. A child process rewrites a report (or a checkpoint) in a loop and
is killed at random moments."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from workbench import export
from workbench.report import write_atomic

ROOT = Path(__file__).resolve().parent.parent

REPORT_WRITER = """
import json, sys
from workbench.report import write_atomic
i = 0
while True:
    write_atomic(sys.argv[1], json.dumps({"i": i, "pad": "x" * 4_000_000}))
    i += 1
"""

CHECKPOINT_WRITER = """
import sys
from tests.conftest import tiny_llama
from workbench.api import QuantizeResult
from workbench.export import save_fake_quant
from workbench.report import Report
result = QuantizeResult(tiny_llama(hidden_size=256, intermediate_size=512), None, Report("m", "rtn", {}), {})
while True:
    save_fake_quant(result, sys.argv[1], overwrite=True)
"""


def writer(script, target):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", script, str(target)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_at_random(proc, ready, rng, seconds):
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the writer never finished a first write"
        time.sleep(0.02)
    time.sleep(rng.uniform(0, seconds))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


def dotfiles(folder):
    return [p for p in os.listdir(folder) if p.startswith(".")]


def test_sigkill_during_report_writing(tmp_path):
    rng = random.Random(0)
    target = tmp_path / "r.json"
    for _ in range(5):
        proc = writer(REPORT_WRITER, target)
        kill_at_random(proc, target.exists, rng, 0.6)
        data = json.loads(target.read_text())          # whole, whichever it is
        assert len(data["pad"]) == 4_000_000
    write_atomic(target, "{}")                          # the next write cleans after the dead writers
    assert dotfiles(tmp_path) == [] and json.loads(target.read_text()) == {}


def test_sigkill_during_export(tmp_path):
    rng = random.Random(1)
    target = tmp_path / "ckpt"
    for _ in range(4):
        proc = writer(CHECKPOINT_WRITER, target)
        kill_at_random(proc, lambda: (target / export.EXPORT_INFO).exists(), rng, 1.5)
        if not target.exists():     # killed between moving the old one aside and renaming the new one in
            assert [p for p in dotfiles(tmp_path) if ".old-" in p], dotfiles(tmp_path)
            export.check_save_dir(target, overwrite=True, packed=False)
        files = sorted(os.listdir(target))
        assert {"config.json", "model.safetensors", export.EXPORT_INFO} <= set(files), files
        info = json.loads((target / export.EXPORT_INFO).read_text())
        assert info["format"] == export.FORMAT_FAKE
        sizes = export.safetensors_sizes(target)
        assert sum(sizes.values()) + 8 < (target / "model.safetensors").stat().st_size
    export.check_save_dir(target, overwrite=True, packed=False)   # what the next save does first
    assert dotfiles(tmp_path) == []


STREAMING_WRITER = """
import sys
from workbench.api import quantize
while True:
    quantize(model=sys.argv[2], method="rtn", offload="disk", calib_samples=2, seqlen=16, eval_windows=-1,
             group_size=16, device="cpu", save_dir=sys.argv[1], overwrite=True)
"""


def test_sigkill_during_streaming_export(tmp_path, tokenizer):
    """``--offload disk --save`` writes a shard per block while the run goes on: a kill then leaves only the
    hidden ``.partial`` folder (never a checkpoint under the target's name), and the next save succeeds."""
    from tests.conftest import tiny_llama
    from workbench.api import quantize
    model = tmp_path / "model"
    tiny_llama(num_hidden_layers=12, hidden_size=128, intermediate_size=512).save_pretrained(model)
    tokenizer.save_pretrained(model)
    out = tmp_path / "out"
    out.mkdir()
    target = out / "ckpt"

    def streaming(proc):
        partial = [p for p in out.iterdir() if ".partial-" in p.name]
        return bool(partial and list(partial[0].glob("model-*.safetensors")))

    # killed in the middle of the first export: no checkpoint at all, only the dead run's partial folder
    proc = subprocess.Popen([sys.executable, "-c", STREAMING_WRITER, str(target), str(model)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    kill_at_random(proc, lambda: streaming(proc), random.Random(2), 0.0)
    assert not target.exists()
    assert [p for p in dotfiles(out) if ".partial-" in p], dotfiles(out)
    # killed at random moments once a checkpoint exists: the old one or the new one, whole
    rng = random.Random(3)
    quantize(model=str(model), method="rtn", offload="disk", calib_samples=2, seqlen=16, eval_windows=-1,
             group_size=16, device="cpu", save_dir=target, overwrite=True)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", STREAMING_WRITER, str(target), str(model)], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        kill_at_random(proc, lambda: streaming(proc), rng, 1.0)
        if not target.exists():     # killed between moving the old one aside and renaming the new one in
            export.check_save_dir(target, overwrite=True)
        index = json.loads((target / "model.safetensors.index.json").read_text())
        assert {(target / f).is_file() for f in index["weight_map"].values()} == {True}
        assert json.loads((target / export.EXPORT_INFO).read_text())["quantized_layers"] == 12 * 7
    # the next save cleans what the kills left and writes a checkpoint that loads
    result = quantize(model=str(model), method="rtn", offload="disk", calib_samples=2, seqlen=16, eval_windows=-1,
                      group_size=16, device="cpu", save_dir=target, overwrite=True)
    assert dotfiles(out) == []
    back = export.load_quantized(target)
    name = "model.layers.11.mlp.down_proj"
    assert torch.equal(back.packed[name].codes, result.packed[name].codes)
