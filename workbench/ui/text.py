"""The short explanations each tab shows, written for someone learning quantization."""

INTRO = """# Quant Workbench
Post-training quantization of a causal language model, one block at a time, with a look inside.
Set the model and data once here; every tab uses them."""

QUANTIZE = """**What happens:** each linear layer's weights are rounded to a `bits`-bit grid (one grid per
`group size` input columns). RTN just rounds. GPTQ rounds one column at a time and moves the rounding
error onto the columns not yet rounded, weighted by the input Hessian `H_in = E[x xᵀ]`. BoA also weighs
the *output* side of q/k/v by how attention uses them (per-head `H_out`), and TurboBoA adds joint rows,
a correction for the error inherited from earlier layers (dx alpha) and scale refinement. *TurboBoA,
tuned scales* (the one for 2 and 3 bits) keeps TurboBoA's integer codes and trains only the grids'
scales: each block's on its output against the full-precision block, then all at once on the model's
next-token loss (a few minutes more on the whole model). aespa
*learns* each layer's rounding by gradient descent on those attention-aware losses, computed from
statistics gathered once (no pass through the model while it learns); BRECQ learns the rounding of a
whole block by backpropagating the block's output error, the slow baseline aespa is measured against.

**The plot** grows as layers finish: the relative output error `‖ΔW x‖² / ‖W x‖²` of each layer on the
calibration inputs (log scale; lower is better). Layer kinds differ by orders of magnitude; the Inspect
tab shows how their Hessians explain it. **Perplexity** is measured on held-out text before and after;
the table adds each layer's error on held-out windows and the attention error its q/k/v cause."""

COMPARE = """**Same model, same data, four methods.** The curves show each method's plain per-layer output
error `‖ΔW x‖² / ‖W x‖²` (lower is better): GPTQ sits well below RTN because it minimizes exactly this.
On q/k/v, BoA and TurboBoA may sit *above* GPTQ here: they minimize the error of the **attention output**
instead, weighting each row by how attention uses it, and that is what the heatmaps and the
*mean attention error* column measure. **The heatmaps** show, for every block (rows) and attention head
(columns), how far the quantized attention drifts from full precision on held-out text (log colors, one
shared scale: darker is better). Results are kept per settings: running the same comparison again is instant."""

COMPARE_ON_RAY = """*On Ray ({address}):* the methods not yet in this page's cache run at once, one Ray task each
(one CPU apiece), like a four-point `workbench sweep`; each task loads the model in its own worker."""

OUTLIERS = """**Activation outliers.** Per input channel of one layer, the largest |x| over a few calibration
windows of the full-precision model, before and after rotating it (`--rotate`). A per-token activation grid
spans the token's largest value, so a few channels hundreds of times larger than the median leave the others
a handful of levels; the rotation spreads them over all channels (the legend gives max / median)."""

INSPECT = """**Why some layers are hard.** A solver compensates rounding along the directions its Hessian
says matter. The **spectrum** (eigenvalues of `H_in`, largest first, log scale) shows how unevenly the
input energy is spread: a few huge eigenvalues mean outlier features dominate. The **condition number**
(largest / smallest eigenvalue) measures how ill-posed the compensation is; `condition_damped` is what
the solver actually sees after its 1% damping. *Effective rank* is exp(entropy) of the normalized
eigenvalues; *top1_share* is the fraction of the trace held by the top 1% of eigenvalues. The
**per-head spectra** are the attention-aware output factors BoA uses for q and k (and the value's
per-KV-head input factor); under grouped-query attention the query heads of one KV head share
their factor, so their lines coincide. The **scatter** puts each quantized layer's error against its spectrum."""

PLAN = """**A width per layer.** Layers differ in how much of their rounding error reaches the loss. **Make
plan** measures what each layer would cost the model at every candidate width (with *fisher*, one
forward and backward pass over the first **Sensitivity windows** of the calibration; with *objective*,
one pass over them all) and gives each layer the width that costs least within the **Average bits**
budget, counted as pack-quantized stores the layers (codes, scales and zero points). With **Candidate
bits** empty, each layer takes one of the two widths either side of the budget (3 or 4 for 3.5 bits). The plan replaces the **Bits** field; group size, symmetry and the rest come from the form.
**The heatmap** shows each layer's width (blocks down, layer kinds across; hover for the predicted
costs, * marks a pinned width). Click a cell (or choose the **Layer**), choose its **Bits** and **Pin
this width**: the rest of the budget is spent again at once from the costs already measured, as it is
when the budget moves. By default q/k/v, and gate/up, of a block share one width, as vLLM serves them
(a pinned layer leaves its set).
**Run with this plan** quantizes with the method chosen above; the measured perplexity then sits beside
the predicted one. Compare can add the plan as a *mixed* row."""
