"""The few facts of a GGUF file the producer needs (its architecture, its context length), read from the file's
header without torch and without the `gguf` package (a worker dependency; the producer installs neither).

A GGUF file (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) starts with the magic `GGUF`, a version,
the tensor and key-value counts, then its key-values: a length-prefixed key, a value type, the value. The reader
walks them in order and stops once it has what it was asked for, so the tokenizer's arrays, which usually come
last, are rarely read at all. Little-endian files of version 2 and 3 (every file llama.cpp writes).
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from contract.errors import ModelNotFound

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
DEFAULT_CONTEXT = 2048
"""What transformers assumes (LlamaConfig's max_position_embeddings) for a GGUF without `<arch>.context_length`."""


class NotGguf(ModelNotFound):
    """A file that is not a readable GGUF file."""


def read_metadata(path: Path, wanted: set[str] | None = None) -> dict[str, Any]:
    """The file's scalar and string key-values (arrays are skipped); with `wanted`, reading stops once all are found."""
    found: dict[str, Any] = {}
    with path.open("rb") as f:
        if f.read(4) != MAGIC:
            raise NotGguf(f"{path}: not a GGUF file (it does not start with {MAGIC!r})")
        version, _tensors, count = _unpack(f, "<IQQ", path)
        if version not in (2, 3):
            raise NotGguf(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        for _ in range(count):
            key = _string(f, path)
            kind = _unpack(f, "<I", path)[0]
            value = _value(f, kind, path)
            if kind != _ARRAY:
                found[key] = value
            if wanted is not None and wanted <= found.keys():
                break
    return found


def context_length(path: Path) -> int:
    """`<architecture>.context_length` of a GGUF file, or DEFAULT_CONTEXT when the file does not say."""
    architecture = read_metadata(path, {"general.architecture"}).get("general.architecture")
    if not isinstance(architecture, str):
        return DEFAULT_CONTEXT
    key = f"{architecture}.context_length"
    value = read_metadata(path, {key}).get(key)
    return value if isinstance(value, int) and value > 0 else DEFAULT_CONTEXT


def _unpack(f: BinaryIO, layout: str, path: Path) -> tuple[Any, ...]:
    size = struct.calcsize(layout)
    data = f.read(size)
    if len(data) != size:
        raise NotGguf(f"{path}: the GGUF header ends early (a truncated file?)")
    return struct.unpack(layout, data)


def _string(f: BinaryIO, path: Path) -> str:
    length = _unpack(f, "<Q", path)[0]
    data = f.read(length)
    if len(data) != length:
        raise NotGguf(f"{path}: the GGUF header ends early (a truncated file?)")
    return data.decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int, path: Path) -> Any:
    if kind in _SCALARS:
        return _unpack(f, _SCALARS[kind], path)[0]
    if kind == _STRING:
        return _string(f, path)
    if kind == _ARRAY:
        item, count = _unpack(f, "<IQ", path)
        if item in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[item]) * count, 1)
        else:
            for _ in range(count):
                _value(f, item, path)
        return None
    raise NotGguf(f"{path}: unknown GGUF value type {kind}")
