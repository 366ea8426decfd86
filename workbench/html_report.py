"""One self-contained HTML page of one or more runs: settings, perplexities, per-layer error curves,
attention errors and Hessian spectra, with plotly's JavaScript embedded once so it opens offline.

``build_page`` is pure (runs in, HTML text out) and draws with the figure builders the app and the
widgets use; ``read_runs`` reads the JSON files the workbench writes; ``write_page`` writes the page
atomically. Every piece of text on the page is escaped: model names and paths come from the user.
"""
from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from .diagnostics.reconstruction import BLOCK_COLUMNS, HEAD_COLUMNS, LAYER_COLUMNS, Reconstruction
from .diagnostics.spectra import HEAD_COLUMNS as SPECTRA_HEAD_COLUMNS
from .diagnostics.spectra import LAYER_COLUMNS as SPECTRA_LAYER_COLUMNS
from .diagnostics.spectra import Spectra
from .errors import WorkbenchError
from .figures import (attention_heatmaps, block_attention_figure, condition_heatmap, error_vs_spectrum,
                      head_spectra_figure, kind_error_figure, layer_error_figure, spectrum_figure)
from .figures.style import method_label
from .jsonsafe import restore
from .report import Report, write_atomic

ATTENTION_KINDS = ("q", "k", "v")
FIGURE_CLASS = "plotly-graph-div"      # what plotly gives every figure's div: the tests count them
SOURCES = ("the JSON of `workbench quantize --report`, a JSON download of the app's Quantize or Compare tab, "
           "or the JSON of `workbench inspect --report`")


@dataclass
class RunData:
    """One run on the page: its report and, when it was measured (the app, ``workbench inspect``),
    the held-out reconstruction errors per layer, head and block."""
    report: Report
    reconstruction: Reconstruction | None = None

    @classmethod
    def from_outcome(cls, outcome) -> "RunData":
        """From a ``workspace.Outcome`` (the app's and the widgets' runs)."""
        return cls(outcome.report, outcome.reconstruction)


@dataclass
class SpectraData:
    """Hessian spectra of a full-precision model, and the settings they were computed with."""
    spectra: Spectra
    model: str
    settings: dict = field(default_factory=dict)    # calibration text, samples, sequence length...

    @classmethod
    def from_config(cls, spectra: Spectra, config) -> "SpectraData":
        """From the ``QuantizeConfig`` the spectra were computed with (the app's Inspect tab)."""
        return cls(spectra, config.model, {k: config.solver().damp if k == "damp" else getattr(config, k)
                                           for k in SPECTRA_SETTINGS})


SPECTRA_SETTINGS = ("calib", "calib_samples", "seqlen", "seed", "max_blocks", "damp")


# -- reading -----------------------------------------------------------------------------------------

def read_runs(path: str | os.PathLike) -> tuple[list[RunData], list[SpectraData]]:
    """The runs and spectra in one JSON file the workbench wrote (see ``SOURCES``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise WorkbenchError(f"{str(path)!r} is a directory; give a report JSON file ({SOURCES})")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkbenchError(f"report {str(path)!r} does not exist; give a report JSON file ({SOURCES})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"report {str(path)!r} cannot be read ({type(exc).__name__}); give {SOURCES}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkbenchError(f"{str(path)!r} is not JSON ({exc.msg} at line {exc.lineno}); give {SOURCES}") from None
    try:
        return parse_runs(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, WorkbenchError):
            raise WorkbenchError(f"{str(path)!r}: {exc}") from None
        raise WorkbenchError(f"{str(path)!r} is not a workbench report ({type(exc).__name__}: {exc}); give "
                             f"{SOURCES}") from None


def parse_runs(data) -> tuple[list[RunData], list[SpectraData]]:
    """Runs and spectra from parsed JSON: a report, the app's bundle (or a list of them), an inspect file."""
    if isinstance(data, list):
        if not data:
            raise WorkbenchError(f"the file holds an empty list, no run to show; give {SOURCES}")
        runs, spectra = [], []
        for item in data:
            r, s = parse_runs(item)
            runs.extend(r)
            spectra.extend(s)
        return runs, spectra
    if not isinstance(data, dict):
        raise WorkbenchError(f"the file holds a JSON {type(data).__name__}, not a report; give {SOURCES}")
    data = restore(data)
    if "frames" in data and "config" in data:          # workbench inspect
        return _parse_inspect(data)
    if "report" in data and isinstance(data["report"], dict):    # the app's download
        return [RunData(_report(data["report"]), _reconstruction(data.get("heldout") or {}))], []
    if {"model", "method", "layers"} <= set(data):    # workbench quantize --report
        return [RunData(_report(data))], []
    raise WorkbenchError(f"the file is JSON but not a workbench report (its keys: {', '.join(sorted(data))[:200]}); "
                         f"give {SOURCES}")


