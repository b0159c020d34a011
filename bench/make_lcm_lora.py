"""A LoRA file shaped like latent-consistency/lcm-lora-sdv1-5 (kohya keys with diffusers module paths,
rank 64, alpha 8) with seeded random values, for benchmarking the LCM-LoRA path on random weights."""
import torch
from safetensors.torch import save_file

from minidiff import UNet2DConditionModel
from minidiff.weights import load_config

# what LCM-LoRA adapts: attention projections, transformer in/out, feed-forward, resnet convs and
# time projections, shortcuts, down/upsamplers
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
           "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")


def write_lcm_lora(unet_folder, path, rank=64, alpha=8.0, seed=0):
    with torch.device("meta"):
        unet = UNet2DConditionModel(load_config(UNet2DConditionModel.config_class, unet_folder))
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in unet.named_modules():
        if not name.startswith(("down_blocks", "mid_block", "up_blocks")) or not name.endswith(TARGETS):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(m, torch.nn.Linear):
            down, up = (rank, m.in_features), (m.out_features, rank)
        elif isinstance(m, torch.nn.Conv2d):
            down, up = (rank, m.in_channels, *m.kernel_size), (m.out_channels, rank, 1, 1)
        else:
            continue
        sd[f"{key}.lora_down.weight"] = torch.randn(down, generator=g) * 0.01
        sd[f"{key}.lora_up.weight"] = torch.randn(up, generator=g) * 0.01
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(sd, path)
    return path
