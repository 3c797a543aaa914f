"""GPU kernels (Triton, CUDA) that nbtrt runtimes call."""
