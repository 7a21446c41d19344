"""INT8 kernels (Triton on CUDA, torch fallbacks elsewhere)."""
