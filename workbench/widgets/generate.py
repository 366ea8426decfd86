"""Full precision against a quantized run on one prompt: both greedy continuations, where they part,
and both models' top-5 next tokens there."""
from __future__ import annotations

import html

import ipywidgets as W
import pandas as pd

from .. import tryit, workspace
from ..api import QuantizeResult
from ..errors import WorkbenchError
from ..figures.continuation import continuation_html, top_caption, top_frame
from ..figures.style import method_label
from ..generate import GENERATE_SETTINGS, GenerateConfig, GenerationDiff, generate_config
from ..workspace import Outcome
from .common import FACE, STYLE, RunWidget, table_html


class GenerateWidget(RunWidget):
    """The full-precision model and a run's quantized model continue the same prompt, greedily.

    ``source`` is a ``QuantizeResult`` (``workbench.quantize``, ``QuantizeWidget.result``), whose
    quantized model is at hand, or an ``Outcome`` (``CompareWidget.outcomes[m]``), whose model is
    rebuilt from its codes. The full-precision model is the cached one of the run's model::

        g = GenerateWidget(result, prompt="Once upon a time", tokens=40)
        diff = g.run()          # waits; g.run(wait=False) returns at once
        diff.first, g.top       # the first divergent token (None: never), the top-5 table

    ``texts`` shows both continuations (the tokens where they part highlighted), ``table`` the top-5
    next tokens of both at the first divergence, or at the last token when they never part.
    """

    run_label = "Generate"

    def __init__(self, source: QuantizeResult | Outcome, models: workspace.ModelCache | None = None, **settings):
        if not isinstance(source, (QuantizeResult, Outcome)):
            raise WorkbenchError(f"GenerateWidget takes a QuantizeResult (workbench.quantize, QuantizeWidget.result) "
                                 f"or an Outcome (CompareWidget.outcomes[method]), got {type(source).__name__}")
        self.source, self.models = source, models or workspace.MODELS
        start = generate_config(settings, FACE)
        s = GENERATE_SETTINGS
        self.prompt = W.Textarea(value=start.prompt, description=s["prompt"].label, style=STYLE,
                                 layout=W.Layout(width="720px", height="64px"))
        self.tokens = W.Text(value=str(start.tokens), description=s["tokens"].label, style=STYLE)
        self.chat = W.Checkbox(value=start.chat, description=s["chat"].label, style=STYLE)
        self._setup_runner()
        self.texts = W.HTML()
        self.table = W.HTML()
        self.diff: GenerationDiff | None = None
        self.top: pd.DataFrame | None = None
        super().__init__([self.prompt, W.HBox([self.tokens, self.chat]), self.buttons(), self.runner.status,
                          self.texts, self.table])

    @property
    def model_name(self) -> str:
        return self.source.config.model if isinstance(self.source, Outcome) else self.source.report.model

    @property
    def label(self) -> str:
        if isinstance(self.source, Outcome):
            c = self.source.config
            method, bits, group = c.method, c.bits, c.group_size
        else:
            r = self.source.report
            method, bits, group = r.method, r.config.get("bits"), r.config.get("group_size")
        return f"{method_label(method)} w{bits} g{group}"

    def config(self) -> GenerateConfig:
        """The fields as a checked config (messages name the fields)."""
        return generate_config({"prompt": self.prompt.value, "tokens": self.tokens.value, "chat": self.chat.value},
                               FACE)

    def set(self, **settings):
        """Set fields by name (``prompt``, ``tokens``, ``chat``); the values are checked first."""
        gen = generate_config({"prompt": self.prompt.value, "tokens": self.tokens.value, "chat": self.chat.value,
                               **settings}, FACE)
        self.prompt.value, self.tokens.value, self.chat.value = gen.prompt, str(gen.tokens), gen.chat

    def run(self, wait: bool = True, **settings) -> GenerationDiff | None:
        """Both models continue the prompt (``settings`` set the fields first)."""
        self.runner.check_idle()
        if settings:
            self.set(**settings)
        gen = self.config()
        source, models = self.source, self.models

        def work(cancel):
            if isinstance(source, Outcome):
                return tryit.try_outcome(source, gen, models=models, cancel=cancel, face=FACE)
            return tryit.try_result(source, gen, models=models, cancel=cancel, face=FACE)

        self.runner.start(work, self._finished, f"generating {gen.tokens} tokens with full precision and {self.label}")
        return self._finish(wait, lambda: self.diff)

    def _finished(self, d: GenerationDiff):
        tokenizer = self.models.get(self.model_name).tokenizer
        self.diff, self.top = d, top_frame(tokenizer, d, self.label)
        self.texts.value = continuation_html(tokenizer, d, self.label)
        self.table.value = f"<b>{html.escape(top_caption(d))}</b>" + table_html(self.top)
