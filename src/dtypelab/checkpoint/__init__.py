"""Checkpoints on disk: safetensors headers, inspection, the compressed-tensors layouts, conversion.

Checkpoint stage, above :mod:`dtypelab.quant`: everything here works from files (headers, byte ranges,
config.json), in constant memory; :mod:`dtypelab.models` builds on it to load folders.
"""

from .architecture import linear_layers, model_class
from .convert import ConversionResult, convert_checkpoint
from .gguf_file import GgufHeader, GgufInspection, inspect_gguf, read_gguf_header
from .guard import check_model_folder, read_json_file, refuse_links_outside, refuse_remote_code
from .inspect import CheckpointInspection, ShardInfo, TensorRow, inspect_checkpoint
from .layouts import (
    LAYOUTS,
    Layout,
    StoredPart,
    check_supported,
    compression_format,
    convert_support,
    format_from_scheme,
    from_parts,
    layout_for,
    quantization_config,
    register,
    stored_parts,
    to_parts,
)
from .pickled import PICKLE_SUFFIXES, pickle_weights, read_state_dict
from .plan import parse_size
from .quantized import build_quantized_model, load_quantized_weights, quantization_scheme
from .safetensors_file import (
    INDEX_SUFFIX,
    MAX_HEADER_BYTES,
    CheckpointSource,
    SafetensorsHeader,
    TensorEntry,
    open_checkpoint,
    read_header,
    read_index,
)
from .sizes import stored_nbytes, stored_numel, weight_stored_nbytes
from .staging import Leftover, LeftoverReport, StagedOutput, clean_leftovers, find_leftovers, remove_leftovers
from .streaming import ChunkCaster, ChunkQuantizer, one_thread

__all__ = [
    "PICKLE_SUFFIXES", "pickle_weights", "read_state_dict",
    "INDEX_SUFFIX", "LAYOUTS", "MAX_HEADER_BYTES", "CheckpointInspection", "CheckpointSource", "ChunkCaster",
    "ChunkQuantizer", "ConversionResult", "GgufHeader", "GgufInspection",
    "Layout", "Leftover", "LeftoverReport", "SafetensorsHeader", "ShardInfo", "StagedOutput",
    "StoredPart", "TensorEntry", "TensorRow", "build_quantized_model", "check_supported",
    "clean_leftovers", "compression_format", "convert_checkpoint", "convert_support", "format_from_scheme",
    "from_parts",
    "find_leftovers", "inspect_checkpoint", "inspect_gguf",
    "layout_for", "linear_layers", "load_quantized_weights", "model_class", "one_thread", "open_checkpoint",
    "parse_size", "quantization_config", "quantization_scheme", "read_gguf_header", "read_header",
    "read_index", "register", "check_model_folder", "read_json_file", "refuse_links_outside",
    "refuse_remote_code",
    "remove_leftovers", "stored_nbytes", "stored_numel", "stored_parts", "to_parts", "weight_stored_nbytes",
]
