"""Runtime adapters: run a model over texts and return one output row per text. Runtimes import no training code."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def iter_batches(tokenizer, texts: list[str], input_names: list[str], max_length: int, batch_size: int,
                 fixed: bool = False) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yield (indices, int64 inputs) batches, texts sorted by length so that padding stays small.

    fixed: every batch has exactly `batch_size` rows (the last one filled with copies) padded to `max_length`,
    for graphs with fixed input shapes; `indices` then name only the real rows, which come first.
    """
    lengths = [len(t) for t in texts]
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        chunk = [texts[i] for i in idx]
        if fixed:
            chunk += [chunk[-1]] * (batch_size - len(chunk))
        enc = tokenizer(chunk, padding="max_length" if fixed else True, truncation=True, max_length=max_length,
                        return_tensors="np")
        yield idx, {name: enc[name].astype(np.int64) if name in enc else np.zeros_like(enc["input_ids"], dtype=np.int64)
                    for name in input_names}


def num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def predict_with(run, tokenizer, texts: list[str], input_names: list[str], max_length: int,
                 fixed_shape: tuple[int, int] | None = None, batch_size: int = 64) -> np.ndarray:
    """Return run(feeds)'s output for `texts`, one float32 row per text, in order; a model with a fixed
    (batch, sequence) gets batches of exactly that shape."""
    batch, seq = fixed_shape or (batch_size, max_length)
    out = None
    for idx, feeds in iter_batches(tokenizer, texts, input_names, seq, batch, fixed=fixed_shape is not None):
        y = np.asarray(run(feeds), dtype=np.float32)[: len(idx)]
        out = np.empty((len(texts), y.shape[-1]), np.float32) if out is None else out
        out[idx] = y
    return out
