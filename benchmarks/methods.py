"""Methods side by side on one model: perplexity, quantization time, q/k/v solve time.

    python benchmarks/methods.py                                  # RTN, GPTQ, BoA, TurboBoA x 4 settings
    python benchmarks/methods.py --methods rtn,gptq --settings w4g64,w3g64

Every run is measured in this one process, one after the other, so ratios compare like with like.
"""
from __future__ import annotations

import argparse
import sys

from rows import SETTINGS, measured_row, protocol_arguments, save_rows

from workbench.config import QuantizeConfig



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="rtn,gptq,boa,turboboa")
    p.add_argument("--settings", default="w4g64,w3g64,w2g64,w3pc", help=f"from {', '.join(SETTINGS)}")
    protocol_arguments(p)
    args = p.parse_args(argv)
    rows = []
    header = (f"{'method':<9} {'bits':>4} {'group':>5} {'ppl':>9} {'quant s':>8} {'forward s':>9} {'stats s':>8} "
              f"{'solve s':>8} {'solve %':>7} {'qkv solve s':>11} {'x gptq time':>11}")
    print(f"model {args.model}, calibration {args.calib_samples}x{args.seqlen}, evaluation {args.eval_windows}x{args.seqlen}")
    print(header)
    ppl_fp = None
    for setting in args.settings.split(","):
        bits, group = SETTINGS[setting]
        gptq_time = None
        for method in args.methods.split(","):
            cfg = QuantizeConfig(model=args.model, method=method, bits=bits, group_size=group,
                                 calib_samples=args.calib_samples, seqlen=args.seqlen,
                                 eval_windows=args.eval_windows, max_blocks=args.max_blocks, device=args.device)
            row, rep = measured_row(cfg)
            ppl_fp = rep.ppl_fp
            if method == "gptq":
                gptq_time = rep.quant_seconds
            ratio = f"{rep.quant_seconds / gptq_time:.2f}" if gptq_time else "-"
            rows.append({**row, "qkv_solve_seconds": rep.timings["solve_qkv"]})
            t = rep.timings
            share = f"{100 * t['solve'] / rep.quant_seconds:.0f}" if rep.quant_seconds else "-"
            print(f"{method:<9} {bits:>4} {group:>5} {rep.ppl_quant:>9.3f} {rep.quant_seconds:>8.1f} "
                  f"{t['forward']:>9.1f} {t['statistics']:>8.1f} {t['solve']:>8.1f} {share:>7} "
                  f"{t['solve_qkv']:>11.2f} {ratio:>11}", flush=True)
            save_rows(args.json, ppl_fp, rows, args)
    print(f"fp ppl {ppl_fp:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
