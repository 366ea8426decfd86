"""The workbench app: a Gradio Blocks page with Quantize, Compare and Inspect tabs.

``build_app`` makes the page (tests inject a tiny model and small starting values);
``main`` serves it on 127.0.0.1:7860 unless told otherwise, never shared publicly by default.
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
from pathlib import Path

import gradio as gr

from ..errors import WorkbenchError
from ..models.loading import DEFAULT_MODEL
from ..workspace import MODELS, SLOTS, ModelCache
from . import text
from .compare_tab import build_compare_tab
from .exposure import EXPOSURE, exposure_warnings, is_loopback, parse_auth
from .form import build_form
from .genie_tab import build_genie_tab
from .inspect_tab import build_inspect_tab
from .quantize_tab import build_quantize_tab
from .session import Session, close_session, files_root

log = logging.getLogger("workbench.ui")
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
DEFAULT_WORKSPACE = "workbench-runs"
CACHE_CLEANUP = (3600, 86400)     # Gradio's delete_cache: (how often, how old), seconds


def build_app(default_model: str | None = None, start: dict | None = None, method: str = "gptq",
              models: ModelCache | None = None, runs_dir: str | Path = DEFAULT_WORKSPACE,
              ray_address: str | None = None, plan_start: dict | None = None) -> gr.Blocks:
    """The page. ``start`` holds the form's starting values by setting name (over a quick look:
    ``form.APP_START``), ``plan_start`` the Mixed precision panel's (over ``config.PLAN_START``),
    ``default_model`` the model it opens on, ``method`` the Quantize tab's method,
    ``runs_dir`` the folder saved models go to, ``ray_address`` where Compare runs its methods as Ray
    tasks (``local`` for a cluster of this machine's cores; none: one after another in this process)."""
    start = dict(start or {})
    if default_model is not None:
        start["model"] = default_model
    models = models or MODELS
    # Gradio's own cache of served files: swept hourly of what is older than a day, and removed at exit
    with gr.Blocks(title="Quant Workbench", analytics_enabled=False, delete_cache=CACHE_CLEANUP) as demo:
        session = gr.State(Session, delete_callback=close_session)
        gr.Markdown(text.INTRO)
        form = build_form(start)
        with gr.Tabs(elem_id="wb-tabs"):
            with gr.Tab("Quantize", id="quantize", elem_id="wb-tab-quantize"):
                build_quantize_tab(form, session, models, method, Path(runs_dir).expanduser(), plan_start)
            with gr.Tab("Compare", id="compare", elem_id="wb-tab-compare"):
                build_compare_tab(form, session, models, ray_address)
            with gr.Tab("Inspect", id="inspect", elem_id="wb-tab-inspect") as inspect_tab:
                _, (refresh, inputs, outputs) = build_inspect_tab(form, session, models)
            with gr.Tab("Genie", id="genie", elem_id="wb-tab-genie"):
                build_genie_tab(session)
        inspect_tab.select(refresh, inputs, outputs, show_progress="hidden")
    demo.queue(default_concurrency_limit=4)
    return demo


def preload(model: str, models: ModelCache = MODELS) -> threading.Thread:
    """Load the default model in the background so the first Run does not wait for it."""
    def load():
        try:
            models.get(model)
        except Exception as exc:   # the Run button reports it properly; here it is only a warm-up
            log.warning("could not preload %s: %s", model, exc)
    t = threading.Thread(target=load, name="workbench-preload", daemon=True)
    t.start()
    return t


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="app.py", description="Quant Workbench app",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind; 0.0.0.0 exposes it on the network")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model the page opens on")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    p.add_argument("--workspace", default=DEFAULT_WORKSPACE, metavar="DIR",
                   help="folder the Quantize tab saves models into (one folder per save)")
    p.add_argument("--auth", default=os.environ.get("WORKBENCH_AUTH"), metavar="USER:PASSWORD",
                   help="require this login (Gradio auth); also read from $WORKBENCH_AUTH, which keeps the "
                        "password out of the process list")
    p.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                   help="with a non-loopback host or --share: folders the form's file paths (model, texts) may "
                        "lie under; repeatable (none: no file paths)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run Compare's four methods at once as Ray tasks: local (a cluster of this machine's cores) "
                        "or a running cluster's address; needs ray (the sweep extra)")
    p.add_argument("--no-preload", dest="preload", action="store_false", help="load the model on the first run")
    p.add_argument("--max-runs", type=int, default=SLOTS.limit,
                   help="runs at once across all pages (each copies the model); the others wait their turn")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.max_runs < 1:
        raise SystemExit(f"app.py: error: --max-runs must be at least 1, got {args.max_runs}")
    try:
        auth = parse_auth(args.auth) if args.auth else None
    except WorkbenchError as exc:
        raise SystemExit(f"app.py: error: {exc}") from None
    SLOTS.set_limit(args.max_runs)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    public = args.share or not is_loopback(args.host)
    # the model the operator serves the page on is theirs to name, wherever it lies
    own = [args.model] if Path(args.model).expanduser().is_dir() else []
    EXPOSURE.configure(public, [*args.allow_path, *own])
    for line in exposure_warnings(args.host, args.share, auth is not None, EXPOSURE.roots):
        log.warning(line)
    from ..models.loading import quiet_transformers
    quiet_transformers()
    if args.ray:
        try:
            from ..sweep import start_ray
            start_ray(args.ray)
        except WorkbenchError as exc:
            raise SystemExit(f"app.py: error: --ray: {exc}") from None
    demo = build_app(default_model=args.model, runs_dir=args.workspace, ray_address=args.ray)
    if args.preload:
        preload(args.model)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, allowed_paths=[str(files_root())],
                auth=auth,
                footer_links=["gradio"])
