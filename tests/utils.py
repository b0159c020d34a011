"""Shared test helpers: tolerances stated once."""
import torch


def assert_close(ours, ref, rel=1e-4, name="output"):
    """Max abs error within `rel` of the reference's scale (max |ref|), the project's fp32 tolerance."""
    ours, ref = torch.as_tensor(ours).float(), torch.as_tensor(ref).float()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    scale = ref.abs().max().clamp_min(1e-12)
    err = (ours - ref).abs().max()
    assert err <= rel * scale, f"{name}: max abs error {err.item():.3g} > {rel} x scale {scale.item():.3g}"


def seeded_(module, seed=0, std=0.05):
    """Fill every parameter with seeded random values (diffusers' inits leave many at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            # norm scales around 1, everything else around 0
            base = 1.0 if p.ndim == 1 and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * std + base)
    return module
