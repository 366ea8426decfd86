"""Mixed precision from measured sensitivity against uniform widths and a hand rule, at equal sizes.

First the signals: for the layers of the first ``--signal-blocks`` blocks, the perplexity rise with
only that layer at the lowest candidate width (round to nearest) on ``--signal-windows`` windows,
and the Spearman rank correlation of each sensitivity signal with it (the default signal of
``--sensitivity`` should be the one that ranks best). Then, per method, the rows: uniform W3 and
W4 (and W2 for TurboBoA), the hand rule "attention 4-bit, MLP 3-bit", the allocated plan at the
hand rule's size, and plans at 3.5 and 2.5 bits per weight; each with its size as pack-quantized
stores it, its bits per weight, perplexity, and seconds of sensitivity and of quantization.

    python benchmarks/mixed.py                                       # smollm2-135m, GPTQ and TurboBoA
    python benchmarks/mixed.py --max-blocks 1 --calib-samples 4 --seqlen 64 --eval-windows 2 \\
        --signal-blocks 1 --signal-windows 2                        # a smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from rows import save_rows

import workbench
from workbench.config import DEFAULTS, QuantizeConfig
from workbench.data import calibration_windows, evaluation_windows
from workbench.devices import resolve_device
from workbench.errors import WorkbenchError
from workbench.mixed.agreement import compare_signals
from workbench.mixed.plan import Layer, measure_plan
from workbench.mixed.sensitivity import SIGNALS
from workbench.models.loading import load_model

HAND_RULE = dict(bits=3, keep_bits=("attn:4",))


def rows_of(method: str) -> list[tuple[str, dict]]:
    """(label, settings) of each row; ``hand size`` is filled in from the hand rule's row."""
    uniform = [("uniform W4", dict(bits=4)), ("uniform W3", dict(bits=3))]
    if method == "turboboa":
        uniform.append(("uniform W2", dict(bits=2)))
    return uniform + [("hand: attn 4, mlp 3", HAND_RULE), ("plan at the hand rule's size", {"max_size": None}),
                      ("plan at 3.5 bits", dict(avg_bits=3.5)), ("plan at 2.5 bits", dict(avg_bits=2.5))]


def packed_size(packed: dict, group_size: int, symmetric: bool) -> dict:
    """Size and bits per weight of a run's layers as pack-quantized stores them (uniform runs have no plan)."""
    layers = [Layer(n, 0, "", *q.shape) for n, q in packed.items()]
    return measure_plan({n: q.grid.bits for n, q in packed.items()}, layers, group_size, symmetric)


