"""Two-dimensional early exit (issue 10): layer-range engines, exit adapters, the 2D runtime."""
