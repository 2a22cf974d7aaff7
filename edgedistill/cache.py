"""On-disk caches, content-addressed: the teacher's outputs per example (sharded), and finished stages by input hash.

Teacher outputs live in a store per (teacher, max length, head). An example is whatever the family labels (a text
for encoders, a window of token ids for language models) and its output one fixed-shape row of any numpy dtype
without objects (a structured dtype holds a language model's top-k log-probabilities, indices and tail mass), so
everything loads without pickle. Each shard file holds the outputs of up to SHARD_TEXTS examples with the sha1 of
each example beside it, so a changed transfer set re-labels only texts the store has
not seen, a killed labelling run keeps every finished shard, and N processes label disjoint shards side by side.
Training reads one memory-mapped array assembled from the shards, so memory does not grow with the transfer set.
Every file is written under a temporary name and renamed: a killed run never leaves a partial entry.
A RaggedLabelStore holds outputs of varying length per example (an encoder teacher's token states: one row per
real token), concatenated per shard beside their offsets, read back as RaggedRows.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

SHARD_TEXTS = int(os.environ.get("EDGEDISTILL_SHARD_TEXTS", "2048"))  # texts per shard file (and per labelling task)


def default_cache_dir() -> Path:
    """Return $EDGEDISTILL_CACHE, else $XDG_CACHE_HOME/edgedistill, else ~/.cache/edgedistill."""
    if os.environ.get("EDGEDISTILL_CACHE"):
        return Path(os.environ["EDGEDISTILL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgedistill"


def cache_key(*parts: object) -> str:
    """Return a content key over the parts (teacher sha256, data sha256, max length, head...)."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:40]


def text_digests(texts: Sequence[str]) -> np.ndarray:
    """Return the sha1 of each text as a fixed-width bytes array (loadable without pickle)."""
    return np.array([hashlib.sha1(t.encode("utf-8")).digest() for t in texts], dtype="S20")


def array_digests(rows: np.ndarray) -> np.ndarray:
    """Return the sha1 of each row's bytes (dtype included), e.g. windows of token ids, as a fixed-width array."""
    rows = np.ascontiguousarray(rows)
    tag = rows.dtype.str.encode()
    return np.array([hashlib.sha1(tag + r.tobytes()).digest() for r in rows], dtype="S20")


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write `array` to `path` atomically (temporary name, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Rows:
    """Rows `index` of a (memory-mapped) array, read batch by batch: training never copies the whole split."""

    def __init__(self, array: np.ndarray, index: np.ndarray) -> None:
        self.array, self.index = array, np.asarray(index)
        self.shape = (len(self.index), *array.shape[1:])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx) -> np.ndarray:
        return np.asarray(self.array[self.index[idx]])


class LabelStore:
    """Teacher outputs keyed by text content, in shard files under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _shards(self) -> list[Path]:
        return sorted(self.root.glob("shard-*.keys.npy"))

    def index(self) -> dict[bytes, tuple[Path, int]]:
        """Return digest -> (shard outputs file, row) over every complete shard."""
        found: dict[bytes, tuple[Path, int]] = {}
        for keys_path in self._shards():
            values = keys_path.with_name(keys_path.name.replace(".keys.npy", ".npy"))
            if not values.is_file():
                continue  # outputs are written first, keys last: a keys file means a complete shard
            try:
                keys = np.load(keys_path, allow_pickle=False)
            except (ValueError, OSError):
                keys_path.unlink(missing_ok=True)  # unreadable: its texts are labelled again
                continue
            for row, k in enumerate(keys.tolist()):
                found.setdefault(k, (values, row))
        return found

    def missing(self, digests: np.ndarray) -> list[int]:
        """Return the indices of the first occurrence of each digest the store lacks."""
        have = self.index()
        seen: set[bytes] = set()
        out = []
        for i, d in enumerate(digests.tolist()):
            if d not in have and d not in seen:
                seen.add(d)
                out.append(i)
        return out

    def add(self, digests: np.ndarray, outputs: np.ndarray) -> None:
        """Store one shard: outputs first, then the keys that make it visible."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(digests.tobytes()).hexdigest()[:24]
        outputs = np.asarray(outputs)
        if outputs.dtype.kind == "f" and outputs.dtype.names is None:
            outputs = outputs.astype(np.float32)
        save_npy(self.root / f"shard-{name}.npy", np.ascontiguousarray(outputs))
        save_npy(self.root / f"shard-{name}.keys.npy", digests)

    def load(self, path: Path) -> np.ndarray:
        """Return what `assemble` wrote at `path`, memory-mapped read-only."""
        return np.load(path, mmap_mode="r")

    def assemble(self, digests: np.ndarray, path: Path) -> None:
        """Write the outputs of `digests`, in order, to one .npy at `path`, shard by shard through memory maps."""
        index = self.index()
        first = np.load(index[digests[0]][0], mmap_mode="r")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=first.dtype, shape=(len(digests), *first.shape[1:]))
        rows_by_shard: dict[Path, list[tuple[int, int]]] = {}
        for i, d in enumerate(digests.tolist()):
            shard, row = index[d]
            rows_by_shard.setdefault(shard, []).append((i, row))
        for shard, pairs in rows_by_shard.items():
            values = np.load(shard, mmap_mode="r")
            dst, src = np.array(pairs).T
            out[dst] = values[src]
        out.flush()
        del out
        os.replace(tmp, path)


