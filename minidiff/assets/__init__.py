"""Where the files shipped inside the package live: the small shapes model minidiff trained itself
(minidiff/toy/ made it) and its LCM-LoRA, the default of `minidiff generate`; its distilled student's UNet
(minidiff/distill; `minidiff generate --model small` puts it in the bundled pipeline); CLIP's BPE merges, which
single files (that carry no tokenizer) are given."""
import os

ASSETS = os.path.dirname(os.path.abspath(__file__))
MODEL_DIR = os.path.join(ASSETS, "shapes-sd")
LORA_DIR = os.path.join(ASSETS, "shapes-sd-lcm-lora")
SMALL_UNET_DIR = os.path.join(ASSETS, "shapes-sd-small")  # its distilled student (BK-SDM small): unet/ only
SMALL_LORA_DIR = os.path.join(ASSETS, "shapes-sd-small-lcm-lora")  # the student's LCM-LoRA
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for first
CLIP_MERGES = os.path.join(ASSETS, "clip-bpe", "merges.txt.gz")  # CLIP L / OpenCLIP H / bigG share them
