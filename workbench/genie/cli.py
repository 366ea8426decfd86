"""``workbench genie``: zero-shot quantization of the digits CNN, JSON report and sample grid out."""
from __future__ import annotations

import argparse
import sys

from ..errors import WorkbenchError
from ..jsonsafe import dumps
from .files import atomic_path, check_writable
from .model import ARCHITECTURES
from .pipeline import DATA_SOURCES, GenieRunConfig, run_genie
from .png import image_grid, write_png


def add_parser(subparsers) -> argparse.ArgumentParser:
    d = GenieRunConfig()
    p = subparsers.add_parser("genie", help="zero-shot quantization of a BatchNorm CNN (Genie)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weight-bits", type=int, default=d.weight_bits, help="weight bits, 2-8")
    p.add_argument("--act-bits", type=int, default=d.act_bits, help="activation bits, 2-8; 0 = float")
    p.add_argument("--data", default=d.data, choices=DATA_SOURCES,
                   help="calibration images: distilled (genie), optimized pixels, Gaussian noise, or real digits")
    p.add_argument("--samples", type=int, default=d.samples, help="calibration images")
    p.add_argument("--distill-steps", type=int, default=d.distill_steps, help="Adam steps per distilled batch")
    p.add_argument("--distill-batch", type=int, default=d.distill_batch, help="images per distilled batch")
    p.add_argument("--swing", action=argparse.BooleanOptionalAction, default=d.swing,
                   help="swing convolution during distillation (random shifts before strided convs)")
    p.add_argument("--method", default=d.method, choices=["genie", "rtn"], help="Genie-M or round to nearest")
    p.add_argument("--iters", type=int, default=d.iters, help="Genie-M optimization steps per block")
    p.add_argument("--ends-bits", type=int, default=d.ends_bits,
                   help="bits of the first conv and last linear; 0 = same as the rest")
    p.add_argument("--model", default=d.model,
                   help="weights (.safetensors) of a CNN with BatchNorm (the JSON beside it, when there is one, "
                        "gives its settings and test accuracy)")
    p.add_argument("--architecture", default=d.architecture, choices=list(ARCHITECTURES),
                   help="what the --model weights are loaded as")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--samples-png", default=None, help="write a grid of the calibration images here")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=run)
    return p


def config_from_args(args) -> GenieRunConfig:
    return GenieRunConfig(weight_bits=args.weight_bits, act_bits=args.act_bits or 0, data=args.data,
                          samples=args.samples, distill_steps=args.distill_steps, distill_batch=args.distill_batch,
                          swing=args.swing, method=args.method, iters=args.iters,
                          ends_bits=args.ends_bits or None, seed=args.seed, device=args.device, model=args.model,
                          architecture=args.architecture)


def _progress(quiet: bool):
    if quiet:
        return None
    last = {}

    def show(phase: str, step: int, loss: float):
        # one line per phase every 100 steps keeps logs readable
        if step % 100 == 0 or phase not in last:
            print(f"genie: {phase} step {step}: loss {loss:.4g}", file=sys.stderr)
        last[phase] = step
    return show


def run(args) -> int:
    cfg = config_from_args(args)
    report_path = check_writable(args.report, "report") if args.report else None
    png_path = check_writable(args.samples_png, "samples PNG") if args.samples_png else None
    result = run_genie(cfg, _progress(getattr(args, "quiet", False)))
    report = dict(result.report)
    if png_path is not None:
        report["samples_png"] = str(png_path)
        pixels = image_grid(result.images[:64], upscale=4)
        with atomic_path(png_path) as tmp:
            write_png(tmp, pixels)
    if report_path is not None:
        with atomic_path(report_path) as tmp:
            tmp.write_text(dumps(report, indent=2) + "\n")
    r = report
    print(f"genie W{cfg.weight_bits}A{cfg.act_bits or 'fp'} data={cfg.data} method={cfg.method}: "
          f"accuracy fp {r['fp_accuracy']:.2f}% -> quant {r['quant_accuracy']:.2f}%, "
          f"data {r['distill_seconds']:.1f} s, quantization {r['quant_seconds']:.1f} s"
          + (f", report {report_path}" if report_path else ""))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="genie")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["genie", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.run(args)
    except WorkbenchError as exc:
        print(f"genie: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
