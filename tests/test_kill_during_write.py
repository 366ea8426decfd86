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
