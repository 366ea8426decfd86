"""Attention-error explorer: a block x head heatmap; pick a cell to see that head."""
from __future__ import annotations

import ipywidgets as W
import pandas as pd

from .. import workspace
from ..diagnostics import Reconstruction, Spectra
from ..figures import attention_heatmap, block_attention_figure, empty_figure, head_spectra_figure
from ..workspace import Outcome
from .common import LiveFigure, RunWidget, SettingsForm, table_html, shown_figure

READINGS = (("after o_proj", "after_o"), ("before o_proj", "before_o"),
            ("after o_proj, propagated", "after_o_propagated"), ("before o_proj, propagated", "before_o_propagated"))
HEATMAP = "Attention error per head on held-out text"


class AttentionExplorer(RunWidget):
    """Quantize a copy with one method, measure every head on held-out windows, and browse.

    ``figure``: the block x head heatmap (a click on a cell selects it when figure widgets are
    available; ``select(block, head)`` does the same from code). ``head_figure``: the chosen
    head's errors across blocks; ``head_spectrum_figure``: its query ``H_out`` spectrum in the
    chosen block (needs spectra: ``run(spectra=True)`` or ``spectra=``). ``heads`` is the frame.

    ``AttentionExplorer.from_outcome(compare.outcomes["boa"])`` browses a finished run.
    """

    run_label = "Measure"

    def __init__(self, reconstruction: Reconstruction | None = None, spectra: Spectra | None = None,
                 use_figure_widget: bool | None = None, **settings):
        self.form = SettingsForm(**settings)
        self._setup_runner()
        self.with_spectra = W.Checkbox(value=True, description="also the per-head spectra")
        self.reading = W.Dropdown(options=READINGS, value="after_o", description="reading")
        self.block = W.Dropdown(options=[], description="block")
        self.head = W.Dropdown(options=[], description="head")
        self.heatmap = LiveFigure(empty_figure(HEATMAP, "press Measure"), use_figure_widget)
        self.detail = LiveFigure(empty_figure("One head across blocks", "pick a cell"), use_figure_widget)
        self.head_spectrum = LiveFigure(empty_figure("Its H_out spectrum", "needs spectra"), use_figure_widget)
        self.cell = W.HTML()
        self.outcome: Outcome | None = None
        self.reconstruction: Reconstruction | None = None
        self.spectra: Spectra | None = spectra
        self.selected: tuple[int, int] | None = None
        self.reading.observe(lambda _: self._draw_heatmap(), names="value")
        self.block.observe(lambda _: self._pick(), names="value")
        self.head.observe(lambda _: self._pick(), names="value")
        self._busy = False
        super().__init__([self.form, self.buttons(self.with_spectra), self.runner.status, self.reading, self.heatmap.widget,
                          W.HBox([self.block, self.head]), self.cell,
                          W.HBox([self.detail.widget, self.head_spectrum.widget])])
        if reconstruction is not None:
            self._loaded((None, reconstruction, spectra))

    @classmethod
    def from_outcome(cls, outcome: Outcome, spectra: Spectra | None = None, **kw) -> "AttentionExplorer":
        cfg = outcome.config
        w = cls(spectra=spectra, model=cfg.model, method=cfg.method, bits=cfg.bits, group_size=cfg.group_size,
                calib=cfg.calib, calib_samples=cfg.calib_samples, seqlen=cfg.seqlen, max_blocks=cfg.max_blocks,
                eval_windows=cfg.eval_windows, **kw)
        w._loaded((outcome, outcome.reconstruction, spectra))
        return w

    figure = shown_figure("heatmap")
    head_figure = shown_figure("detail")
    head_spectrum_figure = shown_figure("head_spectrum")

    @property
    def heads(self) -> pd.DataFrame | None:
        return None if self.reconstruction is None else self.reconstruction.heads

    def run(self, wait: bool = True, spectra: bool | None = None, **settings):
        self.runner.check_idle()
        if settings:
            self.form.set(**settings)
        if spectra is not None:
            self.with_spectra.value = spectra
        cfg = self.form.config()
        want_spectra = self.with_spectra.value

        def on_event(ev):
            self.runner.follow(ev, cfg.method)

        def work(cancel):
            outcome = workspace.run(cfg, on_event=on_event, cancel=cancel)
            spec = None
            if want_spectra:
                self.runner.say("per-head spectra of the full-precision model")
                spec = workspace.spectra(cfg, cancel=cancel)
            return outcome, outcome.reconstruction, spec

        self.runner.start(work, self._loaded, f"loading {cfg.model}")
        return self._finish(wait, lambda: self.reconstruction)

    def _loaded(self, value):
        outcome, recon, spec = value
        self.outcome, self.reconstruction = outcome, recon
        if spec is not None:
            self.spectra = spec
        heads = recon.heads
        self._busy = True
        try:
            self.block.options = sorted(int(b) for b in heads["block"].unique())
            self.head.options = sorted(int(h) for h in heads["head"].unique())
        finally:
            self._busy = False
        self._draw_heatmap()
        if len(heads):
            worst = heads.loc[heads[self.reading.value].idxmax()]
            self.select(int(worst["block"]), int(worst["head"]))

    def _draw_heatmap(self):
        if self.reconstruction is None:
            return
        method = "" if self.outcome is None else f", {self.outcome.method}"
        value = self.reading.value
        self.heatmap.show(attention_heatmap(self.reconstruction.heads, value,
                                            title=f"{HEATMAP} ({value}{method}); pick a cell"))

        def clicked(x, y):   # x is "h3", y the block
            self.select(int(y), int(str(x).lstrip("h")))
        self.heatmap.on_click(clicked)

    def select(self, block: int, head: int):
        """Show head ``head`` of block ``block``."""
        self._busy = True
        try:
            self.block.value = int(block)
            self.head.value = int(head)
        finally:
            self._busy = False
        self._pick()

    def _pick(self):
        if self._busy or self.reconstruction is None or self.block.value is None or self.head.value is None:
            return
        block, head = int(self.block.value), int(self.head.value)
        self.selected = (block, head)
        heads = self.reconstruction.heads
        rows = heads[heads["head"] == head].sort_values("block")
        self.detail.show(block_attention_figure(rows, values=("before_o", "after_o", "after_o_propagated"),
                                                title=f"Head {head} across blocks"))
        cell = heads[(heads["block"] == block) & (heads["head"] == head)]
        self.cell.value = f"<b>block {block}, head {head}</b>" + table_html(cell)
        if self.spectra is not None and len(self.spectra.head_eigenvalues):
            eig = self.spectra.head_eigenvalues
            mine = eig[(eig["head"] == head) & (eig["kind"] == "q")]
            self.head_spectrum.show(head_spectra_figure(mine, block, "q", factor="H_out",
                                                        title=f"Query H_out spectrum, block {block}, head {head}"))
