"""The spec grammar: ``int4:g64:asym`` picks a registry entry and sets its options.

Formats stage: builds on :mod:`dtypelab.formats.registry`. ``get_format`` is the one lookup every command
and library call goes through, so an unknown name or a malformed option is refused the same way
everywhere, with the grammar in the message.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

from ..errors import UnknownFormatError, did_you_mean
from .codecs import IntCodec
from .registry import Granularity, NumberFormat, all_formats, base_format

if TYPE_CHECKING:
    import torch

GRAMMAR = ("NAME[:tensor|:channel|:gN|:cast][:sym|:asym][:absmax|:mse][:sfp32|:sfp16|:sbf16][:a8|:afp8]"
           "[:gptq|:awq], e.g. int4:g128, int4:g64:asym, int8:channel, fp8_e4m3:tensor, int4:g128:mse, "
           "int8:a8, mxfp4, int4:g64:gptq")


def get_format(spec: str | torch.dtype | NumberFormat) -> NumberFormat:
    """Resolve a name, alias, spec string, ``torch.dtype`` or format to a format.

    Raises:
        UnknownFormatError: unknown name or malformed option; the message lists the grammar and names.
    Example:
        >>> get_format("half").name
        'fp16'
        >>> get_format("int4:g64:asym").effective_bits()
        4.375
    """
    if isinstance(spec, NumberFormat):
        return spec
    head, *options = str(spec).strip().lower().split(":")
    if base_format(head) is None:
        raise UnknownFormatError(f"unknown dtype or format {str(spec)!r}{_suggestion(head)}: {_known_help()}")
    fmt, set_by = base_format(head), {}
    for option in options:
        fmt = _apply_option(fmt, option, str(spec), set_by)
    if fmt.codec is not None and fmt.granularity == Granularity.NONE and \
            (fmt.scale_format or fmt.activations or fmt.scale_search != "absmax" or fmt.calibration):
        raise UnknownFormatError(f"format spec {spec!r}: :cast stores no scale, so it takes no scale, "
                                 "search, calibration or activation option; drop them")
    problem = _calibration_problem(fmt)
    if problem:
        raise UnknownFormatError(f"format spec {spec!r}: {problem}")
    return dataclasses.replace(fmt, name=canonical_name(fmt)) if options else fmt


def _suggestion(head: str) -> str:
    return did_you_mean(head, [f.name for f in all_formats()])


def _known_help() -> str:
    names = ", ".join(f.name for f in all_formats())
    return f"use one of {names} (aliases like half, bfloat16, float8_e4m3fn work too); spec grammar {GRAMMAR}"


def _apply_option(fmt: NumberFormat, option: str, spec: str, set_by: dict[str, str]) -> NumberFormat:
    """One ``:option`` of a spec applied to ``fmt``; a wrong, inapplicable or conflicting option is an
    error. ``set_by`` maps each field already set to the option that set it (``int4:g64:g128``)."""
    changes = _option_changes(option)
    if changes is None:
        raise UnknownFormatError(f"unknown option {option!r} in format spec {spec!r}: grammar {GRAMMAR}")
    problem = _option_problem(fmt, changes) or _option_conflict(changes, option, set_by)
    if problem:
        raise UnknownFormatError(f"format spec {spec!r}: {problem}; grammar {GRAMMAR}")
    set_by.update(dict.fromkeys(changes, option))
    return dataclasses.replace(fmt, **changes)


def _option_conflict(changes: dict, option: str, set_by: dict[str, str]) -> str | None:
    """Two different options setting one field (the later would silently win)."""
    for field_name in changes:
        if set_by.get(field_name, option) != option:
            return f"options {set_by[field_name]!r} and {option!r} both set the {field_name}: keep one"
    return None


def _option_changes(option: str) -> dict | None:
    """The fields an option sets, or None when it is not an option of the grammar."""
    fixed = {"tensor": {"granularity": Granularity.TENSOR, "group_size": None},
             "channel": {"granularity": Granularity.CHANNEL, "group_size": None},
             "cast": {"granularity": Granularity.NONE, "group_size": None, "scale_format": None},
             "sym": {"symmetric": True}, "asym": {"symmetric": False},
             "absmax": {"scale_search": "absmax"}, "mse": {"scale_search": "mse"},
             "a8": {"activations": "int8"}, "aint8": {"activations": "int8"},
             "afp8": {"activations": "fp8"},
             "gptq": {"calibration": "gptq"}, "awq": {"calibration": "awq"},
             **{f"s{name}": {"scale_format": name} for name in ("fp32", "fp16", "bf16")}}
    if option in fixed:
        return fixed[option]
    match = re.fullmatch(r"g(\d+)", option)
    if match:
        return {"granularity": Granularity.GROUP, "group_size": int(match.group(1))}
    return None


def _option_problem(fmt: NumberFormat, changes: dict) -> str | None:
    """Why these changes do not apply to ``fmt`` (None when they do)."""
    if fmt.codec is None:
        return f"{fmt.name} is a plain torch dtype and takes no options"
    if changes.get("granularity") == "none" and not fmt.is_floating_point:
        return f"{fmt.name} needs a scale (only floating formats cast without one); :cast applies to fp8"
    if "granularity" in changes and fmt.fixed_layout:
        return f"{fmt.name} has a fixed block of {fmt.group_size}; drop the granularity option"
    if changes.get("group_size") is not None and changes["group_size"] < 2:
        return "group size must be at least 2"
    if "scale_format" in changes and fmt.fixed_layout:
        return f"{fmt.name} fixes its scale format ({fmt.scale_format}); drop the scale option"
    if changes.get("symmetric") is False and not isinstance(fmt.codec, IntCodec):
        return f"{fmt.name} is symmetric only; :asym applies to int8 / int4"
    return None


def _calibration_problem(fmt: NumberFormat) -> str | None:
    """Why ``:gptq`` / ``:awq`` do not combine with the rest of the spec (None when they do): they choose
    codes of weights with group or channel scales, from the layer's float inputs."""
    if fmt.calibration is None:
        return None
    if fmt.granularity not in (Granularity.GROUP, Granularity.CHANNEL):
        return f":{fmt.calibration} needs group or channel scales; use e.g. {fmt.base}:g64:{fmt.calibration}"
    if fmt.activations:
        return f":{fmt.calibration} calibrates weights only; drop the activation option"
    if fmt.calibration == "awq" and fmt.scale_search == "mse":
        return ":awq runs its own clipping search on the layer's output error; drop :mse"
    return None


