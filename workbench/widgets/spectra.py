"""Hessian spectrum explorer: pick a layer, see its H_in spectrum and the per-head factors."""
from __future__ import annotations

import ipywidgets as W

from .. import workspace
from ..diagnostics import Spectra
from ..figures import condition_heatmap, empty_figure, head_spectra_figure, spectrum_figure
from .common import LiveFigure, RunWidget, SettingsForm, shown_figure

FACTORS = (("q: H_out per query head", "q"), ("k: H_out per KV head", "k"), ("v: H_in per KV head", "v"))
SUMMARIES = (("condition number", "condition"), ("condition (damped)", "condition_damped"),
             ("effective rank", "effective_rank"), ("top-1% share", "top1_share"))


class SpectrumExplorer(RunWidget):
    """``run()`` accumulates the Hessians of the full-precision model (as the engine would on
    the same calibration windows); ``select(layer, factor)`` then shows that layer's ``H_in``
    spectrum (``figure``) and the per-head spectra of its block's q/k ``H_out`` or v ``H_in``
    (``heads_figure``). ``condition_figure`` maps a spectrum summary over blocks x kinds.
    ``spectra`` holds the frames (``workbench.diagnostics.Spectra``).
    """

    run_label = "Compute spectra"

    def __init__(self, spectra: Spectra | None = None, use_figure_widget: bool | None = None, **settings):
        self.form = SettingsForm(methods=False, **settings)
        self._setup_runner()
        self.layer = W.Dropdown(options=[], description="layer", layout=W.Layout(width="460px"))
        self.factor = W.ToggleButtons(options=FACTORS, value="q", description="per head")
        self.normalize = W.Checkbox(value=False, description="divide by the largest eigenvalue")
        self.summary_pick = W.Dropdown(options=SUMMARIES, value="condition", description="summary")
        self.spectrum = LiveFigure(empty_figure("H_in spectrum", "press Compute spectra"), use_figure_widget)
        self.heads = LiveFigure(empty_figure("Per-head spectra", "press Compute spectra"), use_figure_widget)
        self.condition = LiveFigure(empty_figure("Condition number across layers", "press Compute spectra"),
                                    use_figure_widget)
        self.spectra: Spectra | None = None
        for w in (self.layer, self.factor, self.normalize):
            w.observe(lambda _: self._draw_layer(), names="value")
        self.summary_pick.observe(lambda _: self._draw_condition(), names="value")
        super().__init__([self.form, self.buttons(), self.runner.status, W.HBox([self.layer, self.normalize]), self.factor,
                          W.HBox([self.spectrum.widget, self.heads.widget]), self.summary_pick,
                          self.condition.widget])
        if spectra is not None:
            self._loaded(spectra)

    figure = shown_figure("spectrum")
    heads_figure = shown_figure("heads")
    condition_figure = shown_figure("condition")

    @property
    def layers(self) -> list[str]:
        return list(self.layer.options)

    def run(self, wait: bool = True, **settings) -> Spectra | None:
        self.runner.check_idle()
        if settings:
            self.form.set(**settings)
        cfg = self.form.config("gptq")

        def on_event(ev):
            if ev.kind == "phase":
                self.runner.say(ev.message)
            elif ev.kind == "progress":     # the embedded model's conversion on first use
                self.runner.show_phase(ev)
            else:
                self.runner.set_progress(ev.index, ev.total)
                self.runner.say(f"block {ev.index}/{ev.total}")

        self.runner.start(lambda cancel: workspace.spectra(cfg, on_event=on_event, cancel=cancel), self._loaded,
                          f"loading {cfg.model} and accumulating Hessians")
        return self._finish(wait, lambda: self.spectra)

    def _loaded(self, spectra: Spectra):
        self.spectra = spectra
        names = spectra.layers["name"].tolist()
        self.layer.options = names
        if names:
            self.layer.value = names[0]
        self._draw_layer()
        self._draw_condition()

    def select(self, layer: str | None = None, factor: str | None = None, normalize: bool | None = None):
        """Show ``layer`` (a module name, or ``block.kind`` like ``"1.q"``) and the chosen factor."""
        if layer is not None:
            self.layer.value = self._resolve(layer)
        if factor is not None:
            self.factor.value = factor
        if normalize is not None:
            self.normalize.value = normalize
        self._draw_layer()

    def _resolve(self, layer: str) -> str:
        if layer in self.layer.options:
            return layer
        rows = self.spectra.layers
        if "." in layer:
            b, kind = layer.split(".", 1)
            if b.isdigit():
                hit = rows[(rows["block"] == int(b)) & (rows["kind"] == kind)]
                if len(hit):
                    return hit["name"].iloc[0]
        raise ValueError(f"no layer {layer!r}; choose one of {', '.join(self.layer.options)}")

    def _draw_layer(self):
        if self.spectra is None or not self.layer.value:
            return
        name = self.layer.value
        rows = self.spectra.layers[self.spectra.layers["name"] == name]
        block = int(rows["block"].iloc[0])
        self.spectrum.show(spectrum_figure(self.spectra.layer_eigenvalues, [name], normalize=self.normalize.value,
                                           title=f"H_in spectrum, {name}"))
        kind = self.factor.value
        factor = "H_in" if kind == "v" else "H_out"
        self.heads.show(head_spectra_figure(self.spectra.head_eigenvalues, block, kind, factor=factor))

    def _draw_condition(self):
        if self.spectra is None:
            return
        value = self.summary_pick.value
        label = dict((v, k) for k, v in SUMMARIES)[value]
        self.condition.show(condition_heatmap(self.spectra.layers, value, title=f"{label} of H_in across layers"))