def _report(d: dict) -> Report:
    report = Report.from_dict(d)
    if not isinstance(report.config, dict) or not isinstance(report.layers, list):
        raise WorkbenchError(f"the report's config or layers are not what the workbench writes; give {SOURCES}")
    return report


def _frame(records, columns) -> pd.DataFrame:
    return pd.DataFrame(records or [], columns=columns if not records else None)


def _reconstruction(frames: dict) -> Reconstruction | None:
    if not frames.get("error_layers") and not frames.get("error_heads"):
        return None
    return Reconstruction(_frame(frames.get("error_layers"), LAYER_COLUMNS),
                          _frame(frames.get("error_heads"), HEAD_COLUMNS),
                          _frame(frames.get("error_blocks"), BLOCK_COLUMNS))


def _parse_inspect(data: dict) -> tuple[list[RunData], list[SpectraData]]:
    frames, config = data["frames"], data["config"]
    quantize = config.get("quantize", {}) if isinstance(config, dict) else {}
    runs = [] if not data.get("report") else [RunData(_report(data["report"]), _reconstruction(frames))]
    spectra = []
    if frames.get("spectra_layers"):
        s = Spectra(_frame(frames["spectra_layers"], SPECTRA_LAYER_COLUMNS),
                    _frame(frames.get("spectra_layer_eigenvalues"), None),
                    _frame(frames.get("spectra_heads"), SPECTRA_HEAD_COLUMNS),
                    _frame(frames.get("spectra_head_eigenvalues"), None))
        spectra.append(SpectraData(s, str(quantize.get("model", "model")),
                                   {k: quantize.get(k) for k in SPECTRA_SETTINGS if k in quantize}))
    if not runs and not spectra:
        raise WorkbenchError(f"the inspect file holds neither a run nor spectra; give {SOURCES}")
    return runs, spectra


# -- the page ----------------------------------------------------------------------------------------

