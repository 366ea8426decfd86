"""``workbench inspect``: Hessian spectra and reconstruction errors as JSON/CSV, no app needed."""
from __future__ import annotations

import argparse
import sys

from ..api import QuantizeConfig
from ..methods import METHODS


def add_parser(subparsers) -> argparse.ArgumentParser:
    d = QuantizeConfig()
    p = subparsers.add_parser(
        "inspect", help="Hessian spectra and (with --method) reconstruction errors, written as JSON/CSV",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d.model, help="smollm2-135m (embedded), a checkpoint directory, or a hub id")
    p.add_argument("--report", required=True, help="write all frames here as one JSON file")
    p.add_argument("--csv", default=None, metavar="DIR", help="also write one CSV per frame into this directory")
    p.add_argument("--method", default=None, choices=list(METHODS),
                   help="quantize a copy with this method and measure its errors on held-out windows")
    p.add_argument("--bits", type=int, default=d.bits)
    p.add_argument("--group-size", type=int, default=d.group_size)
    p.add_argument("--calib", default=d.calib, help="wikitext2, a text file, or hf:NAME[:CONFIG[:SPLIT[:FIELD]]]")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples)
    p.add_argument("--seqlen", type=int, default=d.seqlen)
    p.add_argument("--eval-text", default=d.eval_text, help="held-out text for perplexity and errors")
    p.add_argument("--eval-windows", type=int, default=-1, help="perplexity windows (0 = all, -1 = skip)")
    p.add_argument("--heldout-windows", type=int, default=4, help="held-out windows for reconstruction errors")
    p.add_argument("--max-blocks", type=int, default=None, help="only the first N blocks")
    p.add_argument("--no-heads", dest="heads", action="store_false", help="skip the per-head attention spectra")
    p.add_argument("--no-spectra", dest="spectra", action="store_false", help="skip the spectra")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--rows-per-step", type=int, default=None, help="BoA/TurboBoA rows quantized jointly")
    p.add_argument("--dx-alpha", type=float, default=None, help="TurboBoA inherited-error correction, 0-1")
    p.add_argument("--refine-iters", type=int, default=None, help="TurboBoA scale-refinement sweeps")
    p.set_defaults(run=run)
    return p


def config_from_args(args):
    from .run import DiagnoseConfig
    q = QuantizeConfig(model=args.model, method=args.method or "rtn", bits=args.bits, group_size=args.group_size,
                       calib=args.calib, calib_samples=args.calib_samples, seqlen=args.seqlen,
                       eval_text=args.eval_text, eval_windows=args.eval_windows, seed=args.seed,
                       device=args.device, batch_size=args.batch_size, max_blocks=args.max_blocks,
                       rows_per_step=args.rows_per_step, dx_alpha=args.dx_alpha, refine_iters=args.refine_iters)
    return DiagnoseConfig(quantize=q, spectra=args.spectra, heads=args.heads, method=args.method is not None,
                          heldout_windows=args.heldout_windows)


def run(args) -> int:
    from ..errors import WorkbenchError
    from .run import diagnose
    cfg = config_from_args(args)
    if not cfg.spectra and not cfg.method:
        raise WorkbenchError("nothing to do: --no-spectra needs --method")
    out = diagnose(cfg, report_path=args.report, csv_dir=args.csv)
    parts = [f"{name} {len(frame)} rows" for name, frame in out.frames().items()]
    print(f"workbench inspect: {', '.join(parts)} -> {args.report}"
          + (f" and {args.csv}/*.csv" if args.csv else ""), file=sys.stderr)
    return 0