def signal_agreement(args, base: QuantizeConfig) -> dict:
    """Each signal's rank correlation with the measured perplexity rise of single layers."""
    loaded = load_model(base.model)
    cfg = dataclasses.replace(base, avg_bits=4.0).validate()      # a budget: the candidate widths apply
    ids = calibration_windows(loaded.tokenizer, cfg.calib, cfg.calib_samples, cfg.seqlen, cfg.seed)
    windows = evaluation_windows(loaded.tokenizer, cfg.eval_text, cfg.seqlen, args.signal_windows)
    t0 = time.perf_counter()
    found = compare_signals(loaded.model, loaded.family, cfg, ids, windows, args.signal_blocks,
                            resolve_device(cfg.device))
    seconds = time.perf_counter() - t0
    print(f"\n### Signals: one layer at {found.bits} bits (RTN, g{cfg.group_size}), {args.signal_windows} windows, "
          f"fp ppl {found.ppl_fp:.3f}, measured in {seconds:.1f} s\n")
    print("| layer | ppl rise | " + " | ".join(SIGNALS) + " |")
    print("|---|---:|" + "---:|" * len(SIGNALS))
    for name, rise in sorted(found.ppl_rise.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {rise:.4f} | " + " | ".join(f"{found.costs[s][name]:.4g}" for s in SIGNALS) + " |")
    print("\nSpearman rank correlation with the ppl rise: "
          + ", ".join(f"{s} {found.spearman[s]:.3f}" for s in SIGNALS))
    return {"ppl_fp": found.ppl_fp, "ppl_rise": found.ppl_rise, "costs": found.costs, "spearman": found.spearman,
            "seconds": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="gptq,turboboa")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--sensitivity", default=DEFAULTS["sensitivity"], choices=SIGNALS)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-blocks", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--signal-blocks", type=int, default=2, help="blocks whose layers the signals are checked on")
    p.add_argument("--signal-windows", type=int, default=8, help="evaluation windows of each single-layer perplexity")
    p.add_argument("--skip-signals", action="store_true", help="only the rows")
    p.add_argument("--rows", default=None, help="only the rows whose labels start with one of these, comma-"
                   "separated (e.g. 'uniform W3,uniform W2,plan at 2.5'); the hand rule's size needs its row")
    p.add_argument("--json", default=None, help="also write the rows (and the signal check) here")
    args = p.parse_args(argv)
    chosen = None if args.rows is None else tuple(r.strip() for r in args.rows.split(",") if r.strip())
    base = QuantizeConfig(model=args.model, group_size=args.group_size, calib_samples=args.calib_samples,
                          seqlen=args.seqlen, eval_windows=args.eval_windows, batch_size=args.batch_size,
                          max_blocks=args.max_blocks, device=args.device).validate()
    print(f"model {args.model}, g{args.group_size}, calibration {args.calib_samples}x{args.seqlen}, evaluation "
          f"{args.eval_windows}x{args.seqlen}, blocks {args.max_blocks or 'all'}, sensitivity {args.sensitivity}")
    signals = None if args.skip_signals else signal_agreement(args, base)
    rows, ppl_fp = [], None
    print("\n| method | row | size MB | bits/weight | ppl | sensitivity s | allocation s | quantization s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        hand_bytes = None
        for label, settings in rows_of(method):
            if chosen is not None and not label.startswith(chosen):
                continue
            if "max_size" in settings and hand_bytes is None:
                print(f"| {method} | {label} | skipped: the hand rule's row was not run |||||")
                continue
            if "max_size" in settings:       # the hand rule's size, to the byte (a budget in MB is floored)
                settings = {"max_size": (hand_bytes + 0.5) / 1e6}
            budget = "avg_bits" in settings or "max_size" in settings
            cfg = dataclasses.replace(base, method=method, **settings,
                                      **({"sensitivity": args.sensitivity} if budget else {})).validate()
            try:
                result = workbench.quantize(cfg)
            except WorkbenchError as exc:        # a budget below the smallest plan of this group size
                print(f"| {method} | {label} | refused: {exc} |||||")
                continue
            rep = result.report
            ppl_fp = rep.ppl_fp
            size = rep.plan or packed_size(result.packed, cfg.group_size, cfg.symmetric)
            if label.startswith("hand"):
                hand_bytes = size["size_bytes"]
            row = dict(method=method, row=label, size_mb=size["size_bytes"] / 1e6, avg_bits=size["avg_bits"],
                       ppl=rep.ppl_quant, sensitivity_seconds=rep.timings.get("sensitivity", 0.0),
                       allocation_seconds=rep.timings.get("allocation", 0.0), quant_seconds=rep.quant_seconds,
                       layer_counts=size["layer_counts"])
            rows.append(row)
            ppl = "n/a" if rep.ppl_quant is None else f"{rep.ppl_quant:.3f}"
            print(f"| {method} | {label} | {row['size_mb']:.3f} | {row['avg_bits']:.3f} | {ppl} | "
                  f"{row['sensitivity_seconds']:.1f} | {row['allocation_seconds']:.2f} | {row['quant_seconds']:.1f} |",
                  flush=True)
            save_rows(args.json, ppl_fp, rows + ([{"signals": signals}] if signals else []), args)
    print(f"\nfp ppl {ppl_fp:.3f}" if ppl_fp is not None else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
