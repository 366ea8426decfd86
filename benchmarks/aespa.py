"""aespa against its block-wise baseline (BRECQ) and the backpropagation-free solvers.

    python benchmarks/aespa.py                                # W3 g64 and W2 g64, 200 steps
    python benchmarks/aespa.py --max-blocks 2 --iters 100     # a quick look

aespa and BRECQ get the same iteration budget (``--iters``): steps per layer for aespa (each on
the moment loss, no forward pass), steps per block for BRECQ (each a forward and backward pass
of one calibration micro-batch through the block). All runs share this one process, one after
the other, so times compare like with like.
"""
from __future__ import annotations

import argparse
import sys

from rows import measured_row, save_rows

from workbench.config import QuantizeConfig

SETTINGS = {"w3g64": (3, 64), "w2g64": (2, 64), "w4g64": (4, 64), "w3pc": (3, -1)}
LEARNED = ("aespa", "brecq")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="aespa,brecq,gptq,boa,turboboa")
    p.add_argument("--settings", default="w3g64,w2g64", help=f"from {', '.join(SETTINGS)}")
    p.add_argument("--iters", type=int, default=200, help="optimizer steps, the same for aespa and brecq")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--init", default=None, choices=["rtn", "gptq", "boa"], help="aespa's starting rounding")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-blocks", type=int, default=None, help="quantize only the first N blocks (quick looks)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = []
    print(f"model {args.model}, calibration {args.calib_samples}x{args.seqlen}, evaluation "
          f"{args.eval_windows}x{args.seqlen}, blocks {args.max_blocks or 'all'}, learned-rounding steps {args.iters}")
    print(f"{'method':<9} {'bits':>4} {'group':>5} {'ppl':>9} {'quant s':>8} {'solve s':>8} {'mean rel err':>12}")
    ppl_fp = None
    for setting in args.settings.split(","):
        bits, group = SETTINGS[setting]
        for method in args.methods.split(","):
            learned = {}
            if method in LEARNED:
                learned = {"iters": args.iters, "lr": args.lr, "init": args.init if method == "aespa" else None}
            cfg = QuantizeConfig(model=args.model, method=method, bits=bits, group_size=group,
                                 calib_samples=args.calib_samples, seqlen=args.seqlen, batch_size=args.batch_size,
                                 eval_windows=args.eval_windows, max_blocks=args.max_blocks, device=args.device,
                                 **learned)
            row, rep = measured_row(cfg)
            ppl_fp = rep.ppl_fp
            rel = sum(r.rel_error for r in rep.layers) / max(len(rep.layers), 1)
            rows.append({**row, "solve_seconds": rep.timings["solve"], "mean_rel_error": rel})
            print(f"{method:<9} {bits:>4} {group:>5} {rep.ppl_quant:>9.3f} {rep.quant_seconds:>8.1f} "
                  f"{rep.timings['solve']:>8.1f} {rel:>12.4f}", flush=True)
            save_rows(args.json, ppl_fp, rows, args)
    print(f"fp ppl {ppl_fp:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
