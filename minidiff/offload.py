"""Sequential CPU offload (diffusers' enable_sequential_cpu_offload): every submodule's own weights live on
the CPU and move to the execution device just for its forward, then back; peak device memory is about the
largest single layer plus activations. Model offload (whole models in turn) is pipelines/common.py's
`_on_device`. Both check the device at the call: no accelerator, a clear error before anything moves.
"""
import torch


def check_device(device, what):
    """torch.device(device), or a RuntimeError naming the call when that accelerator is not here."""
    device = torch.device(device)
    backend = getattr(torch, device.type, None)
    if device.type not in ("cpu", "meta") and not (backend is not None and hasattr(backend, "is_available")
                                                   and backend.is_available()):
        raise RuntimeError(f"{what}(device={str(device)!r}): no {device.type} device is available here "
                           f"(torch {torch.__version__}): offload moves the weights to that device while they work; leave "
                           "it out to run on the CPU (device='cpu' runs the same code path, for tests)")
    return device


def place(module, device):
    """Move `module`'s own parameters and buffers (not its children's) to `device`, keeping each
    Parameter object (LoRA layers and tied weights hold references to them)."""
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    for name, b in module.named_buffers(recurse=False):
        module._buffers[name] = b.to(device)


def _owns_tensors(module):
    return next(module.parameters(recurse=False), None) is not None or next(module.buffers(recurse=False), None) is not None


def sequential_hooks(model, device, home="cpu"):
    """Forward hooks on every submodule: its own tensors to `device` before its forward, to `home` after.
    A child whose weight its parent reads directly (`self.position_embedding.weight`, never called) moves
    with its parent: a parent also brings in those of its children not yet seen running (on the first
    call: all of them, from then on: only the never-called ones). Returns the hook handles (remove them
    to undo)."""
    called, brought = set(), {}

    def before(module, args):
        called.add(module)
        brought[module] = [c for c in module.children() if c not in called and _owns_tensors(c)]
        for m in [module] + brought[module]:
            place(m, device)

    def after(module, args, out):
        for m in [module] + brought.pop(module, []):
            place(m, home)
    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after))
    return handles