def run_labels(runs: list[RunData]) -> list[str]:
    """Short, distinct names: the method, then bits and group size, then the model, then a number."""
    def cfg(r):
        return r.report.config

    steps = [lambda r: method_label(r.report.method),
             lambda r: f"{method_label(r.report.method)} {r.report.width} g{cfg(r).get('group_size')}",
             lambda r: f"{method_label(r.report.method)} {r.report.width} g{cfg(r).get('group_size')} "
                       f"{Path(str(r.report.model)).name}"]
    for step in steps:
        labels = [step(r) for r in runs]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label} ({i + 1})" for i, label in enumerate(labels)]


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _number(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _change(r: Report) -> str:
    if not r.ppl_fp or r.ppl_quant is None or not math.isfinite(r.ppl_fp) or not math.isfinite(r.ppl_quant):
        return "n/a"
    return f"{100 * (r.ppl_quant / r.ppl_fp - 1):+.2f}%"


def _table(header: list[str], rows: list[list[str]], cls: str, row_classes: list[str] | None = None) -> str:
    """An HTML table of already-escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(f'<tr class="{(row_classes or [""] * len(rows))[i]}">' + "".join(f"<td>{c}</td>" for c in row)
                   + "</tr>" for i, row in enumerate(rows))
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def perplexity_table(runs: list[RunData], labels: list[str]) -> str:
    header = ["run", "model", "method", "bits", "group size", "blocks", "eval windows", "ppl full precision",
              "ppl quantized", "change", "quantization s", "peak memory GiB", "layers"]
    rows = []
    for run, label in zip(runs, labels):
        r, c = run.report, run.report.config
        rows.append([_esc(label), _esc(r.model), _esc(method_label(r.method)), _esc(r.width.removeprefix("w")),
                     _esc(c.get("group_size")), _esc(c.get("max_blocks") or "all"), _esc(c.get("eval_windows")),
                     _esc(_number(r.ppl_fp)), _esc(_number(r.ppl_quant)), _esc(_change(r)),
                     _esc(_number(r.quant_seconds, 1)), _esc(_number(r.peak_memory_bytes / 2 ** 30, 2)),
                     _esc(len(r.layers))])
    return _table(header, rows, "wb-ppl")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _setting_text(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) or "none"
    return str(v)


def settings_tables(runs: list[RunData], labels: list[str]) -> str:
    """Every recorded setting, one column per run, and (for several runs) first the ones that differ."""
    from .config import SETTINGS
    flats = [_flat(r.report.config) for r in runs]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    rows, classes = [], []
    for k in keys:
        values = [_setting_text(f.get(k, "")) for f in flats]
        name = SETTINGS[k].label if k in SETTINGS else k
        rows.append([f"{_esc(name)} <code>{_esc(k)}</code>", *map(_esc, values)])
        classes.append("differs" if len(set(values)) > 1 else "")
    header = ["setting", *map(_esc, labels)]
    full = _table(header, rows, "wb-settings", classes)
    differing = [row for row, c in zip(rows, classes) if c]
    out = ""
    if len(runs) > 1:
        out = (f"<p>Settings that differ between the runs:</p>{_table(header, differing, 'wb-differs')}"
               if differing else "<p>The runs have the same settings.</p>")
    return out + f"<details><summary>All {len(keys)} settings recorded in the reports</summary>{full}</details>"


def timings_table(runs: list[RunData], labels: list[str]) -> str:
    keys = list(dict.fromkeys(k for r in runs for k in (r.report.timings or {})))
    if not keys:
        return ""
    rows = [[_esc(k), *(_esc(_number((r.report.timings or {}).get(k), 2)) for r in runs)] for k in keys]
    return _table(["seconds by phase", *map(_esc, labels)], rows, "wb-timings")


def run_keys(runs: list[RunData], labels: list[str]) -> list[str]:
    """What the figures group lines and panels by: the method's own name where it is the run's label
    (so the line gets the method's color), the label otherwise."""
    # plotly reads a little HTML in its text: escaped, a model name shows as written
    return [run.report.method if label == method_label(run.report.method) else _esc(label)
            for run, label in zip(runs, labels)]


def layer_frame(runs: list[RunData], keys: list[str]) -> pd.DataFrame:
    """Every run's layers with a ``method`` column holding the run's key (one line per run), its model,
    and the held-out errors beside them where the run was measured."""
    frames = []
    for run, key in zip(runs, keys):
        frame = run.report.to_frame()
        if run.reconstruction is not None and len(run.reconstruction.layers):
            held = run.reconstruction.layers[["name", "rel_error"]].rename(columns={"rel_error": "heldout_rel_error"})
            frame = frame.merge(held, on="name", how="left")
        frame.insert(0, "method", key)
        frame.insert(1, "model", str(run.report.model))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def page_figures(runs: list[RunData], spectra: list[SpectraData]) -> list[tuple[str, list[go.Figure], str]]:
    """The page's sections: (heading, figures, a note saying what is missing and where to get it)."""
    labels = run_labels(runs)
    keys = run_keys(runs, labels)
    frame = layer_frame(runs, keys)
    layers = []
    if len(frame):
        layers.append(layer_error_figure(frame, title="Relative output error per layer (calibration windows)"))
        if "heldout_rel_error" in frame.columns and frame["heldout_rel_error"].notna().any():
            layers.append(layer_error_figure(frame[frame["heldout_rel_error"].notna()], "heldout_rel_error",
                                             title="Relative output error per layer (held-out windows)"))
        layers.append(kind_error_figure(frame, title="Mean error by layer kind (calibration windows)"))
    sections = [("Per-layer error", layers, "" if layers else "The reports hold no quantized layer.")]

    attention, note = [], ""
    if "attn_rel_error" in frame.columns and frame["attn_rel_error"].notna().any():
        qkv = frame[frame["kind"].isin(ATTENTION_KINDS) & frame["attn_rel_error"].notna()]
        attention.append(layer_error_figure(qkv, "attn_rel_error",
                                            title="Attention output error per q/k/v layer (calibration windows)"))
    measured = [i for i, run in enumerate(runs) if run.reconstruction is not None and len(run.reconstruction.heads)]
    if measured:
        heads = {keys[i]: runs[i].reconstruction.heads for i in measured}
        for value, where in (("after_o", "after"), ("before_o", "before")):
            attention.append(attention_heatmaps(heads, value, title=f"Attention error per head {where} o_proj "
                                                                    f"(held-out windows, block x head)"))
        blocks = pd.concat([runs[i].reconstruction.blocks.assign(method=keys[i]) for i in measured],
                           ignore_index=True)
        attention.append(block_attention_figure(blocks, title="Attention error per block (held-out windows)"))
    missing = [labels[i] for i in range(len(runs)) if i not in measured]
    if missing:
        note = (f"No per-head attention errors for {', '.join(missing)}: a quantize report does not measure "
                f"them. The JSON downloads of the app's Quantize and Compare tabs and "
                f"`workbench inspect --method ... --report` do.")
    sections.append(("Attention", attention, note))

    spectral = []
    for s in spectra:
        errors = frame[(frame["model"] == s.model) & frame["name"].isin(s.spectra.layers["name"])] \
            if len(frame) and len(s.spectra.layers) else None
        spectral.extend(spectra_figures(s, errors))
    sections.append(("Hessian spectra", spectral, "" if spectra else
                     "No Hessian spectra: add the JSON of `workbench inspect --report` to the command, or compute "
                     "them in the app's Inspect tab before writing the page."))
    return sections


def spectra_figures(s: SpectraData, errors: pd.DataFrame | None) -> list[go.Figure]:
    """The layer spectra of the first block, per-head ``H_out`` spectra, conditioning across layers and,
    with runs of the same model, error against conditioning."""
    layers, figs = s.spectra.layers, []
    if len(layers) == 0:
        return figs
    model = _esc(Path(s.model).name)
    first = int(layers["block"].min())
    stages = layers[layers["block"] == first].drop_duplicates("stage")["name"].tolist()
    if len(s.spectra.layer_eigenvalues):
        figs.append(spectrum_figure(s.spectra.layer_eigenvalues, stages, normalize=True,
                                    title=f"H_in spectra of block {first}, one per input ({model})"))
    if len(s.spectra.head_eigenvalues):
        for kind in ("q", "k"):
            figs.append(head_spectra_figure(s.spectra.head_eigenvalues, first, kind, factor="H_out",
                                            title=f"Per-head H_out spectra, block {first}, {kind} ({model})"))
    figs.append(condition_heatmap(layers, title=f"Condition number of H_in across layers ({model})"))
    if errors is not None and len(errors):
        figs.append(error_vs_spectrum(layers, errors, title=f"Layer error against the condition of its H_in "
                                                            f"({model})"))
    return figs


def spectra_note(s: SpectraData) -> str:
    parts = ", ".join(f"{k} {_setting_text(v)}" for k, v in s.settings.items())
    return f"Spectra of the full-precision {s.model}" + (f" on {parts}" if parts else "")


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#111827;
padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:0.9em}
th,td{border:1px solid #e5e7eb;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f9fafb} tr.differs td{background:#fffbeb} code{color:#6b7280;font-size:0.85em}
.wb-note{color:#92400e;background:#fffbeb;padding:8px 12px;border-radius:6px}
.wb-figure{margin:12px 0} summary{cursor:pointer;color:#1e40af;margin:8px 0}
"""


def figure_html(fig: go.Figure, index: int) -> str:
    """One figure's div and its drawing call; the JavaScript library sits once in the page's head."""
    return fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False, div_id=f"wb-figure-{index}",
                       config={"displaylogo": False, "responsive": True})


def build_page(runs: list[RunData], spectra: list[SpectraData] | tuple = (), *, title: str | None = None,
               sources: list[str] | tuple = ()) -> str:
    """The page for ``runs`` (at least one) and any ``spectra``; ``sources`` names where they came from."""
    runs, spectra = list(runs), list(spectra)
    if not runs:
        raise WorkbenchError("no run to report: give at least one quantization report (spectra alone are shown "
                             "by `workbench inspect` and the app's Inspect tab)")
    labels = run_labels(runs)
    models = list(dict.fromkeys(str(r.report.model) for r in runs))
    title = title or f"Quant Workbench report: {', '.join(labels)} on {', '.join(Path(m).name for m in models)}"
    body = [f"<h1>{_esc(title)}</h1>",
            f"<p>{len(runs)} run{'s' if len(runs) > 1 else ''} of {_esc(', '.join(models))}"
            + (f", from {_esc(', '.join(sources))}" if sources else "") + ".</p>",
            "<h2>Perplexity and time</h2>", perplexity_table(runs, labels), timings_table(runs, labels),
            "<h2>Settings</h2>", settings_tables(runs, labels)]
    index = 0
    for heading, figs, note in page_figures(runs, spectra):
        body.append(f"<h2>{_esc(heading)}</h2>")
        if heading == "Hessian spectra":
            body.extend(f"<p>{_esc(spectra_note(s))}.</p>" for s in spectra)
        if note:
            body.append(f'<p class="wb-note">{_esc(note)}</p>')
        for fig in figs:
            body.append(f'<div class="wb-figure">{figure_html(fig, index)}</div>')
            index += 1
    # the library is inlined once, ahead of every figure: the page needs no network to draw
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_esc(title)}</title>"
            f"<style>{STYLE}</style><script type=\"text/javascript\">{get_plotlyjs()}</script></head>"
            f"<body>{''.join(body)}</body></html>\n")


def write_page(page: str, path: str | os.PathLike) -> Path:
    """Write the page through a temporary file renamed over ``path`` (as the JSON reports are)."""
    return write_atomic(path, page)
