"""Loading any model spec — built-in, Hugging Face folder, checkpoint file, factory — to a LoadedModel.

Models stage, above :mod:`dtypelab.checkpoint` (safetensors validation, compressed-tensors folders) and
:mod:`dtypelab.quant` (loading a built-in straight into a dtype is :func:`~dtypelab.quant.cast_model`).
``package.module:factory`` imports and runs user code, so it is only accepted in that explicit form;
pickles only with ``allow_pickle``, through ``torch.load(weights_only=True)``. A ``.gguf`` file is read by
transformers' GGUF path (dequantized, a causal LM); a built-in whose weights are a GGUF (``smollm2``) is
dequantized once into an ordinary folder in the cache (:func:`cache_dir`), which later loads read.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import settings
from ..checkpoint import (
    PICKLE_SUFFIXES,
    build_quantized_model,
    check_model_folder,
    model_class,
    quantization_scheme,
    read_index,
    read_json_file,
    read_state_dict,
    refuse_links_outside,
    refuse_remote_code,
)
from ..errors import (
    CheckpointError,
    DtypelabError,
    InputError,
    ModelSpecError,
    NotRunnableError,
    did_you_mean,
    first_line,
)
from ..progress import ProgressCallback, stage
from ..quant import cast_model, compute_dtype
from .builtins import BUILTIN_MODELS, default_input
from .defaults import builtin_names
from .kinds import ModelKind, OutputKind, model_kind


def resolve_factory(spec: str) -> Callable[[], nn.Module]:
    """Return the factory for a built-in name or an explicit ``package.module:factory``."""
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec].factory
    if ":" not in spec:
        raise ModelSpecError(f"unknown model {spec!r}{did_you_mean(spec, builtin_names())}: use a built-in "
                             f"({', '.join(builtin_names())}), a Hugging Face model folder or repo id, or "
                             "'package.module:factory' to run your own code")
    return _import_factory(spec)


def _import_factory(spec: str) -> Callable[[], nn.Module]:
    """Import the factory, looking in the current folder too (as ``python -m`` does, so the README's
    ``mymodels:build`` works from the console script): appended to ``sys.path``, so it never shadows
    an installed package."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelSpecError(f"cannot import factory {spec!r} ({exc}): check the module is importable "
                             "and the name after ':' exists") from exc
    if not callable(factory):
        raise ModelSpecError(f"{spec!r} is not callable: point to a function or class that builds the model")
    return factory


def build_model(spec: str) -> nn.Module:
    """Build the model named by ``spec`` (see :func:`resolve_factory`) in eval mode; a built-in that is a
    folder of weights (``minilm``) is loaded from it in float32."""
    if spec in BUILTIN_MODELS and BUILTIN_MODELS[spec].factory is None:
        return load(spec, "fp32").model
    model = resolve_factory(spec)()
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def validate_token_ids(model: nn.Module, input_ids: torch.Tensor) -> None:
    """Refuse ids outside the model's vocabulary before an index error deep in the forward."""
    embedding = _input_embedding(model)
    if embedding is None or input_ids.numel() == 0:
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= embedding.num_embeddings:
        raise InputError(f"token id {high if high >= embedding.num_embeddings else low} is outside the "
                         f"vocabulary: use ids from 0 to {embedding.num_embeddings - 1}")


def _input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The token embedding: transformers' ``get_input_embeddings()`` (which raises NotImplementedError
    for models it cannot resolve), else the first ``nn.Embedding``."""
    try:
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:
        embedding = None
    if isinstance(embedding, nn.Embedding):
        return embedding
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)




TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


@dataclass
class LoadedModel:
    """A model ready to run, with what dtypelab needs to feed it and read its output.

    Args:
        spec: what was asked for (built-in name, path or ``package.module:factory``).
        model: the module, in eval mode, on the requested device.
        kind: the :class:`ModelKind`: causal-lm (next-token metrics apply), transformers (another
            Hugging Face model, e.g. a sentence encoder) or module (plain torch); known once, here.
        output_kind: the :class:`OutputKind` (see :func:`dtypelab.compare_models`).
        tokenizer: a transformers tokenizer, or None when the model takes token ids only.
        default_input: token ids used when nothing is given and there is no tokenizer.
    """

    spec: str
    model: nn.Module
    kind: ModelKind
    output_kind: OutputKind = OutputKind.AUTO
    tokenizer: object | None = None
    default_input: torch.Tensor | None = None

    @property
    def max_length(self) -> int | None:
        """Longest input in tokens the model accepts (None when it does not say)."""
        config = getattr(self.model, "config", None)
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    @property
    def device(self) -> torch.device:
        """Where the model's first parameter (or buffer) lives; inputs are built there."""
        first = next(self.model.parameters(), None)
        if first is None:
            first = next(self.model.buffers(), None)
        return first.device if first is not None else torch.device("cpu")


