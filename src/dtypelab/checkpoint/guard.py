"""What a model folder may ask of dtypelab: no code of its own, regular files, bounded JSON and sizes.

Checkpoint stage, below every reader: a folder is data, never a program. Its ``config.json`` and
``tokenizer_config.json`` are read here first, and refused in one line, before transformers sees them, when
they ask to run the folder's own Python code (``auto_map``, or a ``model_type`` transformers does not know,
which only remote code could build), hold values of the wrong type or out of range, or describe a model far
larger than the folder's weights could fill (building it alone would take minutes and gigabytes).
The limits are module constants, listed in the README's section "What dtypelab will and will not read
or run".
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Collection
from pathlib import Path

import torch

from ..errors import CheckpointError, ModelSpecError

MAX_JSON_BYTES = 100_000_000
"""Largest config, tokenizer config or index file read, in bytes (safetensors' own header limit)."""

MAX_JSON_DEPTH = 64
"""Deepest nesting accepted in a config, tokenizer config or index (real ones nest 3-5 levels)."""

MAX_CONFIG_DIMENSION = 2**31 - 1
"""Largest value of a size in config.json (hidden_size, num_hidden_layers, vocab_size ...)."""

PARAMS_PER_STORED_BYTE = 16
"""A config may imply at most this many parameters per byte of the folder's weight files (a 1-bit
format would hold 8), plus :data:`PARAMS_SLACK`."""

PARAMS_SLACK = 2**26
"""Parameters a config may imply beyond :data:`PARAMS_PER_STORED_BYTE` (67 M: small test models)."""

REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")

RUN_YOUR_CODE = ("dtypelab never runs code from a model folder; run your own code only through an explicit "
                 "package.module:factory spec")

_SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer", "num_layers",
              "num_attention_heads", "n_head", "num_key_value_heads", "intermediate_size", "n_inner",
              "ffn_dim", "vocab_size", "max_position_embeddings", "n_positions", "head_dim")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def check_model_folder(folder: Path, known_model_types: Collection[str] = ()) -> dict:
    """Refuse a folder whose config.json or tokenizer_config.json asks for what dtypelab never does.

    ``known_model_types``: model types the caller knows transformers has, looked up without importing
    transformers (a quantized convert's fast path never imports it).

    Returns:
        config.json as a dict (already checked: no remote code, sizes of the right type, a model the
        folder's weight files could hold).

    Raises:
        ModelSpecError: remote code asked for, a value of the wrong type or out of range, or a model
            implying more parameters than :data:`PARAMS_PER_STORED_BYTE` per stored byte allows.
        CheckpointError: a file that is not a regular file, too large or nested too deep, or not JSON.
    """
    config_path = folder / "config.json"
    config = read_json_file(config_path)
    if not isinstance(config, dict):
        raise ModelSpecError(f"{config_path}: not a JSON object: fix it or re-save the model")
    refuse_remote_code(config_path, config, known_model_types)
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.exists():
        refuse_remote_code(tokenizer_config, read_json_file(tokenizer_config))
    check_config_values(config_path, config)
    check_implied_size(config_path, config, weight_bytes(folder))
    return config


def refuse_remote_code(path: Path, config: object, known_model_types: Collection[str] = ()) -> None:
    """Refuse ``auto_map`` (classes in the folder's own ``.py`` files) and, in config.json, a
    ``model_type`` this transformers does not know (only the folder's code could build it)."""
    if not isinstance(config, dict):
        return
    if "auto_map" in config:
        raise ModelSpecError(f"{path}: the folder asks to run its own Python code (auto_map): "
                             f"{RUN_YOUR_CODE}")
    if path.name == "config.json" and "model_type" in config:
        model_type = config["model_type"]
        known = isinstance(model_type, str) and (model_type in known_model_types
                                                 or _known_model_type(model_type))
        if not known:
            raise ModelSpecError(f"{path}: model_type {model_type!r} is not one transformers knows, so only "
                                 f"the folder's own code could build it: {RUN_YOUR_CODE}")


def _known_model_type(model_type: str) -> bool:
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:
        return True  # transformers absent: it will be named as missing where it is needed
    return model_type in CONFIG_MAPPING


def check_config_values(path: Path, config: dict) -> None:
    """Sizes are integers from 1 to :data:`MAX_CONFIG_DIMENSION`, the width divides into the heads,
    ``architectures`` names model classes, ``torch_dtype`` a torch dtype, ``quantization_config`` an
    object: transformers would otherwise fail deep inside with a traceback, or build nonsense."""
    for key in _SIZE_KEYS:
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 1 <= value <= MAX_CONFIG_DIMENSION):
            raise ModelSpecError(f"{path}: {key} is {value!r}: it must be an integer from 1 to "
                                 f"{MAX_CONFIG_DIMENSION}; fix config.json")
    width, heads = _first(config, "hidden_size", "n_embd", "d_model"), _first(config, "num_attention_heads",
                                                                              "n_head")
    if width and heads and width % heads:
        raise ModelSpecError(f"{path}: hidden size {width} does not divide into {heads} attention heads: "
                             "fix config.json")
    _check_architectures(path, config.get("architectures"))
    for key in ("torch_dtype", "dtype"):
        if config.get(key) is not None and not _is_dtype_name(config[key]):
            raise ModelSpecError(f"{path}: {key} {config[key]!r} is not a torch dtype (e.g. \"float32\", "
                                 "\"bfloat16\"): fix config.json")
    if config.get("quantization_config") is not None and not isinstance(config["quantization_config"], dict):
        raise ModelSpecError(f"{path}: quantization_config must be an object, not "
                             f"{config['quantization_config']!r}: fix or remove it")


