"""The HTML report button of the Quantize and Compare tabs: one self-contained page of the runs the tab
shows (and the Inspect tab's spectra of their model, when computed), offered as a download."""
from __future__ import annotations

from typing import Callable

import gradio as gr

from ..errors import WorkbenchError
from ..html_report import FIGURE_CLASS, RunData, SpectraData, build_page, write_page
from .views import message_html


def session_spectra(sess, models: set[str]) -> list[SpectraData]:
    """The latest spectra this page computed for each of ``models``."""
    latest = {}
    for config, spectra in sess.spectra.values():
        if config.model in models:
            latest[config.model] = SpectraData.from_config(spectra, config)
    return list(latest.values())


def write_session_report(sess, outcomes: list, stem: str) -> tuple[str, str]:
    """Write the page of ``outcomes`` into the session's download folder; (status, file path)."""
    outcomes = [o for o in outcomes if o is not None]
    if not outcomes:
        raise WorkbenchError("nothing to report yet: press Run first")
    spectra = session_spectra(sess, {o.config.model for o in outcomes})
    page = build_page([RunData.from_outcome(o) for o in outcomes], spectra, sources=["the Quant Workbench app"])
    path = write_page(page, sess.files_dir() / f"{stem}.html")
    figures = page.count(f'class="{FIGURE_CLASS}"')
    extra = f" and the spectra of {len(spectra)} model{'s' if len(spectra) > 1 else ''}" if spectra else \
        " (compute spectra in the Inspect tab to add them)"
    note = (f"wrote {path.name}: {len(outcomes)} run{'s' if len(outcomes) > 1 else ''}{extra}, {figures} figures, "
            f"{path.stat().st_size / 2 ** 20:.1f} MiB; it opens offline")
    return message_html(note, "ok"), str(path)


def build_report_button(session: gr.State, prefix: str, runs: Callable[[object], list],
                        stem: Callable[[list], str]) -> None:
    """A button writing the page of ``runs(session)`` as ``stem(outcomes).html``, and its download."""
    button = gr.Button("Write the HTML report", elem_id=f"wb-{prefix}-report")
    status = gr.HTML(elem_id=f"wb-{prefix}-report-status")
    download = gr.File(label="HTML report (one page, plotly embedded, works offline)", interactive=False,
                       elem_id=f"wb-{prefix}-report-file")

    def on_click(sess):
        outcomes = [o for o in runs(sess) if o is not None]
        try:
            return write_session_report(sess, outcomes, stem(outcomes) if outcomes else "report")
        except WorkbenchError as exc:
            return message_html(str(exc), "error"), None

    button.click(on_click, session, [status, download], show_progress="minimal")
