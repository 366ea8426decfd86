"""The hook for tabs built elsewhere: ``register_tab(title, builder)``.

A builder is called inside an open ``gr.Tab(title)`` of ``build_app`` and creates that tab's
components and events itself. ``workbench.figures.genie`` may offer one as ``app_tab``
(title, builder); it is picked up when present.
"""
from __future__ import annotations

import importlib
import logging
from typing import Callable

ExtraTab = tuple[str, Callable[[], None]]
EXTRA_TABS: list[ExtraTab] = []
DISCOVER = ("workbench.figures.genie",)


def register_tab(title: str, builder: Callable[[], None]):
    EXTRA_TABS.append((title, builder))


def discovered_tabs() -> list[ExtraTab]:
    """Registered tabs plus the ``app_tab`` of the modules in ``DISCOVER`` that define one."""
    tabs = list(EXTRA_TABS)
    for name in DISCOVER:
        try:
            module = importlib.import_module(name)
        except Exception:   # an optional part that fails to import must not take the app down
            logging.getLogger("workbench.ui").warning("could not import %s for its app tab", name, exc_info=True)
            continue
        tab = getattr(module, "app_tab", None)
        if tab is not None and tab not in tabs:
            tabs.append(tuple(tab))
    return tabs
