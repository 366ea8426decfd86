"""The shared settings form: model, data, grid and scope. Every tab reads it."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ..models.loading import EMBEDDED
from .settings import AppDefaults


@dataclass
class Form:
    model: gr.Dropdown
    calib: gr.Dropdown
    calib_samples: gr.Number
    seqlen: gr.Number
    eval_windows: gr.Number
    bits: gr.Slider
    group_size: gr.Dropdown
    max_blocks: gr.Number
    device: gr.Dropdown
    rows_per_step: gr.Number
    dx_alpha: gr.Slider
    refine_iters: gr.Number
    iters: gr.Number
    lr: gr.Number
    init: gr.Radio

    def inputs(self) -> list:
        """In the argument order of ``settings.make_settings``."""
        return [self.model, self.calib, self.calib_samples, self.seqlen, self.eval_windows, self.bits,
                self.group_size, self.max_blocks, self.device, self.rows_per_step, self.dx_alpha,
                self.refine_iters, self.iters, self.lr, self.init]


def build_form(d: AppDefaults) -> Form:
    """The shared row; the TurboBoA and learned-rounding options are created here and placed by the Quantize tab."""
    models = list(dict.fromkeys([d.model, *EMBEDDED]))
    with gr.Row(equal_height=True):
        model = gr.Dropdown(models, value=d.model, allow_custom_value=True, scale=3, elem_id="wb-model",
                            label="Model", info="embedded name, local checkpoint directory or hub id")
        calib = gr.Dropdown(["wikitext2"], value=d.calib, allow_custom_value=True, scale=2, elem_id="wb-calib",
                            label="Calibration text", info="wikitext2, a text file or hf:NAME[:CONFIG[:SPLIT]]")
        calib_samples = gr.Number(d.calib_samples, precision=0, label="Calibration samples", elem_id="wb-samples",
                                  info="windows drawn")
        seqlen = gr.Number(d.seqlen, precision=0, label="Sequence length", elem_id="wb-seqlen", info="tokens")
    with gr.Row(equal_height=True):
        bits = gr.Slider(2, 8, value=d.bits, step=1, label="Bits", elem_id="wb-bits")
        group_size = gr.Dropdown([-1, 32, 64, 128], value=d.group_size, allow_custom_value=True,
                                 label="Group size", info="-1: one grid per row", elem_id="wb-group")
        max_blocks = gr.Number(d.max_blocks, precision=0, label="Max blocks", info="0: all blocks",
                               elem_id="wb-max-blocks")
        eval_windows = gr.Number(d.eval_windows, precision=0, label="Evaluation windows",
                                 info="held-out windows for perplexity (0 all, -1 skip)", elem_id="wb-eval")
        device = gr.Dropdown(["auto", "cpu", "cuda"], value=d.device, allow_custom_value=True, label="Device",
                             elem_id="wb-device")
    rows = gr.Number(d.rows_per_step, precision=0, label="Rows per step", info="rows of every head quantized together",
                     render=False, elem_id="wb-rows")
    alpha = gr.Slider(0, 1, value=d.dx_alpha, step=0.05, label="dx alpha",
                      info="correction for errors inherited from earlier layers", render=False, elem_id="wb-alpha")
    refine = gr.Number(d.refine_iters, precision=0, label="Refine iterations", info="scale refinement sweeps",
                       render=False, elem_id="wb-refine")
    iters = gr.Number(d.iters, precision=0, label="Rounding steps", render=False, elem_id="wb-iters",
                      info="Adam steps per layer (aespa) or per block (BRECQ)")
    lr = gr.Number(d.lr, label="Learning rate", info="Adam on the rounding variables", render=False, elem_id="wb-lr")
    init = gr.Radio([("GPTQ", "gptq"), ("BoA", "boa"), ("RTN", "rtn")], value=d.init, label="Start from",
                    info="aespa: the rounding it learns from", render=False, elem_id="wb-init",
                    visible=d.method != "brecq")
    return Form(model, calib, calib_samples, seqlen, eval_windows, bits, group_size, max_blocks, device,
                rows, alpha, refine, iters, lr, init)
