"""Quantization solvers: pure tensor code that knows nothing of models."""
