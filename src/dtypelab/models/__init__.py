"""Models: the built-ins, loading any model spec, its inputs, and inspecting what it holds.

Models stage, above :mod:`dtypelab.checkpoint` and :mod:`dtypelab.quant`: everything that turns what a
user names (``minilm``, a folder, ``package.module:factory``) into a :class:`LoadedModel` and inputs.
"""

from .builtins import (
    BUILTIN_MODELS,
    TINY_LM_CONTEXT,
    BuiltinModel,
    DummyModel,
    builtin_names,
    byte_tokenizer,
    default_input,
    minilm_path,
    output_kind,
    smollm2_gguf,
    tiny_gpt2,
    tiny_llama,
)
from .inputs import default_texts, load_tensor_file, model_inputs, parse_token_ids, to_device, tokenize
from .inspect import bare_checkpoint_path, inspect
from .kinds import ModelKind, OutputKind, model_kind
from .loading import (
    LoadedModel,
    build_model,
    cache_dir,
    cached_gguf_folder,
    device_errors,
    folder_weights,
    gguf_in,
    load,
    load_folder,
    load_gguf,
    load_state_dict_file,
    looks_like_path,
    resolve_factory,
    validate_safetensors,
    validate_token_ids,
)
from .texts import DEFAULT_CTX, TEXT_SETS, calibration_text, evaluation_text, text_set, token_windows

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
