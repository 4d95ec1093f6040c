"""Checkpoint formats: bit packing and the native safetensors layout."""
