"""Low-level kernels behind ceu's fused losses: Triton kernels and their launchers, and the compiled CUDA module."""