def load(spec: str, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu", *,
         allow_pickle: bool = False, progress: ProgressCallback | None = None) -> LoadedModel:
    """Load a model by built-in name, Hugging Face folder or ``package.module:factory``.

    Args:
        spec: ``dummy``, ``minilm``, ``smollm2``, ``tiny-llama``, ``tiny-gpt2``; a folder with
            ``config.json`` and safetensors weights (one file, or shards with
            ``model.safetensors.index.json``); a ``.gguf`` file, or a folder holding one and no
            config.json (dequantized by transformers, see :func:`load_gguf`); or
            ``package.module:factory`` (imports and runs your code).
        dtype: ``"auto"`` keeps the checkpoint's dtype; a format name (``"fp16"``, ``"bf16"`` …)
            loads a Hugging Face checkpoint tensor by tensor straight into that dtype, so no float32
            copy is made first. Built-in random models are initialised in float32, then cast.
        device: where the model lives (``"cpu"``, ``"cuda"`` …).
        allow_pickle: accept ``pytorch_model.bin`` weights, read with ``torch.load(weights_only=True)``.
        progress: a :data:`~dtypelab.progress.ProgressCallback`, told when loading starts and ends
            (stage ``load``, 2 steps: read, moved to ``device``); returning False cancels.

    Returns:
        A :class:`LoadedModel`. A bare ``.safetensors`` file or a folder of weights without
        ``config.json`` raises :class:`~dtypelab.errors.NotRunnableError` (use :func:`inspect`); a
        checkpoint missing a weight or holding one in the wrong shape raises ``CheckpointError``; a
        device torch cannot use raises ``InputError``.

    Example:
        >>> load("tiny-llama", dtype="bf16").model.dtype
        torch.bfloat16
    """
    bar = stage(progress, "load", "steps", 2)
    loaded = _load_builtin(spec, dtype) if spec in BUILTIN_MODELS else _load_other(spec, dtype, allow_pickle)
    bar.advance(detail=spec)
    _move(loaded.model, device)
    bar.advance(detail=str(device))
    return loaded


def _move(model: nn.Module, device: str | torch.device) -> None:
    with device_errors(device, "the model"):
        model.to(device)


@contextlib.contextmanager
def device_errors(device: str | torch.device, what: str) -> Iterator[None]:
    """Turn torch's error for a device it does not know or cannot reach (no CUDA, no MPS in this build,
    ``cuda:99``) into one :class:`InputError` line naming ``what`` was being moved."""
    try:
        yield
    except (RuntimeError, AssertionError, ValueError) as exc:  # torch asserts when built without CUDA
        raise InputError(f"cannot put {what} on device {str(device)!r} ({first_line(exc)}): "
                         "use cpu, or cuda / cuda:N where torch sees a GPU") from exc


def _load_builtin(spec: str, dtype: str | torch.dtype) -> LoadedModel:
    entry = BUILTIN_MODELS[spec]
    if entry.folder is not None:
        source = Path(entry.folder())
        folder = cached_gguf_folder(source) if source.suffix == ".gguf" else source
        loaded = load_folder(folder, dtype)
        loaded.spec, loaded.output_kind = spec, entry.output_kind  # the registry's word, as for the others
        return loaded
    model = _in_dtype(build_model(spec), dtype)
    tokenizer = entry.tokenizer() if entry.tokenizer else None
    return LoadedModel(spec, model, model_kind(model), entry.output_kind, tokenizer, default_input(spec))


