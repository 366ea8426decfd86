"""``workbench``: the command line, a thin layer over the Python API (flags: ``workbench.flags``)."""
from __future__ import annotations

import argparse
import sys

from .errors import Cancelled, WorkbenchError
from .flags import add_setting_flags, config_from_args

def add_quantize_parser(sub):
    p = sub.add_parser("quantize", help="quantize a causal LM and write a JSON report")
    add_setting_flags(p)
    out = p.add_argument_group("output")
    out.add_argument("--report", default=None, help="write the JSON report here")
    out.add_argument("--save", default=None, metavar="DIR", help="write the quantized model into this directory, "
                     "in --format (one .gguf file for gguf:TYPE)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing --save directory")
    out.add_argument("--plan-out", default=None, metavar="FILE", help="write a mixed-precision run's widths here as "
                     "a JSON plan (for --plan, or to edit by hand)")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_quantize)
    return p


def run_quantize(args) -> int:
    from .api import quantize
    from .distributed import from_environment
    from .progress import ProgressBars
    cfg = config_from_args(args)
    leader = from_environment().leader      # under torchrun only rank 0 speaks
    # loading, both perplexities, the layers and the export each get a bar on stderr
    width = "mixed" if cfg.mixed else f"w{cfg.bits}"
    bars = ProgressBars(f"{cfg.method} {width}", enabled=leader and not args.quiet)
    try:
        result = quantize(cfg, on_event=bars, report_path=args.report, save_dir=args.save, overwrite=args.overwrite,
                          plan_out=args.plan_out)
    finally:
        bars.close()
    if not leader:
        return 0
    r = result.report
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    if r.plan:
        width = f"mixed {r.plan['avg_bits']:.3f} bits per weight ({r.plan['size_bytes'] / 1e6:.2f} MB)"
    print(f"{r.model} {r.method} {width} g{cfg.group_size}: ppl fp {fmt(r.ppl_fp)} -> quant {fmt(r.ppl_quant)}, "
          f"quantization {r.quant_seconds:.1f} s"
          + (f" (and sensitivity {r.timings['sensitivity']:.1f} s)" if "sensitivity" in r.timings else "")
          + f", peak memory {r.peak_memory_bytes / 2**30:.2f} GiB"
          + (f", report {args.report}" if args.report else "") + (f", plan {args.plan_out}" if args.plan_out else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .diagnostics.cli import add_parser as add_inspect_parser
    from .genie.cli import add_parser as add_genie_parser
    from .report_cli import add_parser as add_report_parser
    from .sweep_cli import add_parser as add_sweep_parser
    parser = argparse.ArgumentParser(prog="workbench", description="Quant Workbench: post-training quantization")
    sub = parser.add_subparsers(dest="command", required=True)
    add_quantize_parser(sub)
    add_genie_parser(sub)
    add_inspect_parser(sub)
    add_sweep_parser(sub)
    add_report_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except WorkbenchError as exc:
        print(f"workbench: error: {exc}", file=sys.stderr)
        return 2
    except Cancelled:
        print("workbench: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("workbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
