"""Known third-party noise, dropped: what optional packages print at import says nothing about the model.

Base layer: imports nothing of dtypelab. Importing transformers imports torchao when it is installed,
which logs ``Failed to load …/_C_mxfp8….so`` for CUDA kernels a CPU machine cannot load, and torch's
pytree logs a deprecation for every Enum torchao registers. dtypelab filters exactly those messages
(by logger and text; anything else from those loggers still shows) as soon as ``dtypelab`` is imported;
``dtypelab --debug`` removes the filter, so the messages can be seen when they matter.
"""

from __future__ import annotations

import logging
import re

KNOWN_NOISE: dict[str, tuple[str, ...]] = {
    "torchao": (r"^Failed to load .*\.so",),
    "torch.utils._pytree": (r"is an Enum subclass and is now natively supported by torch\.compile",),
}
"""Logger name -> regular expressions of the messages dropped from it."""


class _DropKnownNoise(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


_FILTERS = {name: _DropKnownNoise(patterns) for name, patterns in KNOWN_NOISE.items()}


def drop_known_noise(enabled: bool = True) -> None:
    """Install (or, with ``enabled=False``, remove) the filters on their loggers; idempotent."""
    for name, noise_filter in _FILTERS.items():
        logger = logging.getLogger(name)
        if enabled:
            logger.addFilter(noise_filter)
        else:
            logger.removeFilter(noise_filter)
