"""Write the workbench notebooks (no outputs): ``python notebooks/build.py``.

The notebooks are generated so that they stay reproducible and reviewable as code. Every
notebook reads its settings from ``workbench.widgets.notebook_settings()``: the embedded model
with modest settings, or with ``WORKBENCH_FAST=1`` tiny runs (4 calibration windows of 64
tokens, 2 blocks, 2 evaluation windows) on ``WORKBENCH_NOTEBOOK_MODEL`` when it is set.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from workbench.config import QUICK_LOOK

HERE = Path(__file__).resolve().parent

SETUP = """\
import pandas as pd
import workbench
from workbench.widgets import notebook_settings, fast_mode

S = notebook_settings()    # model, calib_samples, seqlen, max_blocks, eval_windows
print("fast mode" if fast_mode() else "normal mode", S)"""

Q = QUICK_LOOK
SETTINGS_NOTE = f"""\
**Settings.** The first code cell reads `notebook_settings()`: the embedded SmolLM2-135M with
{Q["calib_samples"]} calibration windows of {Q["seqlen"]} tokens, the first {Q["max_blocks"]} blocks and
{Q["eval_windows"]} evaluation windows (the app's quick look). Set
`WORKBENCH_FAST=1` before starting Jupyter for tiny runs (4 windows of 64 tokens, 2 blocks, 2
evaluation windows), and `WORKBENCH_NOTEBOOK_MODEL=/path/to/checkpoint` to use another model.
Change `S` in the cell to quantize more (e.g. `S["max_blocks"] = None` for every block)."""


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


def quickstart():
    return [
        md("""
# 01 · Quickstart: quantize the embedded model and read the report

Post-training quantization (PTQ) turns a trained model's float weights into a few bits per weight
(here 4) without retraining. Each linear layer gets a grid (a scale and zero point per group of
`group_size` input columns), and a solver picks the grid point of every weight.

**RTN** rounds each weight to the nearest point. **GPTQ** rounds one column at a time and moves
the not-yet-rounded columns to cancel the error it just made, weighted by `H_in = X Xᵀ`, the
second moment of the layer's inputs on a few calibration windows. Blocks are quantized in order,
each calibrated on the outputs of the already-quantized blocks before it.
"""),
        md(SETTINGS_NOTE),
        code(SETUP),
        md("""
## One call

`workbench.quantize` is the function the command line and the app call. It returns the quantized
model and a report: perplexity before and after on WikiText-2 held-out text, timings, and one
record per linear layer.
"""),
        code("""
result = workbench.quantize(method="gptq", bits=4, group_size=64, **S)
report = result.report
print(f"perplexity {report.ppl_fp:.2f} -> {report.ppl_quant:.2f} "
      f"({100 * (report.ppl_quant / report.ppl_fp - 1):+.1f}%), quantization {report.quant_seconds:.1f} s")"""),
        md("""
## The report as a table

`rel_error` is `‖ŴX − WX‖² / ‖WX‖²` on the layer's calibration inputs; `loss` is the solver's own
objective; q/k/v rows also carry `attn_rel_error`, the error of the attention output with only
that projection quantized.
"""),
        code("""
df = report.to_frame()
df.sort_values("rel_error", ascending=False).head(8)"""),
        code("""
{k: report.config[k] for k in ("model", "method", "bits", "group_size", "calib_samples", "seqlen", "max_blocks")}"""),
        md("""
## The app's figures

`workbench.figures` holds the plotly figures the app draws, as functions of these frames.
"""),
        code("""
from workbench.figures import kind_error_figure, layer_error_figure

layer_error_figure(df.assign(method="gptq"))"""),
        code("""
kind_error_figure(df.assign(method="gptq"))"""),
        md("""
## The same run as a widget

`QuantizeWidget` holds the settings form, Run and Cancel, a progress bar and the per-layer error
curve, which grows while the run goes (the run happens on a background thread). `w.run()` does
what the Run button does and waits; `w.report`, `w.frame` and `w.figure` hold the results.
"""),
        code("""
from workbench.widgets import QuantizeWidget

w = QuantizeWidget(method="gptq", bits=4, group_size=64, **S)
w"""),
        code("""
w.run(method="rtn")    # try another method or bit width from the form, or press Run
w.report.ppl_quant, report.ppl_quant"""),
        md("""
## What the bits did to the text

Perplexity is one number. `GenerateWidget` has the full-precision model and the quantized one continue
the same prompt, one token at a time, each always taking the token it finds most likely (greedy
decoding). Until the texts part both models have read the same words, so the first divergent token is
where quantization first changed the model's mind; the table gives both models' top-5 next-token
probabilities there (how close the call was). The prompt is continued as plain text; `chat=True` wraps it
in the tokenizer's chat template, so an instruct model answers it instead.
"""),
        code("""
from workbench.widgets import GenerateWidget

g = GenerateWidget(result, prompt="Once upon a time, in a small village by the sea,", tokens=40)
g.run()
g"""),
        code("""
d = g.diff
print("the texts part at token", d.first + 1 if d.first is not None else "never")
g.top"""),
        md("""
## A width per layer

Layers differ in how much of their rounding error reaches the loss, so a size budget is better spent
unevenly. `PlanWidget` measures what each layer would cost the model at 2, 3, 4 and 8 bits (its
rounding error weighed by the loss gradient at its output: `fisher`) and gives each layer the width
that costs least within **Average bits** per weight, counted as the pack-quantized checkpoint stores
the layers (uniform 4-bit g64 takes 4.31). The heatmap shows the plan, blocks down and layer kinds
across; hover a cell for its predicted costs, click it to choose it for **Pin this width**. A new
budget or a pin is planned again at once from the costs already measured. It is the app's Mixed
precision panel (Quantize tab), and `workbench quantize --avg-bits 3.5` on the command line.
"""),
        code("""
from workbench.widgets import PlanWidget

plan = PlanWidget(method="gptq", group_size=64, avg_bits=3.5, **S)
plan.run()            # Make plan
plan"""),
        code("""
plan.pin("down@0", 8)              # block 0's down_proj at 8 bits, the rest of the budget spent again
mixed = plan.run_plan()            # Run with this plan (GPTQ, the form's method)
print(f"{mixed.report.width}: perplexity {mixed.report.ppl_fp:.2f} -> {mixed.report.ppl_quant:.2f}; "
      f"uniform w4 above: {report.ppl_quant:.2f}")
plan.table[["name", "bits", "cost", "pinned"]]"""),
    ]


def attention():
    return [
        md("""
# 02 · GPTQ, BoA and TurboBoA: why attention-aware Hessians help

GPTQ minimizes `tr(ΔW H_in ΔWᵀ)` for every layer: the error of the layer's own output, with every
output row counted the same. For the query, key and value projections that is not what the
model feels. A query row's error reaches the output only through the attention scores, i.e.
through the keys it meets, so the right loss per head is `tr(H_out ΔW H_in ΔWᵀ)`, where `H_out`
for queries is built from the keys (and the other way round) and, for values, the input factor
is weighted by the attention pattern.
"""),
        md("""
**BoA** quantizes q/k/v with these Kronecker-factored Hessians, one row of every head at a time,
compensating the remaining rows in closed form. When a head's `H_out` is close to a multiple of
the identity nothing changes; when its spectrum is steep (a few directions dominate), rounding
errors along the unimportant directions are cheap and BoA can push them there.

**TurboBoA** quantizes several rows per step, corrects for errors inherited from the
already-quantized blocks (it runs the full-precision model beside the quantized one) and refines
the grid scales after rounding.
"""),
        md(SETTINGS_NOTE),
        code(SETUP),
        md("""
## Step 1: how anisotropic are the per-head `H_out`?

The spectrum explorer accumulates the same statistics the engine does on the same calibration
windows. Pick a layer and a factor; the right plot has one line per head.
"""),
        code("""
from workbench.widgets import SpectrumExplorer

spectra = SpectrumExplorer(**S)
spectra.run()
spectra.select("0.q", factor="q")
spectra"""),
        code("""
heads = spectra.spectra.heads
heads[heads["factor"] == "H_out"].groupby(["block", "kind"])[["condition", "effective_rank", "dim"]].median()"""),
        md("""
A condition number far above 1 and an effective rank well below the dimension mean a steep
spectrum: the directions differ by orders of magnitude in how much they matter, which is the
information GPTQ's loss ignores.
"""),
        code("""
from workbench.figures import head_spectra_figure

head_spectra_figure(spectra.spectra.head_eigenvalues, 0, "k", factor="H_out")"""),
        md("""
## Step 2: the three methods on the same settings

`CompareWidget` quantizes a private copy of the model with each method and measures every layer
and every attention head on held-out windows. Lower bit widths make the differences larger.
"""),
        code("""
from workbench.widgets import CompareWidget

compare = CompareWidget(methods=("gptq", "boa", "turboboa"), bits=3, group_size=64, **S)
compare.run()
compare"""),
        code("""
compare.summary"""),
        md("""
The per-layer curves share one axis; the q/k/v layers are where the methods differ. The
heatmaps give the attention error per head (after `o_proj`: the head's share of the residual
stream), on one color scale for the three methods.
"""),
        code("""
frame = compare.frame
frame[frame["kind"].isin(["q", "k", "v"])].pivot_table(index=["block", "kind"], columns="method",
                                                       values="attn_rel_error")"""),
        code("""
from workbench.figures import attention_heatmaps

attention_heatmaps({m: o.reconstruction.heads for m, o in compare.outcomes.items()}, "after_o")"""),
        md("""
## Step 3: one head at a time

The attention explorer opens on the worst head; click a cell (or call `select(block, head)`) to
see that head across blocks and its query `H_out` spectrum.
"""),
        code("""
from workbench.widgets import AttentionExplorer

explorer = AttentionExplorer.from_outcome(compare.outcomes["boa"], spectra=spectra.spectra)
explorer"""),
        code("""
explorer.select(0, 0)
explorer.head_figure"""),
        md("""
## Step 4: one page to share

`build_page` puts the three runs and the spectra of this notebook on one HTML page: the
settings, the perplexities, the per-layer curves, the attention heatmaps and the spectra, with
plotly embedded once, so the file opens in any browser without a network (or a kernel).
`workbench report RUN.json ... --html OUT.html` writes the same page from the command line.
"""),
        code("""
from IPython.display import FileLink, IFrame, display
from workbench.html_report import RunData, SpectraData, build_page, write_page

page = build_page([RunData.from_outcome(o) for o in compare.outcomes.values()],
                  [SpectraData.from_config(spectra.spectra, spectra.form.config("gptq"))])
path = write_page(page, "gptq-boa-turboboa-report.html")
display(FileLink(path.name))
IFrame(path.name, width="100%", height=720)"""),
    ]


def debugging():
    return [
        md("""
# 03 · Debugging a layer

When a quantized model loses more than expected the question is *where*. The workflow here:

1. quantize and rank the layers by their error (on calibration and on held-out text),
2. look at the worst layer's input Hessian `H_in`: a few huge eigenvalues (outlier features) or a
   huge condition number make the solver's error compensation fragile,
3. re-quantize the blocks up to that layer with other methods and compare that layer alone.
"""),
        md(SETTINGS_NOTE),
        code(SETUP),
        md("""
## 1. Find the worst layer

`workspace.run` quantizes a copy and measures each layer against the full-precision
model on held-out windows: `heldout_rel_error` is the layer's own error on text the solver never
saw, `heldout_propagated` includes everything inherited from earlier layers.
"""),
        code("""
from workbench import QuantizeConfig, workspace

run = workspace.run(QuantizeConfig(method="gptq", bits=3, group_size=64, **S))
layers = run.layers
worst = layers.loc[layers["heldout_rel_error"].idxmax()]
layers.sort_values("heldout_rel_error", ascending=False)[
    ["name", "rel_error", "heldout_rel_error", "heldout_propagated", "loss"]].head(5)"""),
        code("""
from workbench.figures import layer_error_figure

layer_error_figure(layers, "heldout_rel_error", title="Held-out error per layer (GPTQ, 3 bits)")"""),
        md("""
## 2. Inspect its Hessian

The spectrum of `H_in` (descending, log scale) and where this layer sits among all layers.
"""),
        code("""
from workbench.widgets import SpectrumExplorer

spectra = SpectrumExplorer(**S)
spectra.run()
spectra.select(worst["name"])
spectra"""),
        code("""
summary = spectra.spectra.layers.set_index("name")
summary.loc[[worst["name"]], ["dim", "condition", "condition_damped", "effective_rank", "top1_share"]]"""),
        code("""
from workbench.figures import error_vs_spectrum

error_vs_spectrum(spectra.spectra.layers, layers.assign(method="gptq"), x="condition", y="rel_error")"""),
        md("""
A layer far to the right (ill-conditioned) and high up (large error) is the classic case where
damping, act-order or a smaller group size help; a well-conditioned layer with a large error
points at the grid (too few bits, too wide groups).

## 3. Try other methods on that layer

Blocks are quantized in order, so quantizing only up to the worst layer's block is enough to see
how each method treats it.
"""),
        code("""
upto = {**S, "max_blocks": int(worst["block"]) + 1}
rows = []
for method in ("rtn", "gptq", "turboboa"):
    r = workbench.quantize(method=method, bits=3, group_size=64, **{**upto, "eval_windows": -1})
    f = r.report.to_frame().assign(method=method)
    rows.append(f)
tried = pd.concat(rows, ignore_index=True)
tried[tried["name"] == worst["name"]][["method", "rel_error", "loss", "seconds"]]"""),
        code("""
from workbench.figures import kind_error_figure

kind_error_figure(tried[tried["block"] == worst["block"]], title=f"Block {int(worst['block'])}: error by layer kind")"""),
        code("""
gptq_damped = workbench.quantize(method="gptq", bits=3, group_size=64, damp=0.1, act_order=True,
                                 **{**upto, "eval_windows": -1})
f = gptq_damped.report.to_frame()
f[f["name"] == worst["name"]][["rel_error", "loss"]]"""),
    ]


def genie():
    return [
        md("""
# 04 · Genie: zero-shot quantization of the digits CNN

Sometimes no calibration data may be used at all. **Genie** (Jeon et al., CVPR 2023) gets it from
the model itself: the BatchNorm layers of a trained CNN remember the mean and variance of their
inputs on the training data. **Genie-D** trains a small generator and its latent inputs so that
the batch statistics of the synthesized images match those BN statistics layer by layer.

**Genie-M** then quantizes the network block by block on those images: each quantized block is
fitted to the full-precision block's output, learning the rounding direction of every weight
and the step sizes jointly.
"""),
        md("""
The model is a small residual CNN trained on scikit-learn's 8x8 digits (upsampled to 16x16),
shipped with the workbench. Calibration sources to compare: Genie-D images, pixels optimized
directly on the same loss, Gaussian noise (the floor) and real training digits (few-shot).

With `WORKBENCH_FAST=1` the images, distillation steps and optimization steps are tiny; the
accuracies are then only a smoke test.
"""),
        code("""
import pandas as pd
from workbench.widgets import GenieGallery, fast_mode, genie_settings

G = genie_settings()
print("fast mode" if fast_mode() else "normal mode", G)"""),
        md("""
## Synthesize and look

The gallery is the one the app's Genie tab shows: the first 32 images, redrawn as distillation
proceeds, each captioned with the class the full-precision CNN predicts for it and its
probability; beside it the BN-statistics loss (log scale) and, once quantizing, Genie-M's
error block by block. Each image is stretched to its own range. Distilled images do not look
like digits; they only have to reproduce the statistics the network's BN layers expect, and the
captions show the network is sure what they are all the same.
"""),
        code("""
gallery = GenieGallery(show=32, **G)
gallery"""),
        code("""
images = gallery.synthesize()      # the gallery above fills in while this runs
print(len(images), "images; the first captions:", gallery.captions[:8])"""),
        md("""
## Quantize on them

4-bit weights with float activations, then 2-bit weights with 4-bit activations (the first
convolution and the last linear layer stay at 8 bits).
"""),
        code("""
gallery.quantize(weight_bits=4, act_bits=0)
gallery.quantize(weight_bits=2, act_bits=4)
gallery.figure"""),
        md("""
## Which data matters?

The same W2A4 quantization calibrated on each source; Genie-M against round-to-nearest. (The
app's Genie tab does this for every source with one button, "Run every data source".)
"""),
        code("""
for data in ("noise", "pixels", "real"):
    gallery.quantize(data=data, weight_bits=2, act_bits=4)
gallery.quantize(data="genie", method="rtn", weight_bits=2, act_bits=4)
pd.DataFrame(gallery.rows)"""),
        md("""
The gallery's figures are the ones `workbench.figures.genie` draws for the app and the command
line, so they can also be made from the rows and images directly:
"""),
        code("""
from workbench.figures.genie import accuracy_table_figure, samples_figure

accuracy_table_figure(gallery.rows, title="Top-1 accuracy (%) on the digits test split")"""),
        code("""
samples_figure(gallery.images[:16], nrow=8, title="The last calibration images")"""),
    ]


NOTEBOOKS = {
    "01_quickstart.ipynb": quickstart,
    "02_gptq_boa_turboboa.ipynb": attention,
    "03_debugging_a_layer.ipynb": debugging,
    "04_genie.ipynb": genie,
}


def build(name: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=NOTEBOOKS[name]())
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):   # stable ids keep the files byte-identical across builds
        cell["id"] = f"{Path(name).stem[:2]}-{i:02d}"
    return nb


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:] or [str(HERE)])[0])
    out.mkdir(parents=True, exist_ok=True)
    for name in NOTEBOOKS:
        nb = build(name)
        nbformat.validate(nb)
        nbformat.write(nb, out / name)
        print(out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
