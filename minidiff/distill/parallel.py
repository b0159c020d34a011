"""Data-parallel training with torch.distributed (DDP), shared by the distillation trainers.

The same script runs in one process (`python train.py`) and under torchrun
(`torchrun --nproc_per_node N train.py`): `init()` reads torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and starts a process group with gloo on CPU or NCCL on CUDA;
without torchrun it does nothing and reports world size 1.

How the global batch is split. A trainer keeps ONE global order of items per step, the same in
every process (drawn from the same seeded generator), and a global batch size B that must be a
multiple of the world size W. `shard(B, rank, W)` gives process `rank` the contiguous slice
[rank*B/W, (rank+1)*B/W) of that step's B items. Each process computes the MEAN loss over its
B/W items; DDP averages the gradients over the W processes, so the gradient is the mean over all B
items, which is what one process computes for a batch of B. Hence 2 processes x batch b equals
1 process x batch 2b, up to float rounding (the sum is taken in a different order). Anything
random per item (noise, timesteps) must be drawn for the whole global batch from the shared
generator and then sliced the same way, so every process draws the same numbers. Logged losses
go through `all_mean` so rank 0 prints the global batch's mean; only rank 0 (`is_main()`) prints
and saves; `barrier()` keeps the others from reading a checkpoint before it is written.
"""
import os

import torch
import torch.distributed as dist


def init():
    """Start the process group if torchrun launched us; return (rank, world_size)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def world():
    """(rank, world_size) of this process: (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main():
    """True on rank 0 (and in a single process): the one that prints and saves."""
    return world()[0] == 0


def shard(n_items, rank, world_size):
    """The slice of a global batch of `n_items` that process `rank` of `world_size` takes.

    Contiguous blocks in the global order, so concatenating the ranks' slices in rank order gives
    the single-process batch back. `n_items` must be a multiple of `world_size`."""
    if n_items % world_size:
        raise ValueError(f"parallel.shard: the global batch size {n_items} is not a multiple of the "
                         f"world size {world_size}; pick a batch size divisible by {world_size}")
    per = n_items // world_size
    return slice(rank * per, (rank + 1) * per)


def wrap(model):
    """DistributedDataParallel around `model` when there is more than one process, else `model`."""
    if world()[1] <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    device = next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model):
    """The module inside a DDP wrapper (or `model` itself)."""
    return getattr(model, "module", model)


def all_mean(tensor):
    """The mean of `tensor` over all processes (a detached copy; itself in one process)."""
    tensor = tensor.detach().clone()
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world()[1]
    return tensor


def barrier():
    """Wait for every process (a no-op in one process)."""
    if world()[1] > 1:
        dist.barrier()


def cleanup():
    """End the process group if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
