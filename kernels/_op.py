"""What every kernel file shares: when a kernel runs instead of its reference, and how an op registers.

Each kernel is a torch custom op (`torch.library.custom_op`, namespace `minidiff`) with a fake
implementation (output shape/dtype/strides from the inputs, no compute), so torch.compile(fullgraph=True)
traces through it as one opaque node, and an autograd formula that recomputes the reference's backward
(the forward is the fused kernel; the backward is plain PyTorch: correct for LoRA training and
distillation, not fused).
"""
import os

import torch

# read once: dynamo then sees a constant, not an os.environ lookup, so no graph break
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def runs_kernel(x):
    """The kernel runs on CUDA tensors, and on CPU tensors only under Triton's interpreter (the tests)."""
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


def reference_backward(op, reference, n_inputs):
    """Register on `op` an autograd formula: the gradient of `reference(*inputs)` (recomputed), so the
    fused forward trains like the reference. Non-tensor and integer inputs get no gradient."""

    def setup_context(ctx, inputs, output):
        ctx.inputs = inputs
        tensors = [t if isinstance(t, torch.Tensor) else None for t in inputs]
        ctx.save_for_backward(*[t for t in tensors if t is not None])
        ctx.tensor_slots = [t is not None for t in tensors]

    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved) if is_tensor else v for is_tensor, v in zip(ctx.tensor_slots, ctx.inputs)]
        leaves = [t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point()
                  else t for t in inputs]
        with torch.enable_grad():
            out = reference(*leaves)
        wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wrt, grad, allow_unused=True))
        return tuple(next(grads) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves)

    torch.library.register_autograd(op, backward, setup_context=setup_context)
