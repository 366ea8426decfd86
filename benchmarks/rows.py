"""What every method benchmark does per row: quantize, time it, keep the row, save the rows so far."""
from __future__ import annotations

import json
import time

import workbench
from workbench.config import QuantizeConfig
from workbench.report import Report


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
