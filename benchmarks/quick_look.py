"""Does the app's quick look (a few blocks, a little calibration) rank the methods as the full run does?

Each row quantizes the first ``--blocks`` blocks of the model with one method and calibration size,
then measures perplexity twice on the raw test text: on the app's few evaluation windows and on many
more, so the noise of a small evaluation is seen beside the effect of a small calibration.

    python benchmarks/quick_look.py                                   # the app's quick look (config.QUICK_LOOK)
    python benchmarks/quick_look.py --bits 4 --calib 8 --blocks 2 --few 4   # the quick look before it changed
    python benchmarks/quick_look.py --calib 8,32,128 --methods gptq,turboboa --extra dx_alpha=0
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import workbench
from workbench.config import QUICK_LOOK, QuantizeConfig, build_config
from workbench.data import evaluation_windows
from workbench.evaluate import perplexity
from workbench.models.loading import load_model


def parse_extra(items: list[str]) -> list[dict]:
    """``name=value[,name=value]`` per variant; the empty variant is the method's defaults."""
    out = [{}]
    for item in items:
        out.append(dict(kv.split("=", 1) for kv in item.split(",")))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="rtn,gptq,boa,turboboa")
    p.add_argument("--bits", default=str(QUICK_LOOK["bits"]))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib", default=str(QUICK_LOOK["calib_samples"]), help="calibration windows per row (comma-separated)")
    p.add_argument("--seqlen", type=int, default=QUICK_LOOK["seqlen"])
    p.add_argument("--blocks", type=int, default=QUICK_LOOK["max_blocks"])
    p.add_argument("--few", type=int, default=QUICK_LOOK["eval_windows"], help="the app's evaluation windows")
    p.add_argument("--many", type=int, default=64, help="the larger evaluation")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=VALUE[,...]",
                   help="a variant of the method's settings (repeatable), e.g. dx_alpha=0,refine_iters=0")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    base = load_model(args.model)
    text = QuantizeConfig().eval_text
    many = evaluation_windows(base.tokenizer, text, args.seqlen, args.many)
    few = many[:args.few]
    fp = {"few": perplexity(base.model, few), "many": perplexity(base.model, many)}
    print(f"{args.model}, first {args.blocks} blocks, g{args.group_size}, windows of {args.seqlen}; "
          f"fp ppl {fp['few']:.3f} on {args.few} windows, {fp['many']:.3f} on {args.many}")
    print(f"| bits | method | variant | calib | ppl {args.few} win | change % | ppl {args.many} win | change % | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for bits in [int(b) for b in args.bits.split(",")]:
        for n in [int(c) for c in args.calib.split(",")]:
            for method in args.methods.split(","):
                for extra in parse_extra(args.extra) if method == "turboboa" else [{}]:
                    values = {"model": args.model, "method": method, "bits": bits, "group_size": args.group_size,
                              "calib_samples": n, "seqlen": args.seqlen, "max_blocks": args.blocks,
                              "eval_windows": -1, **extra}
                    cfg = build_config(values, "api")
                    loaded = copy.copy(base)
                    loaded.model = copy.deepcopy(base.model)
                    t0 = time.perf_counter()
                    result = workbench.quantize(cfg, loaded=loaded)
                    seconds = time.perf_counter() - t0
                    row = {"bits": bits, "method": method, "variant": ",".join(f"{k}={v}" for k, v in extra.items())
                           or "defaults", "calib": f"{n}x{args.seqlen}", "seconds": seconds,
                           "ppl_few": perplexity(result.model, few), "ppl_many": perplexity(result.model, many)}
                    rows.append(row)
                    print(f"| {bits} | {method} | {row['variant']} | {row['calib']} | {row['ppl_few']:.3f} | "
                          f"{100 * (row['ppl_few'] / fp['few'] - 1):+.2f} | {row['ppl_many']:.3f} | "
                          f"{100 * (row['ppl_many'] / fp['many'] - 1):+.2f} | {seconds:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"fp": fp, "rows": rows, "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
