"""Export acceptance: quantize, save pack-quantized, reload through transformers, compare.

    python benchmarks/export.py                     # GPTQ W4 g64 on smollm2-135m, 32x512 calibration, 40 windows
    python benchmarks/export.py --group-size 128 --keep out/smollm2-w4g128

Passes when the reloaded model's perplexity is within --max-ppl-gap of the in-memory quantized
model's on the same windows, and the quantized linears are at least --min-ratio times smaller on
disk than the same layers in float16. Exit status 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import workbench
from workbench.api import QuantizeConfig
from workbench.data import evaluation_windows
from workbench.engine import resolve_device
from workbench.evaluate import perplexity
from workbench.export import DTYPES, ExportInfo


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reload_perplexity(path: Path, cfg: QuantizeConfig, dtype: torch.dtype) -> float:
    """Perplexity of the checkpoint loaded by plain transformers, on the run's evaluation windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = evaluation_windows(tokenizer, cfg.eval_text, cfg.seqlen, cfg.eval_windows)
    return perplexity(model, windows, resolve_device(cfg.device), cfg.batch_size)


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="gptq")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--device", default="auto")
    p.add_argument("--reload-dtype", default="float32", choices=list(DTYPES),
                   help="dtype transformers loads the checkpoint in (float32 compares like with like on CPU)")
    p.add_argument("--keep", default=None, metavar="DIR", help="write the checkpoint here and keep it")
    p.add_argument("--max-ppl-gap", type=float, default=0.005, help="relative perplexity gap allowed")
    p.add_argument("--min-ratio", type=float, default=3.5, help="float16 bytes / packed bytes required")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.eval_windows < 0:
        p.error("--eval-windows must be >= 0: the comparison needs perplexities")

    cfg = QuantizeConfig(model=args.model, method=args.method, bits=args.bits, group_size=args.group_size,
                         symmetric=args.symmetric, calib_samples=args.calib_samples, seqlen=args.seqlen,
                         eval_windows=args.eval_windows, device=args.device)
    scratch = None if args.keep else Path(tempfile.mkdtemp(prefix="workbench-export-"))
    out = Path(args.keep) if args.keep else scratch / "checkpoint"
    try:
        t0 = time.perf_counter()
        result = workbench.quantize(cfg, save_dir=out, overwrite=bool(args.keep))
        t1 = time.perf_counter()
        ppl_reload = reload_perplexity(out, cfg, DTYPES[args.reload_dtype])
        t2 = time.perf_counter()
        info = ExportInfo.from_json(out / "export.json")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    r = result.report
    gap = abs(ppl_reload - r.ppl_quant) / r.ppl_quant
    ok_ppl, ok_size = gap <= args.max_ppl_gap, info.ratio >= args.min_ratio
    print(f"model {args.model}, {args.method} w{args.bits} g{args.group_size}"
          f"{' sym' if args.symmetric else ''}, calibration {args.calib_samples}x{args.seqlen}, "
          f"evaluation {args.eval_windows}x{args.seqlen}; {cpu_name()}, {torch.get_num_threads()} thread(s)")
    rows = [
        ("perplexity, full precision", f"{r.ppl_fp:.4f}"),
        ("perplexity, quantized in memory", f"{r.ppl_quant:.4f}"),
        (f"perplexity, reloaded by transformers ({args.reload_dtype})", f"{ppl_reload:.4f}"),
        ("relative gap", f"{gap:.4%}  (<= {args.max_ppl_gap:.2%}: {'ok' if ok_ppl else 'FAIL'})"),
        (f"quantized linears on disk ({info.quantized_layers} layers)", mib(info.quantized_bytes)),
        ("same layers in float16", mib(info.float16_bytes)),
        ("size ratio", f"{info.ratio:.3f}x  (>= {args.min_ratio}x: {'ok' if ok_size else 'FAIL'})"),
        (f"other tensors ({info.dtype}: embeddings, norms)", mib(info.other_bytes)),
        ("checkpoint files", mib(info.total_bytes)),
        ("quantize + save / reload + evaluate", f"{t1 - t0:.0f} s / {t2 - t1:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "ppl_fp": r.ppl_fp, "ppl_quant": r.ppl_quant,
                                               "ppl_reloaded": ppl_reload, "gap": gap, "export": info.to_dict(),
                                               "cpu": cpu_name(), "threads": torch.get_num_threads()}, indent=2))
    return 0 if ok_ppl and ok_size else 1


if __name__ == "__main__":
    sys.exit(main())
