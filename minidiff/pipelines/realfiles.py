"""What the Hub's real files ask of a pipeline beyond what today's save_pretrained writes.

- `variant="fp16"` / `"non_ema"` per component: the repos ship a variant for some folders only (SD 1.5's
  `non_ema` is in `unet/` alone); diffusers takes the variant where a component has it and the plain file
  elsewhere, and says so. `component_variants` decides this per folder.
- Old scheduler configs: diffusers' SD pipelines rewrite `steps_offset != 1` to 1 and `clip_sample: true`
  to false, with a FutureWarning; `rewrite_old_scheduler_config` does the same, with the same words.
- Custom `timesteps`: the scheduler gets `timesteps` alone, never with the default num_inference_steps
  (`set_timesteps`), as diffusers' `retrieve_timesteps` calls it.
"""
import warnings

from ..weights.hub import resolve_weights


def component_variants(repo_or_path, components, variant, allow_pickle=False, where="model_index.json"):
    """{component name: variant or None} for the models `components` ({name: class}) of a repo.

    A component without files of `variant` takes its plain file (a warning names them), as diffusers does;
    a variant that no component has is a ValueError (diffusers' words), naming the variant and the folders.
    """
    if not variant:
        return {name: None for name in components}
    chosen = {}
    for name, klass in components.items():
        try:
            resolve_weights(repo_or_path, klass.weight_names, name, variant, allow_pickle)
            chosen[name] = variant
        except FileNotFoundError:
            chosen[name] = None
    fell_back = sorted(name for name, v in chosen.items() if v is None)
    if components and len(fell_back) == len(components):
        raise ValueError(f"{where}: you are trying to load the model files of the `variant={variant}`, but no such "
                         f"modeling files are available (looked in {', '.join(fell_back)}): pass variant=None")
    if fell_back:
        warnings.warn(f"variant={variant!r}: {', '.join(fell_back)} {'has' if len(fell_back) == 1 else 'have'} no "
                      f"{variant} files; loading the plain files there (a mixture of {variant} and non-{variant} "
                      "files, as diffusers loads it)", UserWarning, stacklevel=3)
    return chosen


def _rewritten(scheduler, key, value):
    """A scheduler of the same class whose config has `key` = `value` (nothing else changes: no scheduler
    precomputes anything from steps_offset or clip_sample)."""
    config = dict(scheduler.config)
    config[key] = value
    config["_use_default_values"] = [k for k in config.get("_use_default_values", ()) if k != key]
    return type(scheduler).from_config(config)


def rewrite_old_scheduler_config(scheduler):
    """diffusers' StableDiffusionPipeline.__init__ rules for configs written before diffusers 0.8: same
    FutureWarnings (text and category), same rewritten values."""
    if scheduler is None or not hasattr(scheduler, "config"):
        return scheduler
    if scheduler.config.get("steps_offset", 1) != 1:
        warnings.warn(
            f"The configuration file of this scheduler: {scheduler} is outdated. `steps_offset`"
            f" should be set to 1 instead of {scheduler.config['steps_offset']}. Please make sure "
            "to update the config accordingly as leaving `steps_offset` might led to incorrect results"
            " in future versions. If you have downloaded this checkpoint from the Hugging Face Hub,"
            " it would be very nice if you could open a Pull request for the `scheduler/scheduler_config.json`"
            " file", FutureWarning, stacklevel=3)
        scheduler = _rewritten(scheduler, "steps_offset", 1)
    if scheduler.config.get("clip_sample", False) is True:
        warnings.warn(
            f"The configuration file of this scheduler: {scheduler} has not set the configuration `clip_sample`."
            " `clip_sample` should be set to False in the configuration file. Please make sure to update the"
            " config accordingly as not setting `clip_sample` in the config might lead to incorrect results in"
            " future versions. If you have downloaded this checkpoint from the Hugging Face Hub, it would be very"
            " nice if you could open a Pull request for the `scheduler/scheduler_config.json` file",
            FutureWarning, stacklevel=3)
        scheduler = _rewritten(scheduler, "clip_sample", False)
    return scheduler
