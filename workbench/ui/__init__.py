"""The Gradio app over the engine, the diagnostics and the figures."""
from .app import build_app, main
from .settings import AppDefaults
from .tabs import register_tab

__all__ = ["build_app", "main", "AppDefaults", "register_tab"]
