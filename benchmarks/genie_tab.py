"""How long the app's Genie tab takes with the settings it opens with, phase by phase.

    python benchmarks/genie_tab.py                  # the tab's Run: digits CNN, W4A4, Genie-D
    python benchmarks/genie_tab.py --source real

It runs the work behind the tab's Run button (``genie_tab.genie_work``: load, full-precision and RTN
accuracy, then distillation and Genie-M with the gallery traced) without the page, and prints the
seconds from start to each phase and the accuracies. The page adds only its redraws.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch

from workbench.genie.pipeline import SOURCES
from workbench.ui.genie_tab import START, genie_config, genie_work


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=START["source"], choices=SOURCES)
    args = p.parse_args(argv)
    values = {**START, "source": args.source}
    cfg = genie_config("shipped", "", "", values["samples"], values["weight_bits"], values["act_bits"],
                       values["source"], values["distill_steps"], values["distill_batch"], values["iters"],
                       values["seed"])
    started = time.perf_counter()
    marks = []

    def post(kind, payload):
        if kind in ("phase", "baseline", "source", "report"):
            marks.append((round(time.perf_counter() - started, 1), kind,
                          payload if kind in ("phase", "source") else None))

    reports = genie_work(cfg, (args.source,))(post, threading.Event())
    total = time.perf_counter() - started
    for seconds, kind, what in marks:
        print(f"{seconds:8.1f} s  {kind}{': ' + str(what) if what else ''}")
    report = reports[args.source]
    print(json.dumps({"settings": values, "seconds": round(total, 1), "fp_accuracy": report["fp_accuracy"],
                      "quant_accuracy": report["quant_accuracy"], "distill_seconds": report["distill_seconds"],
                      "quant_seconds": report["quant_seconds"],
                      "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                      "load_average": os.getloadavg()}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
