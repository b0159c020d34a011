"""Optional kernels for the ops seam (see README.md): Triton's for CUDA, and a C++ attention for CPUs.

    from minidiff import kernels
    kernels.use("triton")     # group_norm(+SiLU), layer_norm, geglu, lora_linear, lut_weight -> kernels
    kernels.use("cpu")        # attention -> the AVX512_BF16 CPU kernel (cpu_attention.py; built at first use)
    kernels.use("reference")  # back to the plain PyTorch references (also ops.reset())

or set MINIDIFF_KERNELS=triton (or cpu) before minidiff is imported. Kernels run on CUDA tensors; CPU tensors
take the reference (unless TRITON_INTERPRET=1, how the tests run the kernels without a GPU).
Importing this package does not import Triton; use("triton") does, and says so when it is missing.
"""
import importlib
import os

from minidiff import ops

# op name in the seam -> the file (module) holding its kernel wrapper of the same name
KERNELS = {"group_norm": "group_norm", "layer_norm": "layer_norm", "geglu": "geglu", "lora_linear": "lora_linear",
           "lut_weight": "lut"}
CHOICES = ("triton", "cpu", "reference")


def triton_ops():
    """{op name: kernel wrapper} for every op that has a Triton kernel (imports Triton)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise ImportError("minidiff.kernels.use('triton') needs Triton: pip install 'minidiff[triton]' "
                          "(or pip install triton)") from e
    return {name: getattr(importlib.import_module(f"minidiff.kernels.{file}"), name) for name, file in KERNELS.items()}


def use(kind="triton"):
    """Turn the Triton kernels on ("triton"), the CPU attention kernel on ("cpu"; both may be on), or every kernel
    off ("reference") through ops.use; returns its context manager, so `with kernels.use("triton"): ...` puts back
    what was there before."""
    if kind not in CHOICES:
        raise ValueError(f"minidiff.kernels.use({kind!r}): choose one of {list(CHOICES)}")
    if kind == "reference":
        return ops.use(attention=None, **{name: None for name in KERNELS})
    if kind == "cpu":
        from . import cpu_attention
        cpu_attention.load()  # built (or loaded) now: an error here, not at the first attention
        return ops.use(attention=cpu_attention.attention)
    return ops.use(**triton_ops())


def use_from_environment():
    """MINIDIFF_KERNELS=triton|cpu|reference (unset or empty: nothing changes), read when minidiff is imported."""
    kind = os.environ.get("MINIDIFF_KERNELS", "").strip().lower()
    if kind:
        if kind not in CHOICES:
            raise ValueError(f"MINIDIFF_KERNELS={kind!r}: use one of {list(CHOICES)} (or leave it unset)")
        use(kind)
