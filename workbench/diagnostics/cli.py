"""``workbench inspect``: Hessian spectra and reconstruction errors as JSON/CSV, no app needed."""
from __future__ import annotations

import argparse
import sys

from ..errors import WorkbenchError
from ..flags import add_setting_flags, config_from_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect", help="Hessian spectra and (with --method) reconstruction errors, written as JSON/CSV")
    # without --method only the spectra are computed; perplexity is skipped unless asked for
    add_setting_flags(p, defaults={"method": None, "eval_windows": -1})
    own = p.add_argument_group("inspect")
    own.add_argument("--report", required=True, help="write all frames here as one JSON file")
    own.add_argument("--csv", default=None, metavar="DIR", help="also write one CSV per frame into this directory")
    own.add_argument("--heldout-windows", type=int, default=4, help="held-out windows for reconstruction errors")
    own.add_argument("--no-heads", dest="heads", action="store_false", help="skip the per-head attention spectra")
    own.add_argument("--no-spectra", dest="spectra", action="store_false", help="skip the spectra")
    own.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)
    return p


def diagnose_config(args):
    from .run import DiagnoseConfig
    measure = args.method is not None or args._setting_defaults["method"] is not None
    if not measure:   # spectra only: the quantization settings still say which windows to draw
        args._setting_defaults = {**args._setting_defaults, "method": "rtn"}
    return DiagnoseConfig(quantize=config_from_args(args), spectra=args.spectra, heads=args.heads, method=measure,
                          heldout_windows=args.heldout_windows)


def run(args) -> int:
    from ..progress import ProgressBars
    from .run import diagnose
    cfg = diagnose_config(args)
    if not cfg.spectra and not cfg.method:
        raise WorkbenchError("nothing to do: --no-spectra needs --method")
    bars = ProgressBars(f"{cfg.quantize.method} w{cfg.quantize.bits}", enabled=not args.quiet)
    try:
        out = diagnose(cfg, report_path=args.report, csv_dir=args.csv, on_event=bars)
    finally:
        bars.close()
    parts = [f"{name} {len(frame)} rows" for name, frame in out.frames().items()]
    print(f"workbench inspect: {', '.join(parts)} -> {args.report}"
          + (f" and {args.csv}/*.csv" if args.csv else ""), file=sys.stderr)
    return 0
