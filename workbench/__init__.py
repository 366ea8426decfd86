"""Quant Workbench: post-training quantization you can see into."""
from .api import QuantizeConfig, QuantizeResult, quantize
from .errors import Cancelled, WorkbenchError
from .checkpoint import load_quantized
from .models.loading import load_model
from .report import LayerRecord, Report

__all__ = ["QuantizeConfig", "QuantizeResult", "quantize", "load_model", "Report", "LayerRecord",
           "WorkbenchError", "Cancelled", "load_quantized"]
