"""Models: the built-ins, loading any model spec, its inputs, and inspecting what it holds.

Models stage, above :mod:`dtypelab.checkpoint` and :mod:`dtypelab.quant`: everything that turns what a
user names (``minilm``, a folder, ``package.module:factory``) into a :class:`LoadedModel` and inputs.
"""

from ..lazy import lazy_exports

_EXPORTS = {  # public name -> the submodule that defines it (imported on first use)
    "BUILTIN_MODELS": "builtins", "TINY_LM_CONTEXT": "builtins", "BuiltinModel": "builtins",
    "DummyModel": "builtins", "builtin_names": "defaults", "byte_tokenizer": "builtins",
    "default_input": "builtins", "minilm_path": "builtins", "output_kind": "builtins",
    "smollm2_gguf": "builtins", "tiny_gpt2": "builtins", "tiny_llama": "builtins",
    "default_texts": "inputs", "load_tensor_file": "inputs", "model_inputs": "inputs",
    "parse_token_ids": "inputs", "to_device": "inputs", "tokenize": "inputs",
    "bare_checkpoint_path": "inspection", "inspect": "inspection",
    "ModelKind": "kinds", "OutputKind": "kinds", "model_kind": "kinds",
    "LoadedModel": "loading", "build_model": "loading", "cache_dir": "loading",
    "cached_gguf_folder": "loading", "device_errors": "loading", "folder_weights": "loading",
    "gguf_in": "loading", "load": "loading", "load_folder": "loading", "load_gguf": "loading",
    "load_state_dict_file": "loading", "looks_like_path": "loading", "resolve_factory": "loading",
    "validate_safetensors": "loading", "validate_token_ids": "loading",
    "DEFAULT_CTX": "texts", "TEXT_SETS": "texts", "calibration_text": "texts", "evaluation_text": "texts",
    "text_set": "texts", "token_windows": "texts",
}

__all__ = [
    "BUILTIN_MODELS", "DEFAULT_CTX", "TEXT_SETS", "TINY_LM_CONTEXT", "BuiltinModel", "DummyModel",
    "LoadedModel", "ModelKind", "OutputKind", "bare_checkpoint_path", "build_model", "builtin_names",
    "byte_tokenizer", "calibration_text", "default_input", "default_texts", "device_errors",
    "evaluation_text", "folder_weights", "inspect", "load", "load_folder", "load_state_dict_file",
    "load_tensor_file", "looks_like_path", "minilm_path", "model_inputs", "model_kind", "output_kind",
    "parse_token_ids", "resolve_factory", "text_set", "tiny_gpt2", "tiny_llama", "to_device",
    "token_windows", "tokenize", "validate_safetensors", "validate_token_ids",
    "cache_dir", "cached_gguf_folder", "gguf_in", "load_gguf", "smollm2_gguf",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
