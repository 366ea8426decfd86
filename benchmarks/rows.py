"""What every method benchmark does per row: quantize, time it, keep the row, save the rows so far."""
from __future__ import annotations

import json
import time

import workbench
from workbench.config import QuantizeConfig
from workbench.report import Report


# bits and group size of each named setting (-1: one grid per output channel)
SETTINGS = {"w4g64": (4, 64), "w3g64": (3, 64), "w2g64": (2, 64), "w3pc": (3, -1), "w4pc": (4, -1),
            "w4g32": (4, 32), "w2pc": (2, -1)}


def protocol_arguments(p) -> None:
    """The run's protocol on a method benchmark's command line (defaults: the standard protocol)."""
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--max-blocks", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the rows here")


def measured_row(cfg: QuantizeConfig, **extra) -> tuple[dict, Report]:
    """One run of ``cfg`` in this process: its row (perplexity, seconds by phase) and its report."""
    t0 = time.perf_counter()
    rep = workbench.quantize(cfg).report
    row = dict(method=cfg.method, bits=cfg.bits, group=cfg.group_size, ppl=rep.ppl_quant,
               quant_seconds=rep.quant_seconds, timings=rep.timings, wall_seconds=time.perf_counter() - t0, **extra)
    return row, rep


def save_rows(path: str | None, ppl_fp: float | None, rows: list[dict], args) -> None:
    """After every row, so that a long run that is stopped keeps what it measured."""
    if path:
        with open(path, "w") as f:
            json.dump({"ppl_fp": ppl_fp, "rows": rows, "args": vars(args)}, f, indent=2)
