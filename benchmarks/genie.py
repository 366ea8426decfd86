"""Genie on the digits CNN: accuracy of RTN and of Genie-M on each calibration source.

    python benchmarks/genie.py [--threads 1] [--seeds 0 1] [--sources noise genie real] [--json out.json]

Each calibration set (Gaussian noise, BN-optimized pixels, Genie-D, real digits) is built once
per seed and reused for every bit width. RTN takes its activation ranges from the real digits
(its most favourable case). Genie-D is run without and with swing convolution. The first conv and the last linear stay at 8 bits (weights and
inputs) unless --ends-bits 0.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from workbench.genie.data import DigitsConfig, load_digits_split
from workbench.genie.evaluate import accuracy
from workbench.genie.model import load_default_model
from workbench.genie.pipeline import SOURCE_LABELS, SOURCES, GenieRunConfig, calibration_images
from workbench.genie.quantize import GenieMConfig, quantize_model

LABELS = {"rtn": "RTN", **SOURCE_LABELS}


def parse_setting(text: str) -> tuple[int, int]:
    """"W4A4" -> (4, 4); "W2" -> (2, 0) (float activations)."""
    t = text.upper()
    w, _, a = t[1:].partition("A")
    return int(w), int(a or 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["W4A4", "W3A3", "W2A2", "W2"])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--distill-steps", type=int, default=GenieRunConfig().distill_steps)
    p.add_argument("--iters", type=int, default=GenieMConfig().iters)
    p.add_argument("--ends-bits", type=int, default=8)
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write all numbers here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    model, info = load_default_model(device=device)
    split = load_digits_split(DigitsConfig(**info["data"]))
    fp = accuracy(model, split.x_test, split.y_test, device=device)
    print(f"digits CNN ({info['n_test']} test images), FP accuracy {fp:.2f}%; "
          f"{a.samples} calibration images, {a.distill_steps} distillation steps per batch, "
          f"{a.iters} Genie-M steps per block; first/last layer at {a.ends_bits or 'the same'} bits; "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", flush=True)

    acc = {}            # (setting, column) -> [accuracy per seed]
    qsec = {}           # (setting, column) -> [seconds per seed]
    sources = [s for s in SOURCES if s in a.sources]
    dsec = {s: [] for s in sources}
    for seed in a.seeds:
        calib = {}
        for src in sources:
            cfg = GenieRunConfig(samples=a.samples, distill_steps=a.distill_steps, seed=seed).with_source(src)
            t0 = time.perf_counter()
            calib[src] = calibration_images(model, cfg, split, device)
            dsec[src].append(time.perf_counter() - t0)
        for setting in a.settings:
            w, act = parse_setting(setting)
            # RTN takes its activation ranges from real digits when they are in the run
            rtn_src = "real" if "real" in sources else sources[0]
            runs = [("rtn", rtn_src, "rtn")] + [(src, src, "genie") for src in sources]
            for column, src, method in runs:
                qcfg = GenieMConfig(weight_bits=w, act_bits=act, method=method, iters=a.iters,
                                    ends_bits=a.ends_bits or None, seed=seed)
                res = quantize_model(model, calib[src], qcfg, device=device)
                acc.setdefault((setting, column), []).append(accuracy(res.model, split.x_test, split.y_test,
                                                                      device=device))
                qsec.setdefault((setting, column), []).append(res.seconds)
                print(f"  seed {seed} {setting:5s} {LABELS[column]:8s} {acc[(setting, column)][-1]:6.2f}% "
                      f"({res.seconds:.1f} s)", flush=True)

    columns = ["rtn", *sources]
    mean = lambda v: statistics.fmean(v)
    head = "| setting | " + " | ".join(("RTN" if c == "rtn" else f"Genie-M + {LABELS[c]}") for c in columns) + " |"
    print()
    print(f"Top-1 accuracy (%), mean over seeds {a.seeds}; FP {fp:.2f}")
    print(head)
    print("|" + "---|" * (len(columns) + 1))
    for setting in a.settings:
        cells = []
        for c in columns:
            v = acc[(setting, c)]
            cells.append(f"{mean(v):.2f}" + (f" ±{statistics.stdev(v):.2f}" if len(v) > 1 else ""))
        print(f"| {setting} | " + " | ".join(cells) + " |")
    print()
    print("Seconds: calibration data (per set of "
          f"{a.samples}): " + ", ".join(f"{LABELS[s]} {mean(dsec[s]):.1f}" for s in sources))
    print("Seconds: quantization (mean per run): " + ", ".join(
        f"{st} RTN {mean(qsec[(st, 'rtn')]):.1f} / Genie-M "
        f"{mean([x for c in sources for x in qsec[(st, c)]]):.1f}" for st in a.settings))
    for st in a.settings if "genie" in sources else ():
        print(f"Genie-D + Genie-M at {st}, one run: {mean(dsec['genie']) + mean(qsec[(st, 'genie')]):.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"fp_accuracy": fp, "args": vars(a), "threads": torch.get_num_threads(),
                       "accuracy": {f"{s}|{c}": v for (s, c), v in acc.items()},
                       "quant_seconds": {f"{s}|{c}": v for (s, c), v in qsec.items()},
                       "data_seconds": dsec}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
