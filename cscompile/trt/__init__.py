"""TensorRT target: lowering (CPU-testable), engine build, runner and checks (GPU, lazy imports)."""
