"""Weight-activation quantization, with and without rotation: perplexity and seconds, one run.

    python benchmarks/weight_activation.py                      # every row: 4 schemes x 3 methods x 2 rotations
    python benchmarks/weight_activation.py --rows rtn:W4A4:none,rtn:W4A4:hadamard,gptq:W4A4:hadamard

Schemes: W4A16 (weights only), W4A8, W4A4 (KV16) and W4A4KV4, all at the weight group size given
(64 by default) with per-token asymmetric activations and the clip searched per layer. The first
lines are the full-precision model as it is and rotated (act 16), which must agree: the rotation is
exact in real arithmetic.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import workbench
from workbench.config import build_config
from workbench.data import evaluation_windows
from workbench.evaluate import perplexity
from workbench.models.loading import load_model
from workbench.rotate import rotate_model

SCHEMES = {"W4A16": {}, "W4A8": {"act_bits": 8}, "W4A4": {"act_bits": 4}, "W4A4KV4": {"act_bits": 4, "kv_bits": 4}}


def all_rows(methods: str, rotations: str) -> list[tuple[str, str, str]]:
    return [(m, s, r) for s in SCHEMES for r in rotations.split(",") for m in methods.split(",")]


def parse_rows(text: str) -> list[tuple[str, str, str]]:
    rows = []
    for item in text.split(","):
        method, scheme, rotate = item.split(":")
        if scheme not in SCHEMES:
            raise SystemExit(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
        rows.append((method, scheme, rotate))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="rtn,gptq,turboboa")
    p.add_argument("--rotations", default="none,hadamard")
    p.add_argument("--rows", default=None, help="METHOD:SCHEME:ROTATE,... instead of the full grid")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    base = load_model(args.model)
    windows = evaluation_windows(base.tokenizer, "wikitext2-test", args.seqlen, args.eval_windows)
    fp = perplexity(base.model, windows)
    rotated = copy.deepcopy(base.model)
    sizes = rotate_model(rotated, base.family, "hadamard", 0)
    fp_rot = perplexity(rotated, windows)
    del rotated
    print(f"{args.model}, W4 g{args.group_size}, {args.calib_samples}x{args.seqlen} calibration, "
          f"{args.eval_windows}x{args.seqlen} evaluation")
    print(f"fp {fp:.3f}; rotated (hadamard, act 16) {fp_rot:.3f} ({100 * (fp_rot / fp - 1):+.3f}%); "
          f"rotations: {sizes}")
    print("| method | scheme | rotation | ppl | quant s |")
    print("| --- | --- | --- | --- | --- |")
    out = {"fp": fp, "fp_rotated": fp_rot, "rotation": sizes, "rows": []}
    rows = parse_rows(args.rows) if args.rows else all_rows(args.methods, args.rotations)
    for method, scheme, rotate in rows:
        cfg = build_config({"model": args.model, "method": method, "bits": 4, "group_size": args.group_size,
                            "calib_samples": args.calib_samples, "seqlen": args.seqlen, "eval_windows": -1,
                            "rotate": rotate, **SCHEMES[scheme]}, "api")
        loaded = copy.copy(base)
        loaded.model = copy.deepcopy(base.model)
        t0 = time.perf_counter()
        result = workbench.quantize(cfg, loaded=loaded)
        seconds = time.perf_counter() - t0
        ppl = perplexity(result.model, windows)
        row = {"method": method, "scheme": scheme, "rotate": rotate, "ppl": ppl,
               "quant_seconds": result.report.quant_seconds, "seconds": seconds}
        out["rows"].append(row)
        print(f"| {method} | {scheme} | {rotate} | {ppl:.3f} | {result.report.quant_seconds:.0f} |", flush=True)
        del result, loaded
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
