"""LyCORIS adapters (KohakuBlueleaf's LyCORIS): weight deltas that are not a LoRA's down/up pair.

A LyCORIS file uses kohya's key names (`lora_unet_...`, `lora_te1_...`) with, per layer, the factors of
one of these deltas (W is the layer's weight, out x in, or out x in x kh x kw for a convolution):
  - LoHa (Hadamard product of two low-rank matrices): dW = (w1_a w1_b) * (w2_a w2_b); with `hada_t1` and
    `hada_t2` (a convolution in Tucker form) each factor is t x_1 w_a x_2 w_b, a full kernel;
  - LoKr (Kronecker product): dW = kron(w1, w2), w1 = `lokr_w1` or w1_a w1_b, w2 = `lokr_w2`, w2_a w2_b,
    or with `lokr_t2` the Tucker form; a 4-d w2 makes w1 a 1 x 1 kernel first;
  - full difference: dW = `diff`, and the bias difference `diff_b`.
The delta is reshaped to W's shape (a 2-d factor of a convolution is its flattened kernel). The scale is
alpha / dim, where dim is the rank of the low-rank factor (LoHa: w1_b's rows; LoKr: w2_b's, else w1_b's);
without alpha or without a low-rank factor it is 1, as LyCORIS and ComfyUI read these files.
"""
import torch

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
FULL = ("diff", "diff_b")
KEYS = LOHA + LOKR + FULL


def kind_of(factors):
    """"loha", "lokr" or "full" for a complete set of factors, else a string saying what is missing."""
    kinds = {k for k, names in (("loha", LOHA), ("lokr", LOKR), ("full", FULL)) if any(n in factors for n in names)}
    if len(kinds) != 1:
        return f"factors of more than one LyCORIS kind ({', '.join(sorted(kinds))}) on one layer"
    kind = kinds.pop()
    have = set(factors)
    if kind == "loha":
        missing = [n for n in LOHA[:4] if n not in have]
        if ("hada_t1" in have) != ("hada_t2" in have):
            missing.append("hada_t2" if "hada_t1" in have else "hada_t1")
    elif kind == "lokr":
        missing = []
        for w in ("lokr_w1", "lokr_w2"):
            if w in have and ({w + "_a", w + "_b"} & have):
                return f"both {w} and {w}_a/{w}_b given"
            if w not in have:
                missing += [n for n in (w + "_a", w + "_b") if n not in have]
        if "lokr_t2" in have and "lokr_w2" in have:
            return "lokr_t2 given with a full lokr_w2 (it needs lokr_w2_a/lokr_w2_b)"
    else:
        missing = [] if "diff" in have else ["diff"]
    if missing:
        return f"LyCORIS {kind} factor(s) {', '.join(missing)} missing for this layer"
    return kind


def delta(kind, f):
    """The weight delta of one layer from its factors (before the scale), in the factors' dtype."""
    if kind == "full":
        return f["diff"]
    if kind == "loha":
        if "hada_t1" in f:
            w1 = torch.einsum("i j k l, j r, i p -> p r k l", f["hada_t1"], f["hada_w1_b"], f["hada_w1_a"])
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", f["hada_t2"], f["hada_w2_b"], f["hada_w2_a"])
        else:
            w1 = f["hada_w1_a"].flatten(1) @ f["hada_w1_b"].flatten(1)
            w2 = f["hada_w2_a"].flatten(1) @ f["hada_w2_b"].flatten(1)
        return w1 * w2
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif "lokr_t2" in f:
        w2 = torch.einsum("i j k l, i p, j r -> p r k l", f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"].flatten(1)
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2)


def scale(kind, f, alpha):
    """alpha / dim (1 without alpha, for a full difference, or a LoKr without a low-rank factor)."""
    if alpha is None or kind == "full":
        return 1.0
    if kind == "loha":
        return alpha / f["hada_w1_b"].shape[0]
    dim = f["lokr_w2_b"].shape[0] if "lokr_w2_b" in f else f["lokr_w1_b"].shape[0] if "lokr_w1_b" in f else None
    return 1.0 if dim is None else alpha / dim


def fits(d, weight_shape):
    """Whether a delta reshapes onto a weight: same rows, same number of elements (a flattened kernel is fine)."""
    return d.shape[0] == weight_shape[0] and d.numel() == torch.Size(weight_shape).numel()
