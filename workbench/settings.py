"""How a setting is declared once and read the same way by every face.

A ``Setting`` is a dataclass field's metadata (see ``workbench.config.QuantizeConfig``): its
type, default, range or choices, help text, form label and the methods it applies to. The
command line's flags, the app's form, the widgets' form and the one validation below are all
derived from these declarations, so a new option is one declaration plus its use.

Faces name a setting their own way in messages (``--calib-samples`` on the command line and in
the API, "Calibration samples" in the app and the widgets) and say the same thing after it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from .errors import WorkbenchError

FACES = ("cli", "api", "app", "widgets")
FORM_FACES = ("app", "widgets")
GROUPS = ("model", "data", "grid", "mixed", "activations", "run", "solver", "learned")   # form sections, in order
TRUE, FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")
METHOD_DEFAULT = "method default"      # what an optional choice shows for None in a form


@dataclass(frozen=True)
class Setting:
    kind: type                       # int, float, str, bool, or tuple (a list of strings)
    label: str                       # the field's name in the forms
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()              # the only values allowed
    suggestions: tuple = ()          # values a form offers, others allowed too
    methods: tuple[str, ...] | None = None   # the methods it applies to (None: every method)
    optional: bool = False           # None allowed: the method's default, or what ``none_means`` says
    none_means: str = "the method's default"
    form_none: Any = None            # the form value that stands for None (e.g. 0 blocks = all)
    group: str = "run"               # the form section
    slider: bool = False             # a slider in the forms (bounded numbers)
    step: float | None = None        # slider step
    check: Callable[[Any], str | None] | None = None   # a further rule: the complaint, or None
    faces: tuple[str, ...] = FACES   # where it can be set
    metavar: str = ""                # what the command line's help shows for the value (default: from the kind)
    name: str = ""                   # the field's name, filled in by ``settings_of``

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def who(self, face: str) -> str:
        """How ``face`` names this setting in a message."""
        return self.label if face in FORM_FACES else self.flag

    def applies_to(self, method: str) -> bool:
        return self.methods is None or method in self.methods

    def parse(self, raw, face: str = "api"):
        """``raw`` (a typed value, or text from a form or the command line) as the setting's value.

        Raises ``WorkbenchError`` naming the setting the way ``face`` does, the problem and the fix.
        """
        who = self.who(face)
        if isinstance(raw, str):
            raw = raw.strip()
        if raw is None or raw == "" or (self.optional and raw == METHOD_DEFAULT) \
                or (self.form_none is not None and _same(raw, self.form_none)):
            if self.optional:
                return None
            if self.kind in (int, float):
                return _fail(who, f"is empty; enter a {'whole ' if self.kind is int else ''}number")
            if self.kind is tuple:
                return ()
            return _fail(who, f"is empty; give {self.help}")
        value = {int: _whole, float: _number, bool: _boolean, str: _text, tuple: _patterns}[self.kind](who, raw)
        if self.choices and value not in self.choices:
            lowered = value.lower() if isinstance(value, str) else value
            if lowered not in self.choices:
                return _fail(who, f"must be one of {', '.join(map(str, self.choices))}, got {_show(raw)}")
            value = lowered
        if self.low is not None and self.high is not None and self.kind is float and not self.low <= value <= self.high:
            return _fail(who, f"must be between {self.low} and {self.high}, got {value}")
        if self.low is not None and value < self.low:
            return _fail(who, f"must be at least {self.low}, got {value}")
        if self.high is not None and value > self.high:
            return _fail(who, f"must be at most {self.high}, got {value}")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                return _fail(who, problem)
        return value

    def form_value(self, value):
        """What a form shows for ``value`` (the inverse of ``parse`` for None)."""
        if value is None:
            if self.form_none is not None:
                return self.form_none
            return METHOD_DEFAULT if self.choices or self.kind is bool else None
        if self.kind is tuple:
            return ", ".join(value)
        if self.kind is bool and self.optional:
            return "on" if value else "off"
        return value


def setting(default, kind: type, label: str, help: str, **kw):
    """A dataclass field declared with its ``Setting``."""
    return dataclasses.field(default=default, metadata={"setting": Setting(kind, label, help, **kw)})


def settings_of(cls) -> dict[str, Setting]:
    """The declared settings of a config dataclass, by field name, in declaration order."""
    return {f.name: dataclasses.replace(f.metadata["setting"], name=f.name)
            for f in dataclasses.fields(cls) if "setting" in f.metadata}


def defaults_of(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if "setting" in f.metadata}


def _show(raw) -> str:
    """A bad value as a message shows it: a number as typed (2.5 from a form or "2.5" from a flag
    read alike), anything else quoted."""
    if isinstance(raw, str):
        try:
            float(raw)
            return raw
        except ValueError:
            return repr(raw)
    return repr(raw)


def _fail(who: str, problem: str):
    raise WorkbenchError(f"{who} {problem}")


def _same(raw, form_none) -> bool:
    try:
        return float(raw) == float(form_none)
    except (TypeError, ValueError):
        return raw == form_none


def _whole(who: str, raw) -> int:
    if isinstance(raw, bool):
        return _fail(who, f"must be a whole number, got {_show(raw)}")
    if isinstance(raw, int):
        return raw
    try:
        f = float(raw)
    except (TypeError, ValueError):
        return _fail(who, f"must be a whole number, got {_show(raw)}")
    if not math.isfinite(f) or f != int(f):
        return _fail(who, f"must be a whole number, got {_show(raw)}")
    return int(f)


def _number(who: str, raw) -> float:
    if isinstance(raw, bool):
        return _fail(who, f"must be a number, got {_show(raw)}")
    try:
        v = float(raw)
    except (TypeError, ValueError):
        return _fail(who, f"must be a number, got {_show(raw)}")
    if not math.isfinite(v):
        return _fail(who, f"must be a finite number, got {_show(raw)}")
    return v


def _boolean(who: str, raw) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    return _fail(who, f"must be on or off, got {_show(raw)}")


def _text(who: str, raw) -> str:
    if not isinstance(raw, str):
        return _fail(who, f"must be text, got {_show(raw)}")
    return raw


def _patterns(who: str, raw) -> tuple[str, ...]:
    """Comma-separated text, or a list of strings, as a tuple of non-empty strings."""
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    # whole numbers read as their text: a list of widths (2, 3, 4) from the API
    items = [str(p) if isinstance(p, int) and not isinstance(p, bool) else p for p in items]
    if not all(isinstance(p, str) for p in items):
        return _fail(who, f"must be text patterns, got {_show(raw)}")
    return tuple(p.strip() for p in items if p.strip())

