"""Genie: zero-shot quantization of BatchNorm CNNs from synthesized data.

Genie-D (``distill``) synthesizes calibration images from the BN statistics of a trained
model; Genie-M (``quantize_model``) quantizes it block by block on them with learned rounding.
"""
from .distill import DistillConfig, distill
from .model import DigitsResNet, ModelConfig, load_default_model
from .quantize import GenieMConfig, GenieMResult, quantize_model

__all__ = ["DistillConfig", "distill", "DigitsResNet", "ModelConfig", "load_default_model",
           "GenieMConfig", "GenieMResult", "quantize_model"]
