"""Optional Triton kernels (none yet): see README.md."""
