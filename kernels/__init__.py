"""Dequantize-matmul kernels (installed as llmq.kernels)."""
