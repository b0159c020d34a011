"""minidiff: small, readable text-to-image diffusion in plain PyTorch."""
__version__ = "0.1.0"
