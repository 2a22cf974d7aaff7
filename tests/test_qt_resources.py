"""The Qt resource reader: a bundle written here byte by byte as Qt's rcc lays it out, and GCompris' own."""
import io
import struct
import zlib
from pathlib import Path

import pytest

from edgedistill.errors import DataError
from edgedistill.images import GCOMPRIS_RCC_DIR
from edgedistill.qt_resources import read_rcc


def _name(text: str) -> bytes:
    return struct.pack(">HI", len(text), 0) + text.encode("utf-16-be")


def _bundle(version: int, files: dict[str, tuple[bytes, int]]) -> bytes:
    """A bundle holding /dir/<name> files: root -> 'dir' -> files, as rcc writes a tree (children in a run)."""
    names, name_at = b"", {}
    for text in ["dir", *files]:
        name_at[text] = len(names)
        names += _name(text)
    data, data_at = b"", {}
    for text, (raw, flags) in files.items():
        stored = struct.pack(">I", len(raw)) + zlib.compress(raw) if flags & 1 else raw
        data_at[text] = len(data)
        data += struct.pack(">I", len(stored)) + stored
    tail = b"\x00" * 8 if version >= 2 else b""

    def directory(name_offset, count, first):
        return struct.pack(">IHII", name_offset, 2, count, first) + tail

    nodes = directory(0, 1, 1) + directory(name_at["dir"], len(files), 2)
    for text, (_raw, flags) in files.items():
        nodes += struct.pack(">IHHHI", name_at[text], flags, 0, 0, data_at[text]) + tail
    header = 20 + (4 if version >= 3 else 0)
    tree, data_offset = header, header + len(nodes)
    names_offset = data_offset + len(data)
    out = b"qres" + struct.pack(">IIII", version, tree, data_offset, names_offset)
    out += struct.pack(">I", 0) if version >= 3 else b""
    return out + nodes + data + names


@pytest.mark.parametrize("version", [1, 2, 3])
def test_reads_plain_and_zlib_files_at_every_version(tmp_path, version):
    path = tmp_path / "b.rcc"
    path.write_bytes(_bundle(version, {"b.txt": (b"second" * 50, 1), "a.txt": (b"first", 0)}))
    assert read_rcc(path) == {"/dir/a.txt": b"first", "/dir/b.txt": b"second" * 50}
    assert read_rcc(path, prefix="/dir/b") == {"/dir/b.txt": b"second" * 50}
    assert read_rcc(path, prefix="/other/") == {}


def test_refuses_what_it_cannot_read(tmp_path):
    bad = tmp_path / "bad.rcc"
    bad.write_bytes(b"PK\x03\x04 not a bundle at all")
    with pytest.raises(DataError, match="not a Qt resource file"):
        read_rcc(bad)
    zstd = tmp_path / "z.rcc"
    zstd.write_bytes(_bundle(3, {"a.webp": (b"x", 4)}))
    with pytest.raises(DataError, match="zstd"):
        read_rcc(zstd)


def test_a_damaged_bundle_is_a_one_line_data_error(tmp_path):
    whole = _bundle(2, {"a.txt": (b"first" * 20, 0), "b.txt": (b"second" * 9, 1)})
    cut = tmp_path / "cut.rcc"
    for size in (24, 60, len(whole) - 3):  # in the tree, in the data, in the names
        cut.write_bytes(whole[:size])
        with pytest.raises(DataError, match="damaged Qt resource file"):
            read_rcc(cut)
    # the root directory listing itself as its own child would loop forever
    looped = bytearray(whole)
    tree = struct.unpack(">I", whole[8:12])[0]
    looped[tree + 10 : tree + 14] = struct.pack(">I", 0)
    cut.write_bytes(bytes(looped))
    with pytest.raises(DataError, match="reached twice"):
        read_rcc(cut)


@pytest.mark.skipif(not (GCOMPRIS_RCC_DIR / "erase.rcc").is_file(),
                    reason="Debian's gcompris-qt-data is not installed (`make install` installs it)")
def test_gcompris_photos_decode():
    from PIL import Image

    files = read_rcc(GCOMPRIS_RCC_DIR / "erase.rcc", prefix="/gcompris/src/activities/erase/resource/")
    photos = {n: b for n, b in files.items() if n.endswith(".webp")}
    assert len(photos) == 33 and "/gcompris/src/activities/erase/resource/kitten.webp" in photos
    with Image.open(io.BytesIO(photos["/gcompris/src/activities/erase/resource/kitten.webp"])) as im:
        assert im.format == "WEBP" and min(im.size) >= 300
    assert Path(GCOMPRIS_RCC_DIR / "erase.rcc").stat().st_size > sum(len(b) for b in photos.values())
