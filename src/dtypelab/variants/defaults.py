"""The variants stage's user-facing defaults, importable without torch (the CLI's help shows them)."""

from __future__ import annotations

DEFAULT_CALIB_TOKENS = 8192  # 16 windows of 512: 5x the widest input of smollm2 (1536), ~1 min on 2 cores
