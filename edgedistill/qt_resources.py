"""Read the files packed in a Qt resource bundle (`.rcc`, as written by Qt's `rcc -binary`).

GCompris ships its photographs this way (Debian's gcompris-qt-data). The format (Qt's qresource.cpp): a 'qres'
header with the offsets of three sections; the tree holds fixed-size nodes (a directory lists a run of children, a
file points into the data section); names are UTF-16BE, each with its length; a file's data is its length and its
bytes, zlib-compressed (qCompress: a 4-byte big-endian length first) when the node says so.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

from edgedistill.errors import DataError

_MAGIC = b"qres"
_COMPRESSED, _DIRECTORY, _COMPRESSED_ZSTD = 0x01, 0x02, 0x04


def read_rcc(path: Path, prefix: str = "") -> dict[str, bytes]:
    """Return {path inside the bundle: bytes} for every file whose path starts with `prefix`, sorted by path."""
    blob = Path(path).read_bytes()
    if blob[:4] != _MAGIC or len(blob) < 20:
        raise DataError(f"{path} is not a Qt resource file (no 'qres' header)", hint="reinstall the package that ships it")
    version, tree, data, names = struct.unpack(">IIII", blob[4:20])
    node_size = 14 if version == 1 else 22  # version 2 on added a last-modified time to each node

    def name_at(offset: int) -> str:
        (length,) = struct.unpack(">H", blob[names + offset : names + offset + 2])
        start = names + offset + 6  # the length, then a 4-byte hash, then the name
        return blob[start : start + 2 * length].decode("utf-16-be")

    files: dict[str, bytes] = {}
    pending = [(0, "")]  # (node index, its parent's path); node 0 is the root directory
    while pending:
        index, parent = pending.pop()
        at = tree + index * node_size
        name_offset, flags = struct.unpack(">IH", blob[at : at + 6])
        here = f"{parent}/{name_at(name_offset)}" if index else ""
        if flags & _DIRECTORY:
            count, first = struct.unpack(">II", blob[at + 6 : at + 14])
            pending.extend((first + i, here) for i in range(count))
            continue
        if not here.startswith(prefix):
            continue
        (data_offset,) = struct.unpack(">I", blob[at + 10 : at + 14])
        (size,) = struct.unpack(">I", blob[data + data_offset : data + data_offset + 4])
        raw = blob[data + data_offset + 4 : data + data_offset + 4 + size]
        if flags & _COMPRESSED_ZSTD:
            raise DataError(f"{path}: {here} is zstd-compressed, which this reader does not decode",
                            hint="pass the photos as an image folder with --data")
        files[here] = zlib.decompress(raw[4:]) if flags & _COMPRESSED else raw
    return dict(sorted(files.items()))
