"""Command-line flags derived from the settings' declarations (``workbench.config``).

Each flag takes text, and the one validation turns it into a value or a one-line error that
names the flag (the CLI exits with status 2).
"""
from __future__ import annotations

import argparse

from .config import DEFAULTS, SETTINGS, build_config
from .settings import GROUPS

SECTIONS = {"model": "model and data", "data": "model and data", "grid": "grid and scope",
            "mixed": "mixed precision (a width per layer)",
            "activations": "activations and rotation (weight-activation quantization)", "run": "run",
            "solver": "solver (GPTQ / BoA / TurboBoA; empty: the method's default)",
            "learned": "aespa / BRECQ (learned rounding)"}


def add_setting_flags(parser: argparse.ArgumentParser, defaults: dict | None = None, skip=()) -> None:
    """One flag per declared setting; ``defaults`` replace the declared defaults in this command."""
    defaults = {**DEFAULTS, **(defaults or {})}
    sections = {}
    for group in GROUPS:
        title = SECTIONS[group]
        if title not in sections:
            sections[title] = parser.add_argument_group(title)
    for name, s in SETTINGS.items():
        if "cli" not in s.faces or name in skip:
            continue
        target = sections[SECTIONS[s.group]]
        shown = defaults[name]
        if shown is None:
            default_text = s.none_means if s.optional else "none"
        else:
            default_text = (",".join(shown) or "none") if s.kind is tuple else shown
        # per-method defaults are listed in the help itself
        help_text = s.help if "default" in s.help and shown is None else f"{s.help} (default: {default_text})"
        if s.kind is bool and s.optional:
            target.add_argument(s.flag, dest=name, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        elif s.kind is bool:
            target.add_argument(s.flag, dest=name, default=None, action="store_const", const=True, help=help_text)
        else:
            metavar = s.metavar or ("{" + ",".join(map(str, s.choices)) + "}" if s.choices else
                                    ("PATTERNS" if s.kind is tuple else name.upper()))
            target.add_argument(s.flag, dest=name, default=None, metavar=metavar, help=help_text)
    parser.set_defaults(_setting_defaults=defaults)


def config_from_args(args, face: str = "cli"):
    """The flags given, over this command's defaults, through the one validation."""
    values = dict(args._setting_defaults)
    values.update({k: v for k, v in vars(args).items() if k in SETTINGS and v is not None})
    return build_config({k: v for k, v in values.items() if k in SETTINGS}, face)


