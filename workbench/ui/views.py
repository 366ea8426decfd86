"""Small renderers from run data to what the page shows: progress bar, perplexity line, tables, files."""
from __future__ import annotations

import dataclasses
import html
import json
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from ..jsonsafe import dumps
from ..report import write_atomic
from ..figures.style import method_label

@dataclass
class TabView:
    """A tab's output components as fields; every tab has a status line and a progress bar first."""
    status: gr.HTML
    progress: gr.HTML

    def outputs(self) -> list:
        """The components in field order: what a handler that updates the whole tab returns into."""
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


LAYER_COLUMNS = ["method", "name", "block", "kind", "rel_error", "heldout_rel_error", "heldout_propagated",
                 "attn_rel_error", "loss", "seconds"]


SUMMARY_NAMES = {"ppl_fp": "ppl full precision", "ppl_quant": "ppl quantized", "ppl_change_pct": "ppl change %",
                 "quant_seconds": "quantization s", "mean_rel_error": "mean layer error",
                 "mean_attention_error": "mean attention error"}


def progress_html(done: int, total: int, label: str, seconds: float | None = None, state: str = "running") -> str:
    """A plain HTML bar: it keeps the plot below it visible, unlike an overlay spinner."""
    pct = 0 if total <= 0 else min(100, round(100 * done / total))
    color = {"running": "#2563eb", "done": "#16a34a", "cancelled": "#d97706", "error": "#dc2626"}.get(state, "#2563eb")
    clock = "" if seconds is None else f" &middot; {seconds:.0f} s"
    return (f'<div class="wb-progress" data-state="{state}" data-done="{done}" data-total="{total}">'
            f'<div style="background:#e5e7eb;border-radius:6px;height:12px;overflow:hidden">'
            f'<div style="background:{color};width:{pct}%;height:12px;transition:width .2s"></div></div>'
            f'<div style="font-size:0.9em;margin-top:4px">{html.escape(label)}{clock}</div></div>')


def message_html(text: str, kind: str = "info") -> str:
    """A status box: errors are one readable line, never a traceback."""
    style = {"info": ("#eff6ff", "#1e40af"), "error": ("#fef2f2", "#b91c1c"), "warn": ("#fffbeb", "#92400e"),
             "ok": ("#f0fdf4", "#166534")}[kind]
    return (f'<div class="wb-message wb-{kind}" style="background:{style[0]};color:{style[1]};'
            f'padding:8px 12px;border-radius:6px">{html.escape(text)}</div>')


def error_text(exc: BaseException) -> str:
    from ..errors import WorkbenchError
    from .exposure import EXPOSURE
    if isinstance(exc, WorkbenchError):
        return EXPOSURE.scrub(str(exc))
    return EXPOSURE.scrub(f"the run failed: {type(exc).__name__}: {exc}")


def _fmt(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}"


def perplexity_markdown(outcome) -> str:
    r, s = outcome.report, outcome.config
    if r.ppl_fp is None:
        return "Perplexity was skipped (evaluation windows = -1)."
    change = 100 * (r.ppl_quant / r.ppl_fp - 1)
    blocks = "all blocks" if s.max_blocks is None else f"first {s.max_blocks} blocks"
    return (f"**Perplexity** on {s.eval_windows or 'all'} held-out windows of {s.seqlen} tokens: "
            f"full precision **{_fmt(r.ppl_fp)}** &rarr; {method_label(outcome.method)} {r.width} "
            f"g{s.group_size} ({blocks}) **{_fmt(r.ppl_quant)}** ({change:+.1f}%) &middot; "
            f"quantization {r.quant_seconds:.1f} s")


def rounded(frame: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """Significant digits for display; the downloads keep full precision."""
    out = frame.copy()
    for c in out.columns:
        if pd.api.types.is_float_dtype(out[c]):
            out[c] = out[c].map(lambda v: v if pd.isna(v) else float(f"{v:.{digits}g}"))
    return out


def empty_layers() -> pd.DataFrame:
    return pd.DataFrame(columns=LAYER_COLUMNS)


def layer_display(frame: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in LAYER_COLUMNS if c in frame.columns]
    return rounded(frame[cols])


def summary_display(rows: list[dict]) -> pd.DataFrame:
    cols = ["method", "status", "ppl_fp", "ppl_quant", "ppl_change_pct", "quant_seconds", "mean_rel_error",
            "mean_attention_error"]
    frame = pd.DataFrame(rows, columns=cols)
    frame["method"] = frame["method"].map(method_label)
    return rounded(frame).rename(columns=SUMMARY_NAMES)


def write_run_files(directory: Path, stem: str, outcomes: list) -> list[str]:
    """The reports as JSON (settings, perplexities, layers, held-out errors) and the layers as CSV."""
    directory.mkdir(parents=True, exist_ok=True)
    bundle = [{"report": o.report.to_dict(),
               "heldout": {k: json.loads(f.to_json(orient="records")) for k, f in o.reconstruction.frames().items()}}
              for o in outcomes]
    j = write_atomic(directory / f"{stem}.json", dumps(bundle[0] if len(bundle) == 1 else bundle, indent=1))
    layers = pd.concat([o.layers for o in outcomes], ignore_index=True)
    c = write_atomic(directory / f"{stem}-layers.csv", layers.to_csv(index=False))
    return [str(j), str(c)]


def file_stem(config) -> str:
    model = Path(config.model).name or "model"
    blocks = "all" if config.max_blocks is None else f"b{config.max_blocks}"
    width = "mixed-" if config.mixed else f"w{config.bits}"
    return f"{model}-{config.method}-{width}g{config.group_size}-{blocks}"


def connect_cancel(button, session, status, wait: float = 5.0):
    """A Cancel button: stops this page's run, if any (never queued behind it). It answers once the run
    has stopped (within a step, normally) and then leaves the run's own last word on the page: answered
    at once, its "cancelling..." could reach the page after that word and stay there."""
    def on_cancel(sess):
        job = sess.job
        if not sess.cancel():
            return message_html("nothing is running", "info")
        job.join(wait)
        return gr.skip() if not job.running else message_html("cancelling...", "warn")
    button.click(on_cancel, session, status, show_progress="hidden", concurrency_limit=None)
