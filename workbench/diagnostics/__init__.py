"""Diagnostics as data: Hessian spectra and reconstruction errors, as pandas frames."""
from .reconstruction import Reconstruction, frozen_copy, reconstruction_errors
from .run import DiagnoseConfig, Diagnosis, diagnose, measure_quantized, spectra_for
from .spectra import Spectra, eigenvalues, hessian_spectra, spectrum_stats
from .walk import StageView, walk_stages

__all__ = ["Reconstruction", "frozen_copy", "reconstruction_errors", "DiagnoseConfig", "Diagnosis", "diagnose",
           "measure_quantized", "spectra_for", "Spectra", "eigenvalues", "hessian_spectra", "spectrum_stats",
           "StageView", "walk_stages"]
