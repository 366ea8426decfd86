"""The shared settings form, derived from the settings' declarations; every tab reads it.

Model, data and grid sit in rows above the tabs, the rest of the run's settings in "More
settings"; the solver and learned-rounding fields are created here and placed by the Quantize
tab, shown for the methods they apply to. A handler turns the form's values into a method's
config with ``Form.config`` (the one validation, messages naming the field labels).
"""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ..config import DEFAULTS, QUICK_LOOK, SETTINGS, QuantizeConfig, for_method
from ..settings import METHOD_DEFAULT, Setting
from .exposure import EXPOSURE

FACE = "app"
APP_START = QUICK_LOOK      # every value can be changed in the form
ROWS = (("model", "data"), ("grid",), ("activations",))     # the rows above the tabs; "run" goes into More settings
METHOD_GROUPS = ("solver", "learned")    # placed by the Quantize tab


def elem_id(name: str) -> str:
    return "wb-" + name.replace("_", "-")


def component(s: Setting, value, render: bool = True, **layout):
    """The Gradio input for one setting, showing ``value``; ``layout``: Gradio's own (``scale``...)."""
    shown = s.form_value(value)
    kw = dict(label=s.label, info=s.help, elem_id=elem_id(s.name), render=render, **layout)
    if s.kind is bool and s.optional:
        return gr.Dropdown([METHOD_DEFAULT, "on", "off"], value=shown, **kw)
    if s.kind is bool:
        return gr.Checkbox(value=bool(value), **kw)
    if s.choices:
        return gr.Dropdown(([METHOD_DEFAULT] if s.optional else []) + list(s.choices), value=shown, **kw)
    if s.slider:
        return gr.Slider(s.low, s.high, value=shown, step=s.step, **kw)
    if s.suggestions:
        options = list(dict.fromkeys([shown, *s.suggestions]))
        return gr.Dropdown(options, value=shown, allow_custom_value=True, **kw)
    if s.kind in (int, float) and shown is not None:
        return gr.Number(shown, precision=0 if s.kind is int else None, **kw)
    # a number left to the method: a text box, since an emptied number box sends 0, not "empty"
    return gr.Textbox(value="" if shown is None else shown, placeholder=s.none_means, **kw)


@dataclass
class Form:
    fields: dict                    # setting name -> component, in the order of ``inputs()``

    def inputs(self) -> list:
        return list(self.fields.values())

    def values(self, raw) -> dict:
        return dict(zip(self.fields, raw))

    def config(self, raw, method: str) -> QuantizeConfig:
        """The form's values as ``method``'s config; raises ``WorkbenchError`` naming the field."""
        return EXPOSURE.check(for_method(self.values(raw), method, FACE), FACE)

    def method_fields(self) -> dict:
        """The fields that apply to some methods only, with those methods."""
        return {name: (c, SETTINGS[name].methods) for name, c in self.fields.items()
                if SETTINGS[name].methods is not None}

    def visibility(self, method: str) -> list:
        """Updates showing the method-specific fields of ``method``, in ``method_fields()`` order."""
        return [gr.update(visible=method in methods) for _, methods in self.method_fields().values()]


def build_form(start: dict | None = None) -> Form:
    """The shared rows and More settings; the method-specific fields are made unrendered."""
    values = {**DEFAULTS, **APP_START, **(start or {})}
    app = {name: s for name, s in SETTINGS.items() if FACE in s.faces}
    fields = {}
    for groups in ROWS:
        with gr.Row(equal_height=True):
            for name, s in app.items():
                if s.group in groups and s.methods is None:
                    fields[name] = component(s, values[name])
    with gr.Accordion("More settings", open=False, elem_id="wb-more"):
        with gr.Row(equal_height=True):
            for name, s in app.items():
                if name not in fields and s.group not in METHOD_GROUPS and s.methods is None:
                    fields[name] = component(s, values[name])
    for name, s in app.items():
        if name not in fields:
            fields[name] = component(s, values[name], render=False)
    return Form(fields)


def method_rows(form: Form, method: str):
    """Render the method-specific fields as rows by section (inside the Quantize tab)."""
    for group in METHOD_GROUPS:
        with gr.Row(equal_height=True):
            for name, (c, methods) in form.method_fields().items():
                if SETTINGS[name].group == group:
                    c.visible = method in methods
                    c.render()
    # fields of other sections that apply to some methods only (e.g. the measure batches)
    rest = [(c, m) for name, (c, m) in form.method_fields().items() if SETTINGS[name].group not in METHOD_GROUPS]
    if rest:
        with gr.Row(equal_height=True):
            for c, methods in rest:
                c.visible = method in methods
                c.render()
