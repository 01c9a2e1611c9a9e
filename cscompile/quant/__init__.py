"""Quantization grids shared by passes and engines: the source GGUF's blocks, read exactly."""
