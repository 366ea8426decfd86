"""Low-bit quality: every method at W2 g64, W3 g64 and W3 per channel, perplexity and seconds.

    python benchmarks/lowbit.py                                       # every method, the three settings
    python benchmarks/lowbit.py --methods gptq,turboboa --settings w2g64
    python benchmarks/lowbit.py --ablation --settings w2g64           # the ablation rows (README)

Every run is measured in this one process, one after the other (standard protocol: 32x512
calibration of WikiText-2 valid, 40x512 windows of the raw test text), so seconds compare like with
like. ``--ablation`` runs TurboBoA with one change per row instead of the methods.
"""
from __future__ import annotations

import argparse
import sys

from rows import SETTINGS, measured_row, protocol_arguments, save_rows

from workbench.config import build_config

METHODS = "gptq,boa,turboboa,aespa,turboboa-tuned"
# one change per row against TurboBoA's defaults, then the combinations (settings by their declared names)
ABLATION = [
    ("turboboa", {}),
    ("turboboa", {"calib_samples": 128}),
    ("turboboa", {"grid_search": "minmax"}),
    ("turboboa", {"grid_search": "hessian"}),
    ("turboboa", {"dx_alpha": 0.0}),
    ("turboboa", {"refine_iters": 0}),
    ("turboboa", {"passes": 3}),
    ("turboboa", {"damp": 0.1}),
    ("turboboa-tuned", {"e2e_steps": 0}),          # damp 0.1 and the block-wise scale tuning
    ("turboboa-tuned", {"tune_steps": 0}),         # damp 0.1 and the end-to-end steps
    ("turboboa-tuned", {}),                        # both
    ("turboboa-tuned", {"damp": 0.01}),
    ("turboboa-tuned", {"tune_norms": True}),
    ("turboboa-tuned", {"calib_samples": 64}),
]


def label(method: str, changes: dict) -> str:
    return method + ("" if not changes else " " + ", ".join(f"{k}={v}" for k, v in changes.items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--settings", default="w2g64,w3g64,w3pc", help=f"from {', '.join(SETTINGS)}")
    p.add_argument("--ablation", action="store_true", help="TurboBoA with one change per row, then combinations")
    p.add_argument("--rows", default=None, help="with --ablation: only these row numbers (comma-separated, from 1)")
    protocol_arguments(p)
    args = p.parse_args(argv)
    if args.ablation:
        chosen = ABLATION if args.rows is None else [ABLATION[int(i) - 1] for i in args.rows.split(",")]
    else:
        chosen = [(m, {}) for m in args.methods.split(",")]
    print(f"model {args.model}, calibration {args.calib_samples}x{args.seqlen}, evaluation {args.eval_windows}x"
          f"{args.seqlen}")
    print("| row | bits | group | ppl | quant s |")
    print("| --- | --- | --- | --- | --- |")
    rows, ppl_fp = [], None
    for setting in args.settings.split(","):
        bits, group = SETTINGS[setting]
        for method, changes in chosen:
            values = dict(model=args.model, method=method, bits=bits, group_size=group,
                          calib_samples=args.calib_samples, seqlen=args.seqlen, eval_windows=args.eval_windows,
                          max_blocks=args.max_blocks, device=args.device)
            cfg = build_config({**values, **changes}, "api")
            row, rep = measured_row(cfg, label=label(method, changes), changes=changes)
            ppl_fp = rep.ppl_fp
            rows.append(row)
            print(f"| {row['label']} | {bits} | {group} | {rep.ppl_quant:.3f} | {rep.quant_seconds:.1f} |", flush=True)
            save_rows(args.json, ppl_fp, rows, args)
    print(f"fp ppl {ppl_fp:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
