"""Try it: the full-precision model and the quantized one continue the same prompt.

Under the Quantize tab's results, the last run against full precision: both texts, the tokens where
they part marked, and both models' top-5 next tokens at the first divergence. Under Compare, the same
prompt for every method of the latest comparison, one text per method below the full-precision one.
"""
from __future__ import annotations

import time

import gradio as gr

from .. import tryit, workspace
from ..errors import WorkbenchError
from ..figures.continuation import comparison_html, continuation_html, top_caption, top_frame
from ..figures.style import method_label
from ..generate import DEFAULT_PROMPT, GENERATE_SETTINGS, GenerateConfig, generate_config
from .form import FACE
from .views import error_text, message_html

GREEDY = """one token at a time, always taking the token it finds most likely (greedy decoding), as plain text
unless you tick *As a chat message*. Until two texts part the models have read the same words, so the **first
divergence** is where the bits first changed the model's mind; later differences follow from that one."""
EXPLAIN = f"""The full-precision and the quantized model each continue the prompt {GREEDY} The table shows
how close the call was there in each model."""
EXPLAIN_COMPARE = f"""Full precision and each method of the comparison continue the prompt {GREEDY}"""


def _inputs(prefix: str):
    """Prompt, Tokens, As a chat message and Generate, labelled from the settings' declarations."""
    s, start = GENERATE_SETTINGS, GenerateConfig()
    with gr.Row(equal_height=True):
        prompt = gr.Textbox(value=DEFAULT_PROMPT, label=s["prompt"].label, info=s["prompt"].help, lines=2,
                            elem_id=f"{prefix}-prompt", scale=4)
        tokens = gr.Number(start.tokens, precision=0, label=s["tokens"].label, info=s["tokens"].help,
                           elem_id=f"{prefix}-tokens", scale=1)
        chat = gr.Checkbox(start.chat, label=s["chat"].label, info=s["chat"].help, elem_id=f"{prefix}-chat",
                           scale=1)
        button = gr.Button("Generate", elem_id=f"{prefix}-run", scale=1)
    return prompt, tokens, chat, button


def _config(prompt, tokens, chat) -> GenerateConfig:
    return generate_config({"prompt": prompt, "tokens": tokens, "chat": chat}, FACE)


def run_label(outcome) -> str:
    return f"{method_label(outcome.method)} {outcome.report.width} g{outcome.config.group_size}"


# -- Quantize ---------------------------------------------------------------------------------

def build_try_panel(session: gr.State, models: workspace.ModelCache):
    """The last Quantize run against full precision."""
    with gr.Accordion("Try it: the same prompt, full precision and quantized", open=True, elem_id="wb-try-panel"):
        gr.Markdown(EXPLAIN)
        prompt, tokens, chat, button = _inputs("wb-try")
        status = gr.HTML(elem_id="wb-try-status")
        texts = gr.HTML(elem_id="wb-try-texts")
        top = gr.Dataframe(label="Top-5 next tokens", elem_id="wb-try-top", interactive=False, visible=False)

    def on_generate(sess, p, n, c):
        yield from generate_quantized(sess, models, p, n, c)

    button.click(on_generate, [session, prompt, tokens, chat], [status, texts, top], show_progress="hidden")


def generate_quantized(sess, models: workspace.ModelCache, prompt, tokens, chat):
    """The Generate handler of the Quantize tab: status, the two texts, the top-5 table."""
    hidden = gr.update(visible=False)
    yield message_html("starting...", "info"), gr.update(), gr.update()   # a fresh status for every press
    outcome = sess.last_quantize
    if outcome is None:
        yield message_html("nothing to try yet: run a quantization first (press Run above)", "error"), "", hidden
        return
    try:
        gen = _config(prompt, tokens, chat)
    except WorkbenchError as exc:
        yield message_html(str(exc), "error"), gr.update(), hidden
        return
    label = run_label(outcome)
    yield message_html(f"generating {gen.tokens} tokens with full precision and {label}...", "info"), gr.update(), \
        gr.update()
    started = time.perf_counter()
    try:
        d = tryit.try_outcome(outcome, gen, models=models, face=FACE)
    except Exception as exc:     # shown in the page, without a trace or a path
        yield message_html(error_text(exc), "error"), "", hidden
        return
    tokenizer = models.get(outcome.config.model).tokenizer
    note = f"generated up to {gen.tokens} tokens with each model in {time.perf_counter() - started:.1f} s"
    yield (message_html(note, "ok"), continuation_html(tokenizer, d, label),
           gr.update(value=top_frame(tokenizer, d, label), label=top_caption(d), visible=True))


# -- Compare ----------------------------------------------------------------------------------

def build_compare_try_panel(session: gr.State, models: workspace.ModelCache):
    """Every method of the latest comparison, and full precision, on one prompt."""
    with gr.Accordion("Try it: every method continues the same prompt", open=True, elem_id="wb-c-try-panel"):
        gr.Markdown(EXPLAIN_COMPARE)
        prompt, tokens, chat, button = _inputs("wb-c-try")
        status = gr.HTML(elem_id="wb-c-try-status")
        texts = gr.HTML(elem_id="wb-c-try-texts")

    def on_generate(sess, p, n, c):
        yield from generate_compared(sess, models, p, n, c)

    button.click(on_generate, [session, prompt, tokens, chat], [status, texts], show_progress="hidden")


def generate_compared(sess, models: workspace.ModelCache, prompt, tokens, chat):
    yield message_html("starting...", "info"), gr.update()
    outcomes = list(sess.last_compare)
    if not outcomes:
        yield message_html("nothing to try yet: run a comparison first (press Run all four methods above)",
                           "error"), ""
        return
    try:
        gen = _config(prompt, tokens, chat)
    except WorkbenchError as exc:
        yield message_html(str(exc), "error"), gr.update()
        return
    kept = [o for o in outcomes if o.packed is not None]
    gone = [run_label(o) for o in outcomes if o.packed is None]
    if not kept:
        yield message_html("the comparison's quantized weights are no longer kept; run it again to try it",
                           "error"), ""
        return
    yield message_html(f"generating {gen.tokens} tokens with full precision and "
                       f"{', '.join(run_label(o) for o in kept)}...", "info"), gr.update()
    started = time.perf_counter()
    try:
        diffs = tryit.try_outcomes(kept, gen, models=models, face=FACE)
    except Exception as exc:
        yield message_html(error_text(exc), "error"), ""
        return
    tokenizer = models.get(kept[0].config.model).tokenizer
    labels = {o.name: run_label(o) for o in kept}
    parts = [f"{labels[m]} {'never parts' if d.first is None else f'parts at token {d.first + 1}'}"
             for m, d in diffs.items()]
    note = f"from full precision: {', '.join(parts)} ({time.perf_counter() - started:.1f} s)"
    if gone:
        note += f"; {', '.join(gone)} no longer kept their weights (run the comparison again)"
    yield message_html(note, "ok" if not gone else "warn"), comparison_html(tokenizer, diffs, labels)
