"""Diagnostics as data: Hessian spectra and reconstruction errors, as pandas frames.

``workbench.diagnostics.run`` (``diagnose``, what ``workbench inspect`` runs) builds on the
workspace and is imported from there, not here, so that the workspace can use these parts.
"""
from .reconstruction import Reconstruction, frozen_copy, reconstruction_errors
from .spectra import Spectra, eigenvalues, hessian_spectra, spectrum_stats
from .walk import StageView, walk_stages

__all__ = ["Reconstruction", "frozen_copy", "reconstruction_errors", "Spectra", "eigenvalues", "hessian_spectra",
           "spectrum_stats", "StageView", "walk_stages"]
