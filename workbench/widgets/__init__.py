"""Jupyter widgets over the same engine and figures as the app.

Each widget is an ``ipywidgets.VBox`` to display, with a ``run(wait=True)`` for code and
``figure`` attributes (plotly) to read::

    from workbench.widgets import QuantizeWidget
    w = QuantizeWidget(model="smollm2-135m", method="gptq", bits=4)
    w                      # shows the form, Run/Cancel, progress and the live error curve
    w.run()                # or press Run
"""
from .attention import AttentionExplorer
from ..workspace import Outcome
from .common import LiveFigure, SettingsForm, fast_mode, forget_models, full_precision, genie_settings, \
    notebook_settings
from .compare import CompareWidget
from .generate import GenerateWidget
from .genie import GenieGallery
from .plan import PlanWidget
from .quantize import QuantizeWidget
from .spectra import SpectrumExplorer

__all__ = ["QuantizeWidget", "CompareWidget", "PlanWidget", "SpectrumExplorer", "AttentionExplorer", "GenieGallery",
           "GenerateWidget",
           "LiveFigure", "SettingsForm", "Outcome", "notebook_settings",
           "genie_settings", "fast_mode", "full_precision", "forget_models"]
