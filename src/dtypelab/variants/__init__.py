"""Variants: the candidates a reference is measured against — our formats and the peers' — built once.

Variants stage, above :mod:`dtypelab.models`; :mod:`dtypelab.analysis` measures what this builds.
"""

from ..lazy import lazy_exports

_EXPORTS = {  # public name -> the submodule that defines it (imported on first use)
    "Variant": "build", "VariantSpec": "build", "apply_format": "build", "as_variants": "build",
    "build_variant": "build", "build_variants": "build", "iter_variants": "build",
    "parse_variant_specs": "build",
    "convert_calibrated": "calibrated_convert",
    "DEFAULT_CALIB_TOKENS": "defaults", "CalibrationData": "calibration",
    "calibration_data": "calibration",
    "PEERS": "peers", "Peer": "peers", "PeerError": "peers", "PeerRun": "peers", "is_peer_spec": "peers",
    "run_peer": "peers",
    "plan_variant": "planned",
}

__all__ = [
    "plan_variant",
    "DEFAULT_CALIB_TOKENS", "CalibrationData", "calibration_data", "convert_calibrated",
    "PEERS", "Peer", "PeerError", "PeerRun", "Variant", "VariantSpec", "apply_format", "as_variants",
    "build_variant", "build_variants", "is_peer_spec", "iter_variants", "parse_variant_specs", "run_peer",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
