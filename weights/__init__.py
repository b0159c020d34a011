"""Checkpoint I/O: Hub resolution, safetensors reading, configs, key-format conversion."""
from .config import AttrDict, config_from_dict, config_to_dict
from .hub import read_json, resolve_file, resolve_weights
from .load import load_config, load_into, load_model, read_header, read_state_dict, save_model
