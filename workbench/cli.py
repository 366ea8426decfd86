"""``workbench``: the command line, a thin layer over the Python API."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .errors import Cancelled, WorkbenchError


def add_quantize_parser(sub):
    from .aespa import LearnedOptions
    from .api import QuantizeConfig
    from .methods import METHODS
    d = QuantizeConfig()
    p = sub.add_parser("quantize", help="quantize a causal LM and write a JSON report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d.model, help="smollm2-135m (embedded), a checkpoint directory, or a hub id")
    p.add_argument("--method", default=d.method, choices=list(METHODS))
    p.add_argument("--bits", type=int, default=d.bits, help="weight bits, 2-8")
    p.add_argument("--group-size", type=int, default=d.group_size, help="input columns per grid; -1 = per channel")
    p.add_argument("--symmetric", action="store_true", help="symmetric grid (zero point in the middle)")
    p.add_argument("--grid-search", default=None, choices=["minmax", "mse"],
                   help="range search of the grids (default: mse for gptq, minmax otherwise)")
    p.add_argument("--calib", default=d.calib, help="wikitext2, a text file, or hf:NAME[:CONFIG[:SPLIT[:FIELD]]]")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples)
    p.add_argument("--seqlen", type=int, default=d.seqlen)
    p.add_argument("--eval-text", default=d.eval_text, help="text for perplexity (default: WikiText-2 raw test)")
    p.add_argument("--eval-windows", type=int, default=d.eval_windows, help="0 = all, -1 = skip evaluation")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per forward chunk")
    p.add_argument("--max-blocks", type=int, default=None, help="quantize only the first N blocks")
    p.add_argument("--damp", type=float, default=d.damp)
    p.add_argument("--act-order", default=None, action=argparse.BooleanOptionalAction,
                   help="columns by descending Hessian diagonal, static groups (default: per method)")
    g = p.add_argument_group("BoA / TurboBoA")
    g.add_argument("--rows-per-step", type=int, default=None, help="rows of every head quantized jointly (1 = BoA)")
    g.add_argument("--dx-alpha", type=float, default=None, help="correction for errors of earlier layers, 0-1")
    g.add_argument("--refine-iters", type=int, default=None, help="scale-refinement sweeps after rounding")
    g.add_argument("--grid-at-start", default=None, action=argparse.BooleanOptionalAction,
                   help="grids from the initial weights (BoA) or when each row is reached (TurboBoA)")
    g.add_argument("--value-output", default=d.value_output, choices=["identity", "o_proj"],
                   help="output factor of the value projection's Hessian")
    learned = LearnedOptions()
    g = p.add_argument_group("aespa / BRECQ (learned rounding)")
    g.add_argument("--iters", type=int, default=None, help=f"optimizer steps per layer (aespa) or block (brecq); default {learned.iters}")
    g.add_argument("--lr", type=float, default=None, help=f"learning rate of the rounding variables; default {learned.lr}")
    g.add_argument("--init", default=None, choices=["rtn", "gptq", "boa"],
                   help=f"aespa's starting rounding; default {learned.init}")
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="write the quantized model here (compressed-tensors pack-quantized, loads in transformers/vLLM)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_quantize)
    return p


def run_quantize(args) -> int:
    from tqdm.auto import tqdm

    from .api import QuantizeConfig, quantize
    fields = {f.name for f in dataclasses.fields(QuantizeConfig)}
    cfg = QuantizeConfig(**{k: v for k, v in vars(args).items() if k in fields})
    bar = None

    def on_event(ev):
        nonlocal bar
        if args.quiet:
            return
        if ev.kind == "start":
            bar = tqdm(total=ev.total, desc=f"{cfg.method} w{cfg.bits}", unit="layer", file=sys.stderr)
        elif ev.kind == "layer_finished" and bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{ev.layer_kind}@{ev.block} err={ev.rel_error:.2e}")
        elif ev.kind == "done" and bar is not None:
            bar.close()

    result = quantize(cfg, on_event=on_event, report_path=args.report, save_dir=args.save, overwrite=args.overwrite)
    r = result.report
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    print(f"{r.model} {r.method} w{cfg.bits} g{cfg.group_size}: ppl fp {fmt(r.ppl_fp)} -> quant {fmt(r.ppl_quant)}, "
          f"quantization {r.quant_seconds:.1f} s, peak memory {r.peak_memory_bytes / 2**30:.2f} GiB"
          + (f", report {args.report}" if args.report else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="Quant Workbench: post-training quantization")
    sub = parser.add_subparsers(dest="command", required=True)
    add_quantize_parser(sub)
    for extra in _optional_commands():
        extra(sub)
    return parser


def _optional_commands():
    """Subcommands of other parts of the workbench, present when their modules are."""
    import importlib
    for module in ("workbench.genie.cli", "workbench.diagnostics.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError:
            continue
        yield mod.add_parser


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