def _in_dtype(model: nn.Module, dtype: str | torch.dtype) -> nn.Module:
    return model if dtype == "auto" else cast_model(model, dtype).eval()


def _load_other(spec: str, dtype: str | torch.dtype, allow_pickle: bool) -> LoadedModel:
    path = Path(spec).expanduser()
    if path.exists():
        return _load_path(path, dtype, allow_pickle)
    cached = hf_cached_snapshot(spec)
    if cached is not None:
        return _load_path(cached, dtype, allow_pickle)
    if looks_like_path(spec):
        raise ModelSpecError(f"no such file or folder {spec!r}: give a Hugging Face model folder "
                             f"(config.json + safetensors) or a built-in name ({', '.join(builtin_names())})")
    model = _in_dtype(build_model(spec), dtype)
    return LoadedModel(spec, model, model_kind(model))


REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""A Hugging Face repo id (``owner/name``): looked up in the local Hugging Face cache."""


def hf_cached_snapshot(spec: str) -> Path | None:
    """The local snapshot folder of a Hugging Face repo id (``me/tiny``) in the Hugging Face cache
    (``HF_HUB_CACHE`` / ``HF_HOME``), never downloaded: nothing downloads at run time, whatever
    ``HF_HUB_OFFLINE`` says. None when ``spec`` is no repo id or ``huggingface_hub`` is absent.

    Raises:
        ModelSpecError: a repo id that is not in the cache, with the ``hf download`` command that puts
            it there.
    """
    if not REPO_ID.fullmatch(spec) or Path(spec).expanduser().exists():
        return None
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        offline = " (HF_HUB_OFFLINE is set: download it where the network is allowed)" if os.environ.get(
            "HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") else ""
        raise ModelSpecError(f"{spec!r} is neither a file nor a folder here, nor a Hugging Face repo in the "
                             f"local cache: download it once with `hf download {spec}`"
                             f"{offline}, or give the model folder") from exc


def looks_like_path(spec: str) -> bool:
    """A spec meant as a file or folder (not a built-in name or ``package.module:factory``)."""
    if "/" in spec or "\\" in spec or spec.startswith((".", "~")):
        return True
    return Path(spec).suffix in (".safetensors", ".json", ".gguf", *PICKLE_SUFFIXES)


def _load_path(path: Path, dtype: str | torch.dtype, allow_pickle: bool) -> LoadedModel:
    gguf = gguf_in(path)
    if gguf is not None:
        return load_gguf(gguf, dtype)
    if path.is_dir():
        return load_folder(path, dtype, allow_pickle=allow_pickle)
    if path.suffix == ".safetensors" or (path.suffix in PICKLE_SUFFIXES and allow_pickle):
        raise NotRunnableError(f"{path} holds weights without a config.json, so it can be inspected "
                               f"(dtypelab inspect {path}) but not run: give the model folder with its "
                               "config.json")
    if path.suffix in PICKLE_SUFFIXES:
        raise pickle_refused(path)
    raise ModelSpecError(f"{path} is not a model: give a Hugging Face model folder (config.json + "
                         "safetensors), a .safetensors or .gguf file, or a built-in name")


def pickle_refused(path: Path) -> ModelSpecError:
    return ModelSpecError(f"{path} is a pickle, which can run code when read: pass --allow-pickle "
                          "(allow_pickle=True) to read it with torch.load(weights_only=True), "
                          "or convert it to safetensors")


def load_folder(path: Path, dtype: str | torch.dtype = "auto", *, allow_pickle: bool = False) -> LoadedModel:
    """Load a Hugging Face model folder with transformers, straight into ``dtype`` (see :func:`load`)."""
    safetensors_files, pickles = folder_weights(path)
    if not (path / "config.json").is_file():
        if safetensors_files or pickles:
            raise NotRunnableError(f"folder {path} holds weights but no config.json, so it can be inspected "
                                   f"(dtypelab inspect {path}) but not run: add the model's config.json")
        raise ModelSpecError(f"folder {path} has no config.json and no weights: give a folder written by "
                             "save_pretrained (config.json + model.safetensors) or a built-in name")
    if not safetensors_files:
        if not pickles:
            raise ModelSpecError(f"folder {path} has config.json but no weights: add model.safetensors "
                                 "(or its shards and model.safetensors.index.json)")
        if not allow_pickle:
            raise pickle_refused(pickles[0])
    refuse_links_outside(path, [p for p in path.iterdir() if p.is_file()])  # all transformers may read
    check_model_folder(path)  # the folder's own code never runs; absurd sizes refused before a build
    validate_safetensors(path, safetensors_files)
    return _from_pretrained(path, dtype, use_safetensors=bool(safetensors_files))


def folder_weights(path: Path) -> tuple[list[Path], list[Path]]:
    """The safetensors files and the pickle weight files directly inside ``path``."""
    files = sorted(p for p in path.iterdir() if p.is_file())
    return [p for p in files if p.suffix == ".safetensors"], [p for p in files if p.suffix in PICKLE_SUFFIXES]


def validate_safetensors(folder: Path, files: list[Path]) -> None:
    """Refuse a missing shard or a corrupt / truncated file before transformers reads any weights.

    The safetensors library checks each header (JSON, offsets, file length) when the file is opened.
    """
    from safetensors import SafetensorError, safe_open

    for shard in _index_shards(folder):
        if not (folder / shard).is_file():
            raise CheckpointError(f"shard {shard} listed in {folder / 'model.safetensors.index.json'} is "
                                  "missing: copy every shard the index names into the folder")
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except SafetensorError as exc:
            raise CheckpointError(f"corrupt or truncated safetensors file {file} ({exc}): "
                                  "re-save or re-download it") from exc


def _index_shards(folder: Path) -> set[str]:
    """The shard names the index lists, each a plain file name inside the folder (as convert requires)."""
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return set()
    return set(read_index(index)[0].values())


def _from_pretrained(path: Path, dtype: str | torch.dtype, use_safetensors: bool) -> LoadedModel:
    model = _read_pretrained(path, "auto" if dtype == "auto" else compute_dtype(dtype), use_safetensors)
    kind = model_kind(model)
    if kind == ModelKind.CAUSAL_LM:
        model.config.use_cache = False  # compare needs logits only; no key/value cache in the output
    output = OutputKind.LOGITS if kind == ModelKind.CAUSAL_LM else OutputKind.AUTO
    return LoadedModel(str(path), model.eval(), kind, output, _folder_tokenizer(path))


def _read_pretrained(path: Path, torch_dtype: str | torch.dtype, use_safetensors: bool) -> nn.Module:
    """``from_pretrained`` of the config's class; a weight missing from the checkpoint or of the wrong
    shape is an error (transformers would initialise it at random and only log it)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
        scheme = quantization_scheme(config)
        if scheme is not None:  # compressed-tensors: dtypelab's own quantized modules, no extra package
            return build_quantized_model(path, config, scheme, model_class(config),
                                         None if torch_dtype == "auto" else torch_dtype)
        with _no_progress_bars():
            model, info = model_class(config).from_pretrained(
                path, dtype=torch_dtype, use_safetensors=use_safetensors, output_loading_info=True,
                ignore_mismatched_sizes=True, trust_remote_code=False)
    except DtypelabError:
        raise  # already one clear line (the compressed loader checks completeness itself)
    except Exception as exc:  # noqa: BLE001 - a bad config raises many types (huggingface_hub's validation
        # errors are bare Exceptions); each is one line
        reason = first_line(exc)
        raise ModelSpecError(f"transformers cannot load {path} ({reason}): check config.json matches "
                             "the weights and that your transformers version knows the architecture") from exc
    _refuse_incomplete(path, info)
    return model


