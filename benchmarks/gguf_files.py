"""GGUF files side by side: llama.cpp's own quantizer against the workbench's RTN, GPTQ and TurboBoA
written at the same type, each file run in llama.cpp on the workbench's evaluation windows.

    python benchmarks/gguf_files.py                                   # q4_0, q4_1, q8_0 (about an hour here)
    python benchmarks/gguf_files.py --types q4_0 --methods gptq

llama.cpp's rows quantize a float GGUF of the same model (linears float16) with
``llama_model_quantize`` and no importance matrix. Every file's perplexity is measured twice: by
llama.cpp from its logits, and by the workbench on the file read back (``load_quantized``); the
workbench rows also give the in-memory perplexity of the run that wrote them.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# this script's folder comes first on the path, and its name would hide the gguf package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import workbench  # noqa: E402
from workbench import llamacpp  # noqa: E402
from workbench.config import QuantizeConfig  # noqa: E402
from workbench.data import evaluation_windows  # noqa: E402
from workbench.evaluate import perplexity  # noqa: E402
from workbench.export_gguf import FILE_TYPES, find_gguf, write_gguf  # noqa: E402
from workbench.models.loading import load_model  # noqa: E402


def file_row(path: Path, windows, threads: int | None, read_back: bool, **row) -> dict:
    t0 = time.perf_counter()
    row["llamacpp_ppl"] = llamacpp.perplexity(path, windows, threads=threads)
    row["llamacpp_eval_seconds"] = time.perf_counter() - t0
    row["workbench_ppl"] = perplexity(workbench.load_quantized(path).model, windows) if read_back else None
    row["size_mb"] = find_gguf(path).stat().st_size / 1e6
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--types", default="q4_0,q4_1,q8_0")
    p.add_argument("--methods", default="gptq,turboboa,rtn", help="the workbench's rows (q8_0: rtn and gptq only)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp's threads (default: every core; on a "
                   "busy machine 1 is faster, its threads wait for each other)")
    p.add_argument("--read-back", action="store_true", help="also the workbench's perplexity of its own files read "
                   "back (llama.cpp's files always are); it equals the in-memory one, the file holds the weights exactly")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    loaded = load_model(args.model)
    windows = evaluation_windows(loaded.tokenizer, QuantizeConfig().eval_text, args.seqlen, args.eval_windows)
    rows = []
    print(f"model {args.model}, calibration {args.calib_samples}x{args.seqlen}, evaluation {args.eval_windows}x"
          f"{args.seqlen}; ppl in llama.cpp / read back by the workbench / in memory after the run")
    print("(the workbench's files hold its in-memory weights exactly: read back, they give the in-memory ppl)")
    print(f"{'type':<5} {'by':<10} {'size MB':>8} {'llama.cpp':>9} {'read back':>9} {'in memory':>9} {'quant s':>8}")

    def cell(v):
        return f"{v:9.3f}" if v else f"{'-':>9}"

    def show(row):
        print(f"{row['type']:<5} {row['by']:<10} {row['size_mb']:8.2f} {row['llamacpp_ppl']:9.3f} "
              f"{cell(row['workbench_ppl'])} {cell(row.get('memory_ppl'))} {row['quant_seconds']:8.1f}", flush=True)
        rows.append(row)
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "float16.gguf"
        write_gguf(base, loaded.model, loaded.tokenizer, {}, args.model, "MOSTLY_F16", keep_source=False,
                   float_types={"linear": "float16", "embedding": "float32"})
        for kind in args.types.split(","):
            target = Path(tmp) / f"llamacpp-{kind}.gguf"
            t0 = time.perf_counter()
            llamacpp.quantize_file(base, target, FILE_TYPES[kind])
            show(file_row(target, windows, args.threads, True, type=kind, by="llama.cpp",
                          quant_seconds=time.perf_counter() - t0))
            for method in args.methods.split(","):
                if kind == "q8_0" and method not in ("rtn", "gptq"):
                    continue
                out = Path(tmp) / f"{method}-{kind}"
                cfg = QuantizeConfig(model=args.model, method=method, format=f"gguf:{kind}",
                                     calib_samples=args.calib_samples, seqlen=args.seqlen,
                                     eval_windows=args.eval_windows)
                rep = workbench.quantize(cfg, save_dir=out).report
                show(file_row(out, windows, args.threads, args.read_back, type=kind, by=method,
                              quant_seconds=rep.quant_seconds, memory_ppl=rep.ppl_quant))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
