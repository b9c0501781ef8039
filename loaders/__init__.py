"""Model references -> built, weight-loaded modules: Hub snapshot resolution, safetensors streaming (sharded,
pinned, cast and fused on load, quantize-on-load), declarative key tables per checkpoint format."""

from dit_rt.loaders.hub import (
    ResolveError,
    config_to_dataclass,
    pipeline_components,
    read_config,
    read_model_index,
    resolve,
)
from dit_rt.loaders.load import LoadReport, build_and_load, load_weights
from dit_rt.loaders.mapping import FLUX_ORIGINAL, FORMATS, WAN_ORIGINAL, KeyMap, detect_format, map_key
from dit_rt.loaders.safetensors_io import CheckpointError, find_weight_files, read_header, scan

__all__ = [
    "FLUX_ORIGINAL",
    "FORMATS",
    "WAN_ORIGINAL",
    "CheckpointError",
    "KeyMap",
    "LoadReport",
    "ResolveError",
    "build_and_load",
    "config_to_dataclass",
    "detect_format",
    "find_weight_files",
    "load_weights",
    "map_key",
    "pipeline_components",
    "read_config",
    "read_header",
    "read_model_index",
    "resolve",
    "scan",
]