def _check_architectures(path: Path, architectures: object) -> None:
    """A list of names; that each names a model class is checked where the class is looked up
    (:func:`~dtypelab.checkpoint.model_class`), so a convert that never builds the model never imports
    transformers."""
    if architectures is None:
        return
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ModelSpecError(f"{path}: architectures must be a list of model class names: fix config.json")


def _is_dtype_name(value: object) -> bool:
    if not isinstance(value, str):
        return False
    name = value.removeprefix("torch.")
    return name == "auto" or (name.isidentifier() and isinstance(getattr(torch, name, None), torch.dtype))


def _first(config: dict, *keys: str) -> int | None:
    return next((config[k] for k in keys if isinstance(config.get(k), int)), None)


def check_implied_size(path: Path, config: dict, stored_bytes: int) -> None:
    """Refuse a config implying more parameters than the weight files could hold, before a model is built
    (``num_hidden_layers: 1e7`` takes minutes to build even on the meta device)."""
    implied = implied_parameters(config)
    bound = PARAMS_PER_STORED_BYTE * stored_bytes + PARAMS_SLACK
    if implied > bound:
        raise ModelSpecError(f"{path}: the config describes ~{implied:.3g} parameters, but the folder's "
                             f"weight files hold {stored_bytes} bytes (at most {bound:.3g} parameters at "
                             f"{PARAMS_PER_STORED_BYTE} per byte): config.json does not match the weights")


def implied_parameters(config: dict) -> int:
    """A transformer's parameter count from its config (per layer 4·h² attention + 3·h·I MLP, plus input
    and output embeddings): ordinary decoders' count but for norms and biases, enough to catch absurd
    sizes."""
    width = _first(config, "hidden_size", "n_embd", "d_model") or 0
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers") or 0
    inner = _first(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * width
    vocab = _first(config, "vocab_size") or 0
    return layers * (4 * width * width + 3 * width * inner) + 2 * vocab * width


def weight_bytes(folder: Path) -> int:
    """Bytes of the folder's weight files (safetensors, pickles, GGUF), from their sizes alone."""
    total = 0
    for entry in os.scandir(folder):
        if entry.name.endswith(_WEIGHT_SUFFIXES) and entry.is_file():
            total += entry.stat().st_size
    return total


def refuse_links_outside(folder: Path, paths: list[Path]) -> None:
    """Refuse a file of ``folder`` that is a symlink resolving outside it, before it is read or copied as
    content (a ``notes.txt`` pointing at ``~/.ssh/id_rsa`` would land in the output, a shard linked to
    another model would be read as this one). A Hugging Face cache snapshot's links into its
    repository's ``blobs/`` stay inside the repository and are allowed."""
    root = folder.resolve()
    allowed = root.parent.parent if root.parent.name == "snapshots" else root
    for path in paths:
        target = path.resolve()  # a link anywhere on the way (a linked subfolder too) is followed here
        if not target.is_relative_to(allowed):
            raise CheckpointError(f"{path}: a symlink to {target}, outside the source folder: dtypelab never "
                                  "reads or copies files from outside the source; replace the link with the "
                                  "file or remove it")


def open_regular(path: Path):
    """Open ``path`` for reading, refusing anything but a regular file (a FIFO would block forever, a
    device never end) before a byte is read: opened non-blocking, then checked with ``fstat``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open for reading ({exc.strerror}): check the path") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file (a FIFO, device or socket): dtypelab reads only "
                              "regular files; replace it with the real file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_json_file(path: Path) -> object:
    """A JSON file of a model folder, bounded: a regular file of at most :data:`MAX_JSON_BYTES`, nested at
    most :data:`MAX_JSON_DEPTH` deep (Python's parser would raise RecursionError near 1,000)."""
    with open_regular(path) as handle:
        if os.fstat(handle.fileno()).st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: larger than the {MAX_JSON_BYTES}-byte limit for JSON files: "
                                  "not a model's file, or a hostile one")
        raw = handle.read()
    return parse_json(path, raw)


def parse_json(path: Path, raw: bytes, object_pairs_hook=None) -> object:
    """Parse ``raw`` as JSON, one CheckpointError line for bad UTF-8, bad JSON or too deep a nesting."""
    try:
        parsed = json.loads(raw.decode("utf-8"), object_pairs_hook=object_pairs_hook)
    except RecursionError:
        parsed = None
        depth = math.inf
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}): the file is damaged or not what its name "
                              "says; re-download or re-save it") from None
    else:
        depth = json_depth(parsed)
    if depth > MAX_JSON_DEPTH:
        raise CheckpointError(f"{path}: JSON nested deeper than the {MAX_JSON_DEPTH}-level limit: "
                              "damaged or hostile; do not load it")
    return parsed


def json_depth(value: object) -> int:
    """How deep lists and objects nest in ``value`` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            return depth
        stack.extend((child, depth + 1) for child in children)
    return deepest
