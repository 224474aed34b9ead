"""Variants: the candidates a reference is measured against — our formats and the peers' — built once.

Variants stage, above :mod:`dtypelab.models`; :mod:`dtypelab.analysis` measures what this builds.
"""

from .build import (
    Variant,
    VariantSpec,
    apply_format,
    as_variants,
    build_variant,
    build_variants,
    iter_variants,
    parse_variant_specs,
)
from .calibrated_convert import convert_calibrated
from .calibration import DEFAULT_CALIB_TOKENS, CalibrationData, calibration_data
from .peers import PEERS, Peer, PeerError, PeerRun, is_peer_spec, run_peer
from .planned import plan_variant

__all__ = [
    "plan_variant",
    "DEFAULT_CALIB_TOKENS", "CalibrationData", "calibration_data", "convert_calibrated",
    "PEERS", "Peer", "PeerError", "PeerRun", "Variant", "VariantSpec", "apply_format", "as_variants",
    "build_variant", "build_variants", "is_peer_spec", "iter_variants", "parse_variant_specs", "run_peer",
]
