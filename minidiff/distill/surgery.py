"""Student surgery: a smaller UNet made by removing blocks from a teacher, initialised from its weights.

Block-removal knowledge distillation (Kim et al. 2023, "BK-SDM: A Lightweight, Fast, and Cheap Version
of Stable Diffusion", the paper Segmind's SD-Small / SD-Tiny follow). Three removals, in the paper's
terms, each one of the names `drop` takes:
  - "pairs"        fewer blocks in the outer stages: one resnet + attention pair less in every down
                   stage that has more than one, and so (the config ties them) in its mirrored up stage
  - "mid_block"    the mid-stage removal
  - "inner_stage"  the innermost down stage and its mirrored up stage removed (the stage above then ends
                   the down path, without a downsampler)
and the presets:
  bk-sdm-base  = pairs                              (SD 1.5: 0.58B UNet parameters)
  bk-sdm-small = pairs + mid_block                  (0.49B)
  bk-sdm-tiny  = pairs + mid_block + inner_stage    (0.33B)
  sd_small     = pairs (Segmind's distill-sd keeps the mid block: bk-sdm-base's blocks)
  sd_tiny      = pairs + mid_block + inner_stage (Segmind's: bk-sdm-tiny's blocks)
`drop` may also name single stages: "pairs.N" (down stage N and its mirror lose one pair).

The student is an ordinary UNet2DConditionModel config (per-stage `layers_per_block` list, null
`mid_block_type`), so diffusers loads it too. Its weights come from the teacher by three rules, as
BK-SDM's and Segmind's code initialise them:
  1. a down stage keeps its first pairs;
  2. an up stage keeps its first pairs and its LAST one (the one that reads the skip from the level
     below), so the teacher's up resnet 2 becomes the student's resnet 1 in SD 1.5;
  3. when the innermost stage is gone, the student's up stage i is the teacher's up stage i + 1.
Everything else (conv_in, time embedding, mid block, conv_out) keeps its name.
"""
import re

ARCHS = {
    "bk-sdm-base": ("pairs",),
    "bk-sdm-small": ("pairs", "mid_block"),
    "bk-sdm-tiny": ("pairs", "mid_block", "inner_stage"),
    "sd_small": ("pairs",),
    "sd_tiny": ("pairs", "mid_block", "inner_stage"),
}
DROP_NAMES = ("pairs", "pairs.N", "mid_block", "inner_stage")

PER_DOWN_BLOCK = ("block_out_channels", "only_cross_attention", "layers_per_block", "cross_attention_dim",
                  "transformer_layers_per_block", "attention_head_dim", "num_attention_heads")


def _per_block(cfg, key, n):
    value = cfg.get(key)
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def drops_of(arch=None, drop=()):
    """The removal list of a preset and/or a custom list, checked; errors name the bad entry."""
    if arch is not None and arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not a known student (known: {', '.join(ARCHS)})")
    out = list(ARCHS[arch]) if arch else []
    for d in drop:
        if not (d in ("pairs", "mid_block", "inner_stage") or re.fullmatch(r"pairs\.\d+", d)):
            raise ValueError(f"drop={d!r} is not a removal (removals: {', '.join(DROP_NAMES)}, N a down stage)")
        if d not in out:
            out.append(d)
    if not out:
        raise ValueError("nothing to remove: give arch (one of " + ", ".join(ARCHS) + ") or a drop list")
    return out