def _refuse_incomplete(path: Path, info: dict) -> None:
    """Refuse weights the checkpoint lacks (``missing_keys``) or holds in another shape."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    for problem, names in (("lacks", missing), ("has a wrong shape for", mismatched)):
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise CheckpointError(f"the checkpoint in {path} {problem} {names[0]}{more}, which transformers "
                                  "would fill with random values: check config.json matches the weights")


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' "Loading weights" bar for one call, then restore the user's setting."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _folder_tokenizer(path: Path) -> object | None:
    """The folder's own tokenizer; None when it has no tokenizer files, an error when they are broken."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - tokenizers' own errors (a nesting limit ...) are bare Exceptions
        reason = first_line(exc)
        raise ModelSpecError(f"cannot read the tokenizer in {path} ({reason}): fix or remove its "
                             "tokenizer files (without them, give token ids with --input)") from exc


# --- GGUF: transformers dequantizes; a built-in's GGUF is dequantized once into the cache ---------------

GGUF_INSTALL = "pip install gguf accelerate"

CACHE_COMPLETE = ".dtypelab-complete"
"""The marker a cache folder gets last, after every file is written: a folder without it is never read."""


def gguf_in(path: Path) -> Path | None:
    """The ``.gguf`` file ``path`` names: the file itself, or the one ``.gguf`` of a folder that has no
    ``config.json`` and no safetensors weights (a folder with those is an ordinary model folder); None
    otherwise. Several ``.gguf`` files in such a folder raise :class:`ModelSpecError` (which one?)."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file() or folder_weights(path)[0]:
        return None
    files = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(files) > 1:
        raise ModelSpecError(f"{path} holds {len(files)} .gguf files ({', '.join(p.name for p in files)}): "
                             "name the one you mean")
    return files[0] if files else None


def load_gguf(path: Path, dtype: str | torch.dtype = "auto") -> LoadedModel:
    """Load a ``.gguf`` file through transformers' GGUF path: every tensor dequantized (to float32 for
    ``"auto"``, else straight into ``dtype``'s compute dtype), the tokenizer the file carries.

    A GGUF holds a causal LM (transformers' GGUF support maps each architecture to its
    ``…ForCausalLM``), so the model runs like any causal LM folder: logits, no key/value cache.

    Raises:
        ModelSpecError: the ``gguf`` / ``accelerate`` packages are missing (the install command), or
            transformers cannot read the file (its reason, e.g. an architecture it does not know).
        CheckpointError: the file lacks a weight the architecture needs.
    """
    model, tokenizer = _read_gguf(path, torch.float32 if dtype == "auto" else compute_dtype(dtype))
    model.config.use_cache = False  # compare needs logits only; no key/value cache in the output
    return LoadedModel(str(path), model.eval(), model_kind(model), OutputKind.LOGITS, tokenizer)


def _require_gguf_packages(path: Path) -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelSpecError(f"loading the GGUF file {path} needs the {' and '.join(missing)} "
                             f"package{'s' if len(missing) > 1 else ''}: {GGUF_INSTALL}")


def _read_gguf(path: Path, torch_dtype: torch.dtype) -> tuple[nn.Module, object]:
    """transformers' ``from_pretrained(folder, gguf_file=name)`` for the model and its tokenizer."""
    _require_gguf_packages(path)
    import transformers

    folder, name = path.parent, path.name
    for file in ("config.json", "tokenizer_config.json"):  # transformers reads them beside the GGUF too
        if (folder / file).exists():
            refuse_remote_code(folder / file, read_json_file(folder / file))
    try:
        with _no_progress_bars(), _no_gguf_progress_bar():
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch_dtype, output_loading_info=True, trust_remote_code=False)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name,
                                                               trust_remote_code=False)
    except DtypelabError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as exc:
        raise ModelSpecError(f"transformers cannot load the GGUF file {path} ({first_line(exc)}): check it "
                             "is a causal LM whose architecture your transformers version reads from GGUF"
                             ) from exc
    _refuse_incomplete(path, info)
    return model, tokenizer


