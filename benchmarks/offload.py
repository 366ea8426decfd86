"""Offload acceptance: the same run in memory and with ``--offload disk``, side by side.

    python benchmarks/offload.py                      # smollm2-135m GPTQ W4 g64 (32x512, 40 windows) + deep synthetic
    python benchmarks/offload.py --skip-smollm2       # only the synthetic deep checkpoints (a minute or so)
    python benchmarks/offload.py --blocks 24 48 --hidden 512 --intermediate 512

Every run is its own process, so its peak is the OS's high-water mark of the resident set
(``ru_maxrss`` of the finished child, memory-mapped pages touched included), not a sampled figure.
"baseline" is the child's resident set after importing torch, transformers and the workbench,
before it loads anything: what both modes pay alike; "model memory" is the peak above it.

Checks (exit status 1 when one fails):
  * smollm2-135m: offload's perplexity equals the in-memory one to 4 significant digits, its peak
    is at most 50% of the in-memory peak, its quant_seconds at most 1.25x (timings are unreliable
    on a machine other jobs share: say so when quoting them);
  * synthetic deep checkpoints (many narrow-but-wide blocks): doubling the blocks raises the offload
    peak by less than 10%.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, sys
import torch, transformers, safetensors, compressed_tensors  # noqa: F401  (what both modes load)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
import workbench
from workbench.api import quantize


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


args = json.loads(sys.argv[1])
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
baseline = status("VmRSS")
save = args.pop("save_dir", None)
result = quantize(save_dir=save, overwrite=True, **args)
r = result.report
print("RESULT " + json.dumps({"baseline": baseline, "hwm": status("VmHWM"), "ppl_fp": r.ppl_fp,
                              "ppl_quant": r.ppl_quant, "quant_seconds": r.quant_seconds,
                              "peak_memory_bytes": r.peak_memory_bytes, "memory": r.memory}))
"""


def run_child(settings: dict, threads: int = 2, timeout: float = 3600) -> dict:
    """One quantize run in a fresh process; its figures, with ``peak`` the process's own high-water mark."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(settings)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}):\n{err[-3000:]}")
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    found = json.loads(line[len("RESULT "):])
    found["peak"] = found["hwm"]
    found["model_memory"] = found["hwm"] - found["baseline"]
    return found


def deep_checkpoint(path: Path, blocks: int, hidden: int = 512, intermediate: int = 512, vocab: int = 512,
                    tokenizer=None, seed: int = 0) -> Path:
    """A LLaMA with many small but wide blocks: most of its bytes are in the blocks, and its activations and
    per-layer statistics (``hidden``, ``intermediate`` squared) are small next to a block."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=blocks, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    if tokenizer is None:
        sys.path.insert(0, str(ROOT))
        from tests.conftest import tiny_tokenizer
        tokenizer = tiny_tokenizer(vocab)
    tokenizer.save_pretrained(path)
    return path


def gib(n) -> str:
    return f"{n / 2 ** 30:.3f}"


def table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).rjust(w) for v, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def smollm2(args) -> tuple[str, bool]:
    settings = dict(model="smollm2-135m", method="gptq", bits=4, group_size=64, calib_samples=args.calib_samples,
                    seqlen=args.seqlen, eval_windows=args.eval_windows, device="cpu")
    load_before = load_average()
    mem = run_child(settings, args.threads)
    disk = run_child({**settings, "offload": "disk"}, args.threads)
    same = f"{mem['ppl_quant']:.4g}" == f"{disk['ppl_quant']:.4g}" and f"{mem['ppl_fp']:.4g}" == f"{disk['ppl_fp']:.4g}"
    ratio = disk["peak"] / mem["peak"]
    slower = disk["quant_seconds"] / mem["quant_seconds"]
    rows = [[name, f"{r['ppl_fp']:.6g}", f"{r['ppl_quant']:.6g}", gib(r["peak"]), gib(r["baseline"]),
             gib(r["model_memory"]), f"{r['quant_seconds']:.1f}"] for name, r in (("in memory", mem), ("disk", disk))]
    text = table(rows, ["smollm2-135m gptq w4 g64", "ppl fp", "ppl quant", "peak GiB", "baseline GiB",
                        "above baseline GiB", "quant s"])
    text += (f"\nsame perplexity to 4 digits: {same}; peak ratio {ratio:.2f} (<= 0.50); quant_seconds ratio "
             f"{slower:.2f} (<= 1.25); load average before/after: {load_before}/{load_average()} on {os.cpu_count()} "
             f"cores")
    return text, same and ratio <= 0.50 and slower <= 1.25


def deep(args) -> tuple[str, bool]:
    rows, peaks = [], {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tokenizer = None
        for blocks in args.blocks:
            path = deep_checkpoint(Path(tmp) / f"deep{blocks}", blocks, args.hidden, args.intermediate,
                                   tokenizer=tokenizer)
            settings = dict(model=str(path), method="rtn", bits=4, group_size=64, calib_samples=4, seqlen=64,
                            eval_windows=2, device="cpu")
            size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            for offload in ("none", "disk"):
                r = run_child({**settings, "offload": offload}, args.threads)
                peaks[(blocks, offload)] = r["peak"]
                rows.append([blocks, f"{size / 2 ** 20:.0f}", offload, gib(r["peak"]), gib(r["baseline"]),
                             gib(r["model_memory"]), f"{r['ppl_quant']:.6g}"])
            shutil_rm(path)
    text = table(rows, ["blocks", "checkpoint MiB", "offload", "peak GiB", "baseline GiB", "above baseline GiB",
                        "ppl quant"])
    ok = True
    b = sorted(args.blocks)
    for small, large in zip(b, b[1:]):
        growth = peaks[(large, "disk")] / peaks[(small, "disk")] - 1
        flat = growth < 0.10 or large < 2 * small
        text += f"\noffload peak {small} -> {large} blocks: {100 * growth:+.1f}%" + \
            (" (< 10% per doubling)" if large >= 2 * small else "")
        ok = ok and flat
    return text, ok


def shutil_rm(path: Path):
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skip-smollm2", action="store_true")
    p.add_argument("--skip-deep", action="store_true")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--blocks", type=int, nargs="+", default=[24, 48])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None, help="where the synthetic checkpoints are written (default: the "
                   "system's temporary folder)")
    args = p.parse_args(argv)
    ok = True
    if not args.skip_deep:
        text, passed = deep(args)
        print(text, flush=True)
        ok = ok and passed
    if not args.skip_smollm2:
        text, passed = smollm2(args)
        print(("\n" if not args.skip_deep else "") + text, flush=True)
        ok = ok and passed
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
