"""Quantization math: grids and solvers, pure functions over tensors."""