@contextlib.contextmanager
def _no_gguf_progress_bar() -> Iterator[None]:
    """transformers' GGUF dequantization draws its own tqdm bar ("Converting and de-quantizing GGUF
    tensors"), which its logging settings do not reach: hand its module a disabled tqdm for the call, so
    nothing dtypelab did not mean to say reaches the terminal."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def cache_dir() -> Path:
    """Where dtypelab keeps what it derives once (a built-in GGUF dequantized to a folder, ~0.5 GB for
    smollm2): ``$DTYPELAB_CACHE``, else ``$XDG_CACHE_HOME/dtypelab``, else ``~/.cache/dtypelab``."""
    folder = settings.value("DTYPELAB_CACHE")
    if folder:
        return Path(folder).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dtypelab"


def cached_gguf_folder(gguf: Path) -> Path:
    """An ordinary Hugging Face folder (config.json, tokenizer, model.safetensors in float32) holding what
    transformers dequantizes from ``gguf``; written on the first call (~20 s for smollm2), read after.

    The folder is named after the file, its size and modification time, so a changed file gets a new one.
    It is written into a temporary sibling, its marker file last, then renamed into place: a killed or
    concurrent first load leaves at most a temporary folder, never a half folder under the final name,
    and a folder without the marker is rebuilt, never read. A temporary folder left by a killed load
    (its owner process gone) is removed by the next first load.
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    root = cache_dir()
    final = root / f"{gguf.stem}-{key}"
    if (final / CACHE_COMPLETE).is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(root, final.name)
        temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        (temporary / CACHE_OWNER).write_text(f"{os.getpid()}\n")
    except OSError as exc:
        raise ModelSpecError(f"cannot write the dtypelab cache {root} ({first_line(exc)}): set "
                             "DTYPELAB_CACHE to a writable folder") from exc
    try:
        _write_gguf_folder(gguf, temporary)
        if final.exists() and not (final / CACHE_COMPLETE).is_file():
            shutil.rmtree(final, ignore_errors=True)  # a folder without the marker is never trusted
        try:
            os.rename(temporary, final)
        except OSError:
            if not (final / CACHE_COMPLETE).is_file():  # not a concurrent load that finished first
                raise
    except OSError as exc:
        raise ModelSpecError(f"cannot write the dtypelab cache {final} ({first_line(exc)}): set "
                             "DTYPELAB_CACHE to a writable folder with ~1 GB free") from exc
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return final


