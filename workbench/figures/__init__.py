"""Plotly figures as pure functions of report and diagnostics frames."""
from .attention import attention_heatmap, attention_heatmaps, block_attention_figure
from .layers import kind_error_figure, layer_error_figure, progress_figure
from .outliers import outlier_figure
from .plan import plan_figure
from .spectra import condition_heatmap, error_vs_spectrum, head_spectra_figure, spectrum_figure
from .style import METHOD_COLORS, empty_figure

__all__ = ["attention_heatmap", "attention_heatmaps", "block_attention_figure", "kind_error_figure",
           "layer_error_figure", "outlier_figure", "plan_figure", "progress_figure", "condition_heatmap",
           "error_vs_spectrum", "head_spectra_figure", "spectrum_figure", "METHOD_COLORS", "empty_figure"]
