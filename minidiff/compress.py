"""Mixed-bit palettisation: Apple's Core ML weight compression (ml-stable-diffusion, coremltools), in PyTorch.

A palettised layer keeps, instead of its weight, an n-bit index per weight into a lookup table (LUT) of
2^n values found by k-means; "per grouped channel", every `group_size` output channels share one LUT.
Mixed-bit: each layer gets the lowest n in {1, 2, 4, 6, 8} whose effect on the pipeline's output keeps
the PSNR (against the uncompressed output) above a threshold; small layers stay float16.

Two phases, as in Apple's tools:
- `analyse(pipe, ...)` (slow): palettise each candidate layer alone at each n, run the pipeline, measure
  the output's PSNR; then palettise cumulatively in order of least impact; then build recipes. It writes
  Apple's pre-analysis JSON (`single_layer`, `cumulative`, `baselines`, `recipes`), so Apple's published
  recipes (keyed by diffusers module paths, e.g. "down_blocks.0.attentions.0.proj_in") read as they are.
- `apply_recipe(unet, recipe)` (fast): replace the layers with `Palettised` modules, which hold the
  packed indices and the LUTs and dequantise on the fly (`ops.lut_weight`: a gather; a Triton kernel in
  minidiff.kernels plugs in there); `save_palettised` writes them as safetensors whose size on disk is
  the compressed size, and `from_pretrained` loads them back (`dequantise(model)` trades the memory back
  for speed).
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidiff import ops
from minidiff.prepack import is_plain_layer
from minidiff.assets import MODEL_DIR as BUNDLED  # the default model of `minidiff compress`

NBITS = (1, 2, 4, 6, 8)
KEEP = 16  # a recipe's "leave it in float16"
MIN_SIZE = 100_000  # Apple's PALETTIZE_MIN_SIZE: smaller layers stay float16
METADATA_KEY = "minidiff_palettised"  # safetensors metadata entry listing the palettised layers


# ----------------------------------------------------------------------------- k-means on weights

def kmeans_1d(values, k, seed=0, sample_size=1 << 16, iters=15):
    """k sorted centroids of a tensor's values: k-means++ init and Lloyd iterations, fitted on a seeded
    sample of at most `sample_size` values (assigning every weight is `assign`)."""
    x = values.detach().flatten().float().cpu()
    g = torch.Generator().manual_seed(seed)
    if x.numel() > sample_size:
        x = x[torch.randint(x.numel(), (sample_size,), generator=g)]
    uniq = torch.unique(x)
    if uniq.numel() <= k:  # as many levels as values: exact
        return torch.cat([uniq, uniq[-1:].expand(k - uniq.numel())])
    centroids = x[torch.randint(x.numel(), (1,), generator=g)]
    d2 = (x - centroids[0]) ** 2
    for _ in range(k - 1):  # k-means++: next centre drawn with probability proportional to D^2
        c = x[torch.multinomial(d2 / d2.sum(), 1, generator=g)] if d2.sum() > 0 else x[:1]
        centroids = torch.cat([centroids, c])
        d2 = torch.minimum(d2, (x - c) ** 2)
    centroids = centroids.sort().values
    for _ in range(iters):
        idx = assign(x, centroids)
        sums = torch.zeros(k).index_add_(0, idx, x)
        counts = torch.zeros(k).index_add_(0, idx, torch.ones_like(x))
        new = torch.where(counts > 0, sums / counts.clamp(min=1), centroids).sort().values
        if torch.equal(new, centroids):
            break
        centroids = new
    return centroids


def assign(values, centroids):
    """Index of the nearest of the sorted `centroids` for every value (bucketize on the midpoints)."""
    return torch.bucketize(values.float(), (centroids[1:] + centroids[:-1]) / 2)


def palettise(weight, nbits, group_size=None, seed=0):
    """(indices uint8 of weight's shape, lut float16 (groups, 2^nbits)): per tensor, or one LUT per
    `group_size` output channels (coremltools' per_grouped_channel)."""
    if nbits not in NBITS:
        raise ValueError(f"palettise: nbits={nbits} must be one of {NBITS}")
    rows = weight.detach().reshape(weight.shape[0], -1).float().cpu()
    group_size = group_size or rows.shape[0]
    if rows.shape[0] % group_size:
        raise ValueError(f"palettise: group_size={group_size} does not divide the {rows.shape[0]} output channels")
    luts, indices = [], []
    for i, group in enumerate(rows.split(group_size)):
        # the LUT is stored in float16: fit, round, then assign against the rounded values
        lut = kmeans_1d(group.half().float(), 2 ** nbits, seed + i).half().float().sort().values
        luts.append(lut)
        indices.append(assign(group, lut).to(torch.uint8))
    return torch.cat(indices).reshape(weight.shape), torch.stack(luts).half()


def depalettise(indices, lut):
    """The weight a palettised layer computes with: lut[group, index]."""
    groups = lut.shape[0]
    flat = indices.reshape(groups, -1).long()
    return torch.gather(lut, 1, flat).reshape(indices.shape)


def linear_8bit(weight):
    """Apple's baseline (coremltools' LINEAR int8 per output channel, range widened to contain 0),
    returned as the weight it computes with."""
    rows = weight.detach().reshape(weight.shape[0], -1).float()
    lo = rows.amin(1, keepdim=True).clamp(max=0)
    hi = rows.amax(1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=1e-12)
    zero = torch.round(-128 - lo / scale).clamp(-128, 127)
    q = (torch.round(rows / scale) + zero).clamp(-128, 127)
    return ((q - zero) * scale).reshape(weight.shape).to(weight.dtype)


# ----------------------------------------------------------------------------- packing n-bit indices

def packed_size(numel, nbits):
    return (numel * nbits + 7) // 8


def pack(indices, nbits):
    """uint8 indices (< 2^nbits) -> a bit stream, most significant bit first, in ceil(numel * nbits / 8) bytes."""
    idx = indices.flatten().to(torch.int32)
    bits = (idx[:, None] >> torch.arange(nbits - 1, -1, -1, dtype=torch.int32)) & 1
    bits = F.pad(bits.flatten(), (0, (-bits.numel()) % 8)).view(-1, 8)
    return (bits << torch.arange(7, -1, -1, dtype=torch.int32)).sum(1).to(torch.uint8)


def unpack(packed, nbits, numel):
    """Inverse of `pack`: the first `numel` nbits-wide indices of the stream, as uint8.

    Runs on every call of a palettised layer, so the common widths take byte-wise shifts: 1, 2, 4, 8 bits
    never straddle a byte, and 6 bits are 4 indices in every 3 bytes."""
    if 8 % nbits == 0:
        shifts = torch.arange(8 - nbits, -1, -nbits, dtype=torch.uint8, device=packed.device)
        return ((packed[:, None] >> shifts) & ((1 << nbits) - 1)).flatten()[:numel]
    if nbits == 6:
        b = F.pad(packed, (0, (-packed.numel()) % 3)).view(-1, 3)
        b0, b1, b2 = b[:, 0], b[:, 1], b[:, 2]
        out = torch.stack([b0 >> 2, ((b0 & 3) << 4) | (b1 >> 4), ((b1 & 15) << 2) | (b2 >> 6), b2 & 63], 1)
        return out.flatten()[:numel]
    bits = (packed.to(torch.int32)[:, None] >> torch.arange(7, -1, -1, dtype=torch.int32, device=packed.device)) & 1
    bits = bits.flatten()[:numel * nbits].view(numel, nbits)
    weights = 1 << torch.arange(nbits - 1, -1, -1, dtype=torch.int32, device=packed.device)
    return (bits * weights).sum(1).to(torch.uint8)


# ----------------------------------------------------------------------------- palettised layers

class Palettised(nn.Module):
    """A Linear or Conv2d whose weight is n-bit indices into per-group LUTs, dequantised on every call.

    State-dict keys: `weight_packed` (uint8 bit stream), `weight_lut` ((groups, 2^n)), `bias`."""

    def __init__(self, weight_shape, nbits, groups, bias, conv=None):
        super().__init__()
        self.weight_shape, self.nbits, self.conv = tuple(weight_shape), nbits, conv
        self.register_buffer("weight_packed", torch.empty(packed_size(math.prod(weight_shape), nbits),
                                                          dtype=torch.uint8))
        self.register_buffer("weight_lut", torch.empty(groups, 2 ** nbits))
        self.bias = nn.Parameter(torch.empty(weight_shape[0])) if bias else None

    @classmethod
    def like(cls, layer, nbits, groups):
        """An empty palettised layer (on the current device, meta when building) in the place of `layer`."""
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros":
                raise ValueError(f"palettise: Conv2d with padding_mode={layer.padding_mode!r} is not supported")
            conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}
        elif isinstance(layer, nn.Linear):
            conv = None
        else:
            raise TypeError(f"palettise: only Linear and Conv2d layers can be palettised, not {type(layer).__name__}")
        return cls(layer.weight.shape, nbits, groups, layer.bias is not None, conv)

    @property
    def weight(self):
        return ops.lut_weight(self.weight_packed, self.weight_lut, self.nbits, self.weight_shape)

    def forward(self, x):
        w = self.weight.to(x.dtype)
        if self.conv is None:
            return F.linear(x, w, self.bias)
        return F.conv2d(x, w, self.bias, **self.conv)

    def plain(self):
        """The equivalent Linear / Conv2d with the dequantised weight."""
        w = self.weight.detach()
        with torch.device("meta"):
            if self.conv is None:
                m = nn.Linear(w.shape[1], w.shape[0], bias=self.bias is not None)
            else:
                m = nn.Conv2d(w.shape[1] * self.conv["groups"], w.shape[0], w.shape[2:], bias=self.bias is not None,
                              **self.conv)
        m.weight = nn.Parameter(w.to(self.weight_lut.dtype))
        m.bias = self.bias
        return m

    def extra_repr(self):
        return f"{self.weight_shape}, {self.nbits}-bit, {self.weight_lut.shape[0]} LUT(s)"


def _set(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def palettisable(model, min_size=MIN_SIZE):
    """[(name, numel)] of the Linear and Conv2d layers with more than `min_size` weights (Apple's candidates)."""
    return [(n, m.weight.numel()) for n, m in model.named_modules()
            if is_plain_layer(m) and m.weight.numel() > min_size]


def check_recipe(model, recipe, where="recipe"):
    """Every name must be a Linear/Conv2d of `model` and every value in NBITS or 16; errors list what is wrong."""
    if not isinstance(recipe, dict):
        raise ValueError(f"{where}: a recipe is a JSON object {{layer name: bits}}, got {type(recipe).__name__}")
    layers = {n: m for n, m in model.named_modules() if is_plain_layer(m) or isinstance(m, Palettised)}
    unknown = sorted(n for n in recipe if n not in layers)
    bad = sorted(f"{n}: {b!r}" for n, b in recipe.items()
                 if isinstance(b, bool) or not isinstance(b, int) or b not in NBITS + (KEEP,))
    if unknown or bad:
        parts = [f"{where} does not fit {type(model).__name__}:"]
        if unknown:
            near = sorted(layers)[:3]
            parts.append(f"{len(unknown)} unknown layer(s): {', '.join(unknown[:8])} (names are module paths such "
                         f"as {', '.join(near)})")
        if bad:
            parts.append(f"bits outside {list(NBITS) + [KEEP]}: {', '.join(bad[:8])}")
        raise ValueError("\n  ".join(parts))


@torch.no_grad()
def apply_recipe(model, recipe, group_size=None, seed=0, where="recipe"):
    """Palettise `model`'s layers in place as `recipe` ({name: bits}) says; 16 (or absent) keeps a layer.

    Returns {"nbits": average bits over the recipe's layers, "size_mb": their compressed size}."""
    check_recipe(model, recipe, where)
    total_bits = total = 0
    for name, nbits in recipe.items():
        layer = model.get_submodule(name)
        total += layer.weight.numel()
        total_bits += layer.weight.numel() * nbits
        if nbits == KEEP or isinstance(layer, Palettised):
            continue
        indices, lut = palettise(layer.weight, nbits, group_size, seed)
        new = Palettised.like(layer, nbits, lut.shape[0]).to(layer.weight.device)
        new.weight_packed.copy_(pack(indices, nbits))
        new.weight_lut = lut.to(layer.weight.device, layer.weight.dtype)
        new.bias = layer.bias
        _set(model, name, new)
    return {"nbits": total_bits / max(total, 1), "size_mb": total_bits / 8e6}


def dequantise(model):
    """Replace every Palettised layer by a plain one holding its dequantised weight (speed for memory)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, Palettised):
            _set(model, name, m.plain())
    return model


# ----------------------------------------------------------------------------- files

def palettised_layers(files):
    """{name: {"nbits", "groups"}} from a weights file's metadata ({} for an ordinary file)."""
    from minidiff.weights.safe import file_kind, read_safetensors_header
    if len(files) != 1 or file_kind(files[0]) != "safetensors":  # by content: a pickle may be named .safetensors
        return {}
    meta = read_safetensors_header(files[0]).metadata
    if METADATA_KEY not in meta:
        return {}
    try:
        layers = json.loads(meta[METADATA_KEY])["layers"]
        return {n: {"nbits": int(v["nbits"]), "groups": int(v["groups"])} for n, v in layers.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{files[0]}: malformed {METADATA_KEY} metadata: {e}") from e


def build_palettised(model, layers, where):
    """Swap the named layers of a model built on meta for empty Palettised ones, ready for load_into."""
    check_recipe(model, {n: v["nbits"] for n, v in layers.items()}, where)
    for name, v in layers.items():
        _set(model, name, Palettised.like(model.get_submodule(name), v["nbits"], v["groups"]))


def save_palettised(model, folder, recipe=None, class_name=None):
    """config.json + diffusion_pytorch_model.safetensors: packed indices (uint8), LUTs and every other
    floating tensor in float16, the palettised layers (and the recipe) in the file's metadata."""
    from safetensors.torch import save_file

    from minidiff.weights.config import config_to_dict
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_to_dict(model.config, class_name or type(model).__name__), f, indent=2)
    layers = {n: {"nbits": m.nbits, "groups": m.weight_lut.shape[0]} for n, m in model.named_modules()
              if isinstance(m, Palettised)}
    sd = {k: (v.half() if v.is_floating_point() else v).detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "pt", METADATA_KEY: json.dumps({"layers": layers, "recipe": recipe or {}})}
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    save_file(sd, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)
    return path


def read_recipe(path, selected=None):
    """A recipe from a JSON file: Apple's pre-analysis file (`recipes` {key: recipe}; `selected` picks one,
    needed when it holds several) or a plain {layer: bits} object."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
    if isinstance(data, dict) and isinstance(data.get("recipes"), dict):
        recipes = data["recipes"]
        if selected is None and len(recipes) == 1:
            selected = next(iter(recipes))
        if selected not in recipes:
            raise ValueError(f"{path}: choose a recipe with --selected-recipe / selected=, one of {sorted(recipes)}"
                             if selected is None else f"{path}: no recipe {selected!r}; there are {sorted(recipes)}")
        return recipes[selected]
    if selected is not None:
        raise ValueError(f"{path}: holds one plain recipe, so selected={selected!r} names nothing")
    return data


# ----------------------------------------------------------------------------- analysis

PROMPTS = ["a red circle on a blue background", "a small green star in the top left corner, purple background",
           "a large white square on a black background", "an orange triangle on the right, yellow background"]


def psnr(ref, test):
    """Apple's signal integrity: 20 log10(max |ref| / RMS(ref - test)), in dB."""
    ref, test = ref.double(), test.double()
    rms = (ref - test).pow(2).mean().sqrt().item()
    return 20 * math.log10((ref.abs().max().item() + 1e-5) / (rms + 1e-10))


def _run(pipe, prompts, seed, call_kwargs):
    g = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompts, generator=g, output_type="latent", **call_kwargs).images


def _psnrs(ref, test):
    return [round(psnr(r, t), 2) for r, t in zip(ref, test)]


def _save_json(results, out):
    if out:
        with open(out + ".tmp", "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        os.replace(out + ".tmp", out)


@torch.no_grad()
def analyse(pipe, out=None, prompts=PROMPTS, seed=0, nbits=NBITS, min_size=MIN_SIZE, group_size=None,
            targets=(6.5, 4.5, 3.4), progress=True, model_version=None, **call_kwargs):
    """Apple's pre-analysis on `pipe.unet`; writes (and resumes from) `out` after every layer measured.

    call_kwargs go to every pipeline call (e.g. num_inference_steps=4, guidance_scale=5.0)."""
    unet = pipe.unet
    pipe.set_progress_bar_config(disable=True)  # thousands of short runs: one line of progress of our own
    candidates = palettisable(unet, min_size)
    if not candidates:
        raise ValueError(f"analyse: no Linear/Conv2d layer of the UNet has more than min_size={min_size} weights")
    sizes = dict(candidates)
    settings = {"prompts": list(prompts), "seed": seed, "min_size": min_size, "group_size": group_size,
                "call": {k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str))}}
    results = {"model_version": model_version or "", "settings": settings, "sizes": sizes,
               "single_layer": {}, "cumulative": {}}
    if out and os.path.exists(out):
        with open(out, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("settings") != settings or old.get("sizes") != sizes:
            raise ValueError(f"{out} holds an analysis with other settings or another model; pass another --out")
        results.update(old)
    ref = _run(pipe, prompts, seed, call_kwargs)
    originals = {n: unet.get_submodule(n).weight.data.clone() for n in sizes}

    def measure(key, names_in_order, cumulative, n):
        table = results[key].setdefault(str(n), {"metadata": {"nbits": n, "cumulative": cumulative}})
        for i, name in enumerate(names_in_order):
            if name in table:
                if cumulative:
                    unet.get_submodule(name).weight.data = compressed(name, n)
                continue
            layer = unet.get_submodule(name)
            layer.weight.data = compressed(name, n)
            table[name] = _psnrs(ref, _run(pipe, prompts, seed, call_kwargs))
            if not cumulative:
                layer.weight.data = originals[name]
            _save_json(results, out)
            if progress:
                print(f"\r{key} {n}-bit: {i + 1}/{len(names_in_order)} {name} {sum(table[name]) / len(ref):.1f} dB",
                      end="", flush=True)
        for name in names_in_order:
            unet.get_submodule(name).weight.data = originals[name]
        if progress:
            print()

    cache = {}

    def compressed(name, n):
        if (name, n) not in cache:
            idx, lut = palettise(originals[name], n, group_size, seed)
            cache[(name, n)] = depalettise(idx, lut.to(originals[name].dtype)).to(originals[name].device)
        return cache[(name, n)]

    for n in nbits:
        measure("single_layer", list(sizes), False, n)
        order = descending_psnr_order(results["single_layer"][str(n)])
        measure("cumulative", order, True, n)
        results["cumulative"][str(n)]["metadata"].update({"candidates": order, "sizes": [sizes[c] for c in order]})
        cache.clear()
        _save_json(results, out)

    def simulate(weights):
        for name, w in weights.items():
            unet.get_submodule(name).weight.data = w
        try:
            return sum(_psnrs(ref, _run(pipe, prompts, seed, call_kwargs))) / len(ref)
        finally:
            for name in weights:
                unet.get_submodule(name).weight.data = originals.get(name, weights[name])

    all_layers = {n: m for n, m in unet.named_modules() if is_plain_layer(m)}
    saved = {n: m.weight.data.clone() for n, m in all_layers.items()}
    originals.update(saved)
    results["baselines"] = {
        "original": round(simulate({n: w.half().to(w.dtype) for n, w in saved.items()}), 1),
        "linear_8bit": round(simulate({n: linear_8bit(w) for n, w in saved.items()}), 1)}
    results["recipes"] = {}
    for target in targets:
        recipe, stats = recipe_for_bits(results["cumulative"], sizes, target)
        weights = {}
        for name, b in recipe.items():
            if b != KEEP:
                idx, lut = palettise(saved[name], b, group_size, seed)
                weights[name] = depalettise(idx, lut.to(saved[name].dtype))
        key = f"recipe_{stats['nbits']:.2f}_bit_mixedpalette"
        results["baselines"][key] = round(simulate(weights), 1)
        results["recipes"][key] = recipe
        _save_json(results, out)
    return results


def descending_psnr_order(table):
    """Layer names, least harmful first (highest summed PSNR when palettised alone)."""
    return sorted((k for k in table if k != "metadata"), key=lambda k: -sum(table[k]))


def build_recipe(cumulative, sizes, psnr_threshold, default_nbits=KEEP):
    """Apple's rule: each layer gets the lowest n whose cumulative PSNR (at its place in that n's order)
    stays above the threshold, else `default_nbits`. Returns (recipe, {"nbits": average, "size_mb"})."""
    recipe, total_bits = {}, 0
    for name in sizes:
        chosen = default_nbits
        for n in sorted(int(k) for k in cumulative):
            row = cumulative[str(n)].get(name)
            if row is not None and sum(row) / len(row) > psnr_threshold:
                chosen = n
                break
        recipe[name] = chosen
        total_bits += chosen * sizes[name]
    return recipe, {"nbits": total_bits / sum(sizes.values()), "size_mb": total_bits / 8e6}


def recipe_for_bits(cumulative, sizes, target_bits):
    """The recipe with the highest PSNR threshold whose average bit width is at most `target_bits`
    (bisection on the threshold: a higher threshold keeps more layers at more bits)."""
    lo, hi = -50.0, 300.0  # dB: a threshold no layer fails, one every layer fails
    best = build_recipe(cumulative, sizes, lo)
    for _ in range(60):
        mid = (lo + hi) / 2
        recipe, stats = build_recipe(cumulative, sizes, mid)
        if stats["nbits"] <= target_bits:
            lo, best = mid, (recipe, stats)
        else:
            hi = mid
    return best