CACHE_OWNER = ".dtypelab-owner"  # the pid writing a temporary cache folder
STALE_AFTER_S = 24 * 3600  # a temporary folder untouched this long is stale whoever owns it (pid reuse)


def _remove_stale_temporaries(root: Path, name: str) -> None:
    """Remove the temporary folders of loads that died (SIGKILL, power loss) before renaming theirs into
    place: owner process gone, or untouched for a day. A live concurrent load's folder is left alone."""
    for folder in root.glob(f".{name}.*"):
        try:
            pid = int((folder / CACHE_OWNER).read_text().strip())
            age_s = time.time() - folder.stat().st_mtime
        except (OSError, ValueError):
            pid, age_s = None, math.inf  # no owner recorded: a writer that died before it wrote one
        if pid is None or not _process_alive(pid) or age_s > STALE_AFTER_S:
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _write_gguf_folder(gguf: Path, folder: Path) -> None:
    """Dequantize ``gguf`` to float32 and save it as an ordinary folder, the marker last.

    ``save_pretrained`` refuses a model transformers marked as quantized with gguf ("not serializable"),
    although its weights are plain float32 tensors once dequantized: dropping the quantization config and
    the quantizer makes it an ordinary model, which saves config.json (without ``quantization_config``)
    and ``model.safetensors`` (tied weights once, as transformers writes them).
    """
    model, tokenizer = _read_gguf(gguf, torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with _no_progress_bars():
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if "quantization_config" in json.loads((folder / "config.json").read_text()):
        raise ModelSpecError(f"transformers kept the GGUF quantization config of {gguf} in {folder}: "
                             "this transformers version cannot be used to cache it")
    (folder / CACHE_COMPLETE).write_text(json.dumps({"source": str(gguf)}) + "\n")


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a pickled state dict (``.bin``/``.pt``) with ``torch.load(weights_only=True)``, memory-mapped:
    the checkpoint stage's one reader (:func:`dtypelab.checkpoint.read_state_dict`), which ``convert
    --allow-pickle`` uses too. Only call this when the user asked for pickles."""
    return read_state_dict(path)
