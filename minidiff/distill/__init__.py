"""Distillation: block-removal students (BK-SDM, Segmind's SD-Small/Tiny) and their trainer
(surgery.py, blocks.py, data.py), the LCM-LoRA trainer (lcm_lora.py), and the DDP helpers both
trainers use (parallel.py)."""
