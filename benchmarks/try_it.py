"""How long Try it takes: the full-precision and a quantized model each continue a prompt greedily.

    python benchmarks/try_it.py                         # the app's quick look and a whole-model RTN run
    python benchmarks/try_it.py --tokens 40 --presses 3

Each case quantizes the model once (not timed, evaluation skipped), then presses Try it ``--presses``
times the way the app's Generate does (``tryit.try_outcome`` on the run's codes), each press with
another prompt (full precision's continuation of a prompt is kept, and would not be decoded again).
The first press of the first case also builds the full-precision tree, the first of each case the
quantized model from its codes; later presses reuse them. Cases: ``quick`` is the app's opening
settings (``config.QUICK_LOOK``) with GPTQ, whose texts part late, so the quantized model mostly checks
the full-precision tokens in one pass; ``rtn-w3`` quantizes every block with RTN at 3 bits, whose text parts early, so
the quantized model decodes nearly every token itself (the slow case).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from workbench import tryit, workspace
from workbench.config import QUICK_LOOK, QuantizeConfig
from workbench.diagnostics.reconstruction import Reconstruction
from workbench.generate import DEFAULT_PROMPT, GenerateConfig
from workbench.report import write_atomic

PROMPTS = (DEFAULT_PROMPT, "The history of the city begins in", "In 1998, the band released its second album,",
           "The most important idea in physics is")
CASES = {
    "quick": dict(method="gptq", **{k: v for k, v in QUICK_LOOK.items() if k != "eval_windows"}),
    "rtn-w3": dict(method="rtn", bits=3, group_size=64, max_blocks=None, calib_samples=1, seqlen=64),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--cases", default=",".join(CASES), help=f"from {', '.join(CASES)}")
    p.add_argument("--prompts", default="|".join(PROMPTS), help="prompts separated by |, one per press in turn")
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--presses", type=int, default=2)
    p.add_argument("--threads", type=int, default=tryit.THREADS,
                   help="torch threads while Try it builds and decodes (the app's setting by default; 0: torch's own)")
    p.add_argument("--out", default=None, help="write the rows as JSON here too")
    args = p.parse_args(argv)
    prompts = args.prompts.split("|")
    tryit.THREADS = args.threads or None
    machine = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "try_threads": args.threads,
               "load_average_before": os.getloadavg()}
    rows = []
    for case in args.cases.split(","):
        cfg = QuantizeConfig(model=args.model, eval_windows=-1, device="cpu", **CASES[case]).validate()
        result = workspace.quantize_copy(cfg)
        outcome = workspace.Outcome(cfg, result.report, Reconstruction(), packed=result.packed)
        del result
        for press in range(args.presses):
            started = time.perf_counter()
            gen = GenerateConfig(prompt=prompts[len(rows) % len(prompts)], tokens=args.tokens).validate()
            d = tryit.try_outcome(outcome, gen)
            seconds = time.perf_counter() - started
            rows.append({"case": case, "press": press + 1, "prompt": gen.prompt, "seconds": round(seconds, 2),
                         "fp_seconds": round(d.fp.seconds, 2), "quant_seconds": round(d.quant.seconds, 2),
                         "tokens": [len(d.fp.tokens), len(d.quant.tokens)],
                         "first_divergence": None if d.first is None else d.first + 1})
            print(json.dumps(rows[-1]), flush=True)
    machine["load_average_after"] = os.getloadavg()
    print(json.dumps(machine))
    if args.out:
        write_atomic(args.out, json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
