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

    try:
        return _read_tree(blob, tree, data, names, node_size, prefix, str(path))
    except (struct.error, IndexError, UnicodeDecodeError, zlib.error) as e:  # offsets past the end: a damaged file
        raise DataError(f"{path} is a damaged Qt resource file ({type(e).__name__}: {str(e)[:80]})",
                        hint="reinstall the package that ships it") from None


def _read_tree(blob: bytes, tree: int, data: int, names: int, node_size: int, prefix: str,
               path: str) -> dict[str, bytes]:
    def unpack(fmt: str, at: int) -> tuple:
        return struct.unpack_from(fmt, blob, at)  # raises struct.error past the end

    def name_at(offset: int) -> str:
        (length,) = unpack(">H", names + offset)
        start = names + offset + 6  # the length, then a 4-byte hash, then the name
        if start + 2 * length > len(blob):
            raise IndexError(f"name at {offset} runs past the end")
        return blob[start : start + 2 * length].decode("utf-16-be")

    files: dict[str, bytes] = {}
    pending, seen = [(0, "")], set()  # (node index, its parent's path); node 0 is the root directory
    while pending:
        index, parent = pending.pop()
        if index in seen:  # a directory listing itself or an ancestor would loop forever
            raise IndexError(f"node {index} is reached twice")
        seen.add(index)
        at = tree + index * node_size
        name_offset, flags = unpack(">IH", at)
        here = f"{parent}/{name_at(name_offset)}" if index else ""
        if flags & _DIRECTORY:
            count, first = unpack(">II", at + 6)
            if first + count > (len(blob) - tree) // node_size:
                raise IndexError(f"node {index} lists {count} children from {first}, past the tree's end")
            pending.extend((first + i, here) for i in range(count))
            continue
        if not here.startswith(prefix):
            continue
        (data_offset,) = unpack(">I", at + 10)
        (size,) = unpack(">I", data + data_offset)
        raw = blob[data + data_offset + 4 : data + data_offset + 4 + size]
        if len(raw) != size:
            raise IndexError(f"{here}'s {size} bytes run past the end")
        if flags & _COMPRESSED_ZSTD:
            raise DataError(f"{path}: {here} is zstd-compressed, which this reader does not decode",
                            hint="pass the photos as an image folder with --data")
        files[here] = zlib.decompress(raw[4:]) if flags & _COMPRESSED else raw
    return dict(sorted(files.items()))
