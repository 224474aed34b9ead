"""A mixed-precision plan as a variant: the reference with each planned layer in its own format.

Variants stage: the plan (:class:`~dtypelab.quant.MixedPlan`) is checked against the reference (layer
names and fingerprint) and applied with ``quantize_model``, so ``compare --plan`` measures the same
model ``convert --plan`` writes and ``dtypelab.load`` reads back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..quant import MixedPlan, quantize_model
from .build import Variant
from .calibration import CalibrationData


def plan_variant(reference: nn.Module, plan: MixedPlan | str | Path, name: str | None = None,
                 device: torch.device | str | None = None,
                 calibration: CalibrationData | None = None) -> Variant:
    """The reference quantized as ``plan`` says, as a :class:`Variant` named ``name`` (default
    ``plan:<budget>``); a plan that does not fit the model becomes a failed variant with the reason.
    ``calibration``: the batches a plan's ``:gptq`` / ``:awq`` layers calibrate on (without them such a
    plan is a failed variant saying so).

    Raises:
        InputError: the plan file cannot be read (before any variant is built).
    """
    plan = MixedPlan.load(plan) if isinstance(plan, str | Path) else plan
    name = name or f"plan:{plan.budget or 'file'}"
    try:
        plan.check_model(reference)
        batches = calibration.batches if calibration is not None else None
        result = quantize_model(reference, plan, calibration=batches)
    except InputError as err:
        return Variant.failed(name, str(err))
    if result.calibration is not None:
        result.calibration.source, result.calibration.ctx = calibration.source, calibration.ctx
    model = result.model.to(device) if device is not None else result.model
    return Variant(name, name, None, model, layers=result.layers, calibration=result.calibration)