def student_config(teacher, arch=None, drop=()):
    """(student config dict, plan) from a teacher UNet config dict (diffusers' keys).

    plan: {"layers": per down stage (teacher, student), "up_shift": 0 or 1, "mid": bool} for the weight
    mapping and the feature loss."""
    drops = drops_of(arch, drop)
    cfg = {k: v for k, v in teacher.items() if not k.startswith("_")}
    n = len(cfg["down_block_types"])
    layers = _per_block(cfg, "layers_per_block", n)
    new_layers = list(layers)
    for d in drops:
        stages = range(n) if d == "pairs" else [int(d.split(".")[1])] if d.startswith("pairs.") else []
        for i in stages:
            if i >= n:
                raise ValueError(f"drop={d!r}: the teacher has down stages 0..{n - 1}")
            if d != "pairs" and layers[i] < 2:
                raise ValueError(f"drop={d!r}: down stage {i} has {layers[i]} pair; a stage keeps at least one")
            new_layers[i] = max(1, layers[i] - 1)
    cfg["layers_per_block"] = new_layers if len(set(new_layers)) > 1 else new_layers[0]
    had_mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None  # absent: diffusers' default
    mid = had_mid and "mid_block" not in drops
    if not mid:
        cfg["mid_block_type"] = None
    shift = 0
    if "inner_stage" in drops:
        if n < 2:
            raise ValueError("drop='inner_stage': the teacher has one stage; a UNet keeps at least one")
        widths = _per_block(cfg, "block_out_channels", n)
        if widths[-1] != widths[-2]:
            raise ValueError(f"drop='inner_stage': the two innermost stages must be equally wide (SD 1.x/2.x: 1280, "
                             f"1280), as the up path then reads the stage above at the removed one's width; this "
                             f"teacher's block_out_channels are {widths} (SDXL's are: use pairs and mid_block)")
        shift = 1
        for key in PER_DOWN_BLOCK:
            if isinstance(cfg.get(key), (list, tuple)) and key != "layers_per_block":
                cfg[key] = list(cfg[key])[:-1]
        if isinstance(cfg["layers_per_block"], list):
            cfg["layers_per_block"] = cfg["layers_per_block"][:-1]
        if cfg.get("reverse_transformer_layers_per_block") is not None:
            cfg["reverse_transformer_layers_per_block"] = list(cfg["reverse_transformer_layers_per_block"])[1:]
        cfg["down_block_types"] = list(cfg["down_block_types"])[:-1]
        cfg["up_block_types"] = list(cfg["up_block_types"])[1:]
    plan = {"layers": [(layers[i], new_layers[i]) for i in range(n - shift)], "up_shift": shift, "mid": mid,
            "drops": drops}
    if plan["layers"] == [(a, a) for a, _ in plan["layers"]] and mid == had_mid and not shift:
        raise ValueError(f"arch={arch!r} drop={list(drop)!r}: removes nothing from this teacher "
                         f"(layers_per_block {layers}: a one-pair stage cannot lose a pair)")
    return cfg, plan


def teacher_key(key, plan):
    """The teacher's state-dict key a student key is initialised from (the three rules above)."""
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        down = len(plan["layers"]) - 1 - i  # the student's mirrored down stage
        t_up, s_up = plan["layers"][down][0] + 1, plan["layers"][down][1] + 1
        if j == s_up - 1:
            j = t_up - 1
        return f"up_blocks.{i + plan['up_shift']}.{kind}.{j}.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(.*)", key)
    if m:
        return f"up_blocks.{int(m[1]) + plan['up_shift']}.{m[2]}"
    return key


def block_pairs(plan, n_student_down):
    """Matched (student, teacher) block names for the feature loss: every down stage, the mid block when
    both have it, and every up stage with its teacher stage."""
    pairs = [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(n_student_down)]
    if plan["mid"]:
        pairs.append(("mid_block", "mid_block"))
    pairs += [(f"up_blocks.{i}", f"up_blocks.{i + plan['up_shift']}") for i in range(n_student_down)]
    return pairs


def init_from_teacher(student, teacher, plan):
    """Copy the teacher's weights into the student by `teacher_key`; errors name a missing or misshapen key."""
    t_state = teacher.state_dict()
    new = {}
    for key, value in student.state_dict().items():
        src = teacher_key(key, plan)
        if src not in t_state:
            raise KeyError(f"student key {key!r}: the teacher has no {src!r}")
        if t_state[src].shape != value.shape:
            raise ValueError(f"student key {key!r} {tuple(value.shape)} != teacher {src!r} {tuple(t_state[src].shape)}")
        new[key] = t_state[src]
    student.load_state_dict(new)
    return student


def make_student(teacher, arch=None, drop=()):
    """(student UNet2DConditionModel, plan) from a minidiff teacher UNet: config by `student_config`,
    weights by `init_from_teacher`; same dtype and device as the teacher."""
    from ..models.unet import UNet2DConditionModel
    from ..weights.config import config_from_dict
    cfg, plan = student_config(teacher_config_dict(teacher), arch, drop)
    p = next(teacher.parameters())
    student = UNet2DConditionModel(config_from_dict(UNet2DConditionModel.config_class, cfg, where="student config"))
    student.to(device=p.device, dtype=p.dtype)
    return init_from_teacher(student, teacher, plan), plan


def teacher_config_dict(unet):
    """A minidiff UNet's config as a plain dict with diffusers' keys."""
    from dataclasses import asdict
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(unet.config).items()}
