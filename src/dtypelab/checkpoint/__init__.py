"""Checkpoints on disk: safetensors headers, inspection, the compressed-tensors layouts, conversion.

Checkpoint stage, above :mod:`dtypelab.quant`: everything here works from files (headers, byte ranges,
config.json), in constant memory; :mod:`dtypelab.models` builds on it to load folders.
"""

from ..lazy import lazy_exports

_EXPORTS = {  # public name -> the submodule that defines it (imported on first use)
    "linear_layers": "architecture", "model_class": "architecture",
    "ConversionResult": "convert", "convert_checkpoint": "convert",
    "GgufHeader": "gguf_file", "GgufInspection": "gguf_file", "inspect_gguf": "gguf_file",
    "read_gguf_header": "gguf_file",
    "check_model_folder": "guard", "read_json_file": "guard", "refuse_links_outside": "guard",
    "refuse_remote_code": "guard",
    "CheckpointInspection": "inspect", "ShardInfo": "inspect", "TensorRow": "inspect",
    "inspect_checkpoint": "inspect",
    "LAYOUTS": "layouts", "Layout": "layouts", "StoredPart": "layouts", "check_supported": "layouts",
    "compression_format": "layouts", "convert_support": "layouts", "format_from_scheme": "layouts",
    "from_parts": "layouts", "layout_for": "layouts", "quantization_config": "layouts", "register": "layouts",
    "stored_parts": "layouts", "to_parts": "layouts",
    "PICKLE_SUFFIXES": "pickled", "pickle_weights": "pickled", "read_state_dict": "pickled",
    "parse_size": "plan",
    "build_quantized_model": "quantized", "load_quantized_weights": "quantized",
    "quantization_scheme": "quantized",
    "INDEX_SUFFIX": "safetensors_file", "MAX_HEADER_BYTES": "safetensors_file",
    "CheckpointSource": "safetensors_file", "SafetensorsHeader": "safetensors_file",
    "TensorEntry": "safetensors_file", "open_checkpoint": "safetensors_file",
    "read_header": "safetensors_file", "read_index": "safetensors_file",
    "stored_nbytes": "sizes", "stored_numel": "sizes", "weight_stored_nbytes": "sizes",
    "Leftover": "staging", "LeftoverReport": "staging", "StagedOutput": "staging",
    "clean_leftovers": "staging", "find_leftovers": "staging", "remove_leftovers": "staging",
    "ChunkCaster": "streaming", "ChunkQuantizer": "streaming", "one_thread": "streaming",
}

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
