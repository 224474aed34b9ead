"""The built-in models' names: data the CLI's help lists, importable without torch.

Models stage. :data:`dtypelab.models.builtins.BUILTIN_MODELS` holds the models themselves (their
factories need torch); tests/models check that its names are exactly these.
"""

from __future__ import annotations

BUILTIN_NAMES = ("dummy", "minilm", "smollm2", "tiny-llama", "tiny-gpt2")


def builtin_names() -> list[str]:
    """The built-in model names, sorted (for help texts and error messages)."""
    return sorted(BUILTIN_NAMES)
