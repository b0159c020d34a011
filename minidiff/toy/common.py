"""What the three training stages share: where the shipped files live (minidiff.assets), seeding, the
learning-rate schedule and the progress line."""
import math
import random
import time

import numpy as np
import torch

from ..assets import LORA_DIR, LORA_FILE, MODEL_DIR  # noqa: F401 (where the stages write what ships)
from ..weights.config import config_from_dict

# Disjoint seeds for every use of the data generator, so that no evaluation ever sees training images.
SEED_VAE_DATA = 1
SEED_UNET_DATA = 2
SEED_LCM_DATA = 3
SEED_SELF_CHECK = 12345
SEED_BENCH = 777


def setup(seed, threads):
    """Seed every generator the stage uses and pin the thread count (the stages are sized for 2 cores)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build(cls, config):
    """A freshly initialised minidiff model from a config dict written with diffusers' keys."""
    return cls(config_from_dict(cls.config_class, config, where=f"{cls.__name__} config"))


def cosine_lr(step, total, base, warmup=100, floor=0.05):
    """Linear warm-up, then cosine decay to `floor` x base."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(total - warmup, 1)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


class Progress:
    """Prints `stage  step i/n  loss (running mean)  lr  elapsed / eta` every `every` steps."""

    def __init__(self, stage, total, every=50):
        self.stage, self.total, self.every = stage, total, every
        self.start = time.perf_counter()
        self.sums = {}
        self.count = 0

    def update(self, step, lr, **losses):
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1
        done = step + 1
        if done % self.every == 0 or done == self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / done * (self.total - done)
            parts = "  ".join(f"{k} {v / self.count:.4f}" for k, v in self.sums.items())
            print(f"[{self.stage}] step {done:5d}/{self.total}  {parts}  lr {lr:.2e}  "
                  f"{elapsed / 60:5.1f} min elapsed, {eta / 60:4.1f} min to go", flush=True)
            self.last = {k: v / self.count for k, v in self.sums.items()}
            self.sums, self.count = {}, 0

    def elapsed(self):
        return time.perf_counter() - self.start
