"""A small GGUF writer, byte by byte, so tests can build valid and damaged files (tests/checkpoint's
reader tests and tests/hostile's fuzzing)."""

from __future__ import annotations

import struct

F32, F16, Q4_1, Q8_0, Q4_K = 0, 1, 3, 8, 12
VALUE_TYPES = {"u8": (0, "<B"), "i8": (1, "<b"), "u16": (2, "<H"), "i16": (3, "<h"), "u32": (4, "<I"),
                "i32": (5, "<i"), "f32": (6, "<f"), "bool": (7, "<?"), "u64": (10, "<Q"), "i64": (11, "<q"),
                "f64": (12, "<d")}


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return u64(len(raw)) + raw


def encode(kind: str, value) -> bytes:
    if kind == "str":
        return string(value)
    return struct.pack(VALUE_TYPES[kind][1], value)


def kv(key: str | bytes, kind: str, value) -> bytes:
    """One metadata pair; ``kind`` a GGUF type name, or ``"arr:ELEMENT"`` with a list value."""
    if kind.startswith("arr:"):
        element = kind[4:]
        element_id = 8 if element == "str" else VALUE_TYPES[element][0]
        body = u32(element_id) + u64(len(value)) + b"".join(encode(element, v) for v in value)
        return string(key) + u32(9) + body
    return string(key) + u32(8 if kind == "str" else VALUE_TYPES[kind][0]) + encode(kind, value)


def info(name: str | bytes, dims: tuple[int, ...], type_id: int, offset: int) -> bytes:
    """One tensor info; ``dims`` as GGUF stores them, innermost first."""
    return string(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(type_id) + u64(offset)


def gguf(kvs: list[bytes], infos: list[bytes], data: bytes = b"", *, version: int = 3, alignment: int = 32,
         magic: bytes = b"GGUF", tensor_count: int | None = None, kv_count: int | None = None) -> bytes:
    head = (magic + u32(version) + u64(len(infos) if tensor_count is None else tensor_count)
            + u64(len(kvs) if kv_count is None else kv_count) + b"".join(kvs) + b"".join(infos))
    return head + bytes(-len(head) % alignment) + data