def canonical_name(fmt: NumberFormat) -> str:
    """The shortest spec that gives back ``fmt``: base name, layout, then non-default options."""
    parts = [fmt.base]
    if not fmt.fixed_layout and fmt.codec is not None:
        layout = {"group": f"g{fmt.group_size}", "none": "cast"}
        parts.append(layout.get(fmt.granularity, fmt.granularity))
    parts += [] if fmt.symmetric else ["asym"]
    parts += ["mse"] if fmt.scale_search == "mse" else []
    default_scale = base_format(fmt.base).scale_format
    parts += [f"s{fmt.scale_format}"] if fmt.scale_format not in (None, default_scale) else []
    parts += {"int8": ["a8"], "fp8": ["afp8"]}.get(fmt.activations, [])
    parts += [fmt.calibration] if fmt.calibration else []
    return ":".join(parts)


def split_list(text: str) -> list[str]:
    """The items of a comma-separated ``--to`` list, stripped; an empty item is an error."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise UnknownFormatError(f"empty item in format list {text!r}: write e.g. 'fp16,bf16,int4:g128'")
    return items


def parse_format_list(text: str) -> list[NumberFormat]:
    """Parse a comma-separated list such as ``"fp16,bf16,int4:g128"``; empty items are an error."""
    return [get_format(item) for item in split_list(text)]
