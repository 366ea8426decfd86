"""The Gradio app over the workspace and the figures: layout and wiring only."""
from .app import build_app, main

__all__ = ["build_app", "main"]
