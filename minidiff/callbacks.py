"""The step-end callbacks diffusers ships, with its names: a callback is called after each denoising step as
`callback(pipeline, step_index, timestep, callback_kwargs)` and returns the (possibly changed) tensors.

Classifier-free guidance cut-off (the "CFG cut-off" of diffusers' callback guide): after a given step the
pipeline keeps only the conditional half of the embeddings and sets its guidance scale to 0, so the rest of
the loop runs one UNet pass per step instead of two.
"""
from .weights.config import AttrDict


class PipelineCallback:
    """Base of the shipped callbacks: `tensor_inputs` names what the callback reads, `callback_fn` does the work.
    The cut-off step is `cutoff_step_index`, or `int(num_timesteps * cutoff_step_ratio)`."""

    tensor_inputs = []

    def __init__(self, cutoff_step_ratio=1.0, cutoff_step_index=None):
        if (cutoff_step_ratio is None) == (cutoff_step_index is None):
            raise ValueError("pass either cutoff_step_ratio or cutoff_step_index (exactly one; the other None)")
        if cutoff_step_ratio is not None and not (isinstance(cutoff_step_ratio, float)
                                                  and 0.0 <= cutoff_step_ratio <= 1.0):
            raise ValueError(f"cutoff_step_ratio={cutoff_step_ratio!r} must be a float in [0, 1]")
        self.config = AttrDict(cutoff_step_ratio=cutoff_step_ratio, cutoff_step_index=cutoff_step_index)

    def cutoff_step(self, pipeline):
        if self.config.cutoff_step_index is not None:
            return self.config.cutoff_step_index
        return int(pipeline.num_timesteps * self.config.cutoff_step_ratio)

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        raise NotImplementedError(f"{type(self).__name__} must implement callback_fn")

    def __call__(self, pipeline, step_index, timestep, callback_kwargs):
        return self.callback_fn(pipeline, step_index, timestep, callback_kwargs)


class MultiPipelineCallbacks:
    """Several callbacks called in order, each receiving the tensors the previous one returned."""

    def __init__(self, callbacks):
        self.callbacks = list(callbacks)

    @property
    def tensor_inputs(self):
        return [name for cb in self.callbacks for name in cb.tensor_inputs]

    def __call__(self, pipeline, step_index, timestep, callback_kwargs):
        for cb in self.callbacks:
            callback_kwargs = cb(pipeline, step_index, timestep, callback_kwargs)
        return callback_kwargs


class _CFGCutoff(PipelineCallback):
    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == self.cutoff_step(pipeline):
            for name in self.tensor_inputs:
                # the guided batch is [unconditional, conditional]: keep the last entry, the conditional one
                callback_kwargs[name] = callback_kwargs[name][-1:]
            pipeline._guidance_scale = 0.0
        return callback_kwargs


class SDCFGCutoffCallback(_CFGCutoff):
    """Stable Diffusion 1.x/2.x: guidance off after the cut-off step."""
    tensor_inputs = ["prompt_embeds"]


class SDXLCFGCutoffCallback(_CFGCutoff):
    """SDXL: guidance off after the cut-off step (text embeddings, pooled embeddings and time ids)."""
    tensor_inputs = ["prompt_embeds", "add_text_embeds", "add_time_ids"]
