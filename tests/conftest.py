import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dtypelab.models import DummyModel  # noqa: E402

SEED_INPUT = [[1, 0, 1]]


@pytest.fixture
def dummy() -> DummyModel:
    return DummyModel()


@pytest.fixture
def seed_input() -> torch.Tensor:
    return torch.tensor(SEED_INPUT, dtype=torch.long)
