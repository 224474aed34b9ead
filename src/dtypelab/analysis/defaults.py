"""The analysis stage's user-facing choices and defaults, importable without torch (the CLI's help)."""

from __future__ import annotations

# lock-step layer comparison: each layer fed the candidate's own input, or the reference's
MODES = ("propagated", "isolated")
DEFAULT_THRESHOLD_DB = 20.0  # error amplitude one tenth of the signal: clearly more than rounding noise
SENSITIVITY_METHODS = ("fisher", "exact")
# compare --compute: in the reference's dtype (the format's error alone), as a bf16 deployment, W8A8 kernels
COMPUTES = ("reference", "bf16", "int8")