def label_sharded(store: LabelStore, texts: Sequence, assembled: Path,
                  compute: Callable[[list], np.ndarray | list[np.ndarray]], rank: int = 0, world: int = 1,
                  barrier: Callable[[], None] = lambda: None, on_todo: Callable[[int], None] | None = None,
                  on_progress: Callable[[int], None] | None = None, digests: np.ndarray | None = None) -> np.ndarray:
    """Return the teacher outputs of `texts` (any examples; `digests` identify them, the texts' sha1 by default)
    as a read-only memory map (RaggedRows from a RaggedLabelStore), labelling only examples the store lacks.

    With `world` processes, the missing texts are cut into shards of SHARD_TEXTS and process `rank` labels shards
    rank, rank + world, ...; `barrier` waits for all of them; process 0 then assembles the array the rest map.
    `on_todo` hears how many texts need labelling, `on_progress` how many more are done.
    """
    if not assembled.is_file():
        digests = text_digests(texts) if digests is None else digests
        todo = store.missing(digests)
        barrier()  # every process splits the same list: none may add a shard before all have read the store
        if on_todo is not None:
            on_todo(len(todo))
        chunks = [todo[i : i + SHARD_TEXTS] for i in range(0, len(todo), SHARD_TEXTS)]
        for chunk in chunks[rank::world]:
            store.add(digests[chunk], compute([texts[i] for i in chunk]))
            if on_progress is not None:
                on_progress(len(chunk) * world)
        barrier()
        if rank == 0:
            assembled.parent.mkdir(parents=True, exist_ok=True)
            store.assemble(digests, assembled)
        barrier()
    return store.load(assembled)


def _offsets_path(path: Path) -> Path:
    return path.with_name(path.name.replace(".npy", ".offsets.npy"))


class RaggedRows:
    """Rows of varying length over one memory-mapped array: row i is flat[starts[i]:ends[i]] (offsets: n + 1
    boundaries); `rows(index)` is the view of some of them, as Rows is for fixed-shape outputs."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray | None = None,
                 spans: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.flat = flat
        if spans is None:
            offsets = np.asarray(offsets, dtype=np.int64)
            spans = (offsets[:-1], offsets[1:])
        self.starts, self.ends = spans

    def __len__(self) -> int:
        return len(self.starts)

    def rows(self, index: Sequence[int]) -> RaggedRows:
        """Return the view of rows `index`, in that order."""
        index = np.asarray(index)
        return RaggedRows(self.flat, spans=(self.starts[index], self.ends[index]))

    def lengths(self, idx: Sequence[int]) -> np.ndarray:
        """Return the length of each row in `idx`."""
        idx = np.asarray(idx)
        return self.ends[idx] - self.starts[idx]

    def padded(self, idx: Sequence[int], length: int) -> np.ndarray:
        """Return rows `idx` as one (len(idx), length, ...) float32 array, zeros after each row's end."""
        out = np.zeros((len(idx), length, *self.flat.shape[1:]), dtype=np.float32)
        for j, i in enumerate(np.asarray(idx).tolist()):
            row = self.flat[self.starts[i] : self.ends[i]]
            out[j, : len(row)] = row[:length]
        return out


class RaggedLabelStore(LabelStore):
    """Outputs of varying length per example (`add` takes a list of arrays with the same trailing shape), stored
    as float16: each shard is the rows concatenated, its offsets (written before the keys that make it visible)."""

    def add(self, digests: np.ndarray, outputs: list[np.ndarray]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(digests.tobytes()).hexdigest()[:24]
        offsets = np.concatenate([[0], np.cumsum([len(o) for o in outputs])]).astype(np.int64)
        save_npy(self.root / f"shard-{name}.npy", np.concatenate(outputs).astype(np.float16))
        save_npy(self.root / f"shard-{name}.offsets.npy", offsets)
        save_npy(self.root / f"shard-{name}.keys.npy", digests)

    def load(self, path: Path) -> RaggedRows:
        return RaggedRows(np.load(path, mmap_mode="r"), np.load(_offsets_path(path)))

    def assemble(self, digests: np.ndarray, path: Path) -> None:
        """Write the rows of `digests`, in order, to `path` and their offsets beside it (offsets first: the rows'
        file, renamed last, is what marks the assembly complete)."""
        index = self.index()
        shards = {shard: (np.load(shard, mmap_mode="r"), np.load(_offsets_path(shard)))
                  for shard in {index[d][0] for d in digests.tolist()}}
        spans = [(shards[index[d][0]], index[d][1]) for d in digests.tolist()]
        lengths = [int(offs[row + 1] - offs[row]) for (_, offs), row in spans]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        first = next(iter(shards.values()))[0]
        save_npy(_offsets_path(path), offsets)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=first.dtype, shape=(int(offsets[-1]), *first.shape[1:]))
        for k, ((values, offs), row) in enumerate(spans):
            out[offsets[k] : offsets[k + 1]] = values[offs[row] : offs[row + 1]]
        out.flush()
        del out
        os.replace(tmp, path)
