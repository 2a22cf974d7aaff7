"""The text-encoder family's teacher labels: its outputs on every text and, for the token-state loss, its
last-layer states of every real token, each labelled once into a content-addressed store (cache.py)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from edgedistill import distributed
from edgedistill.cache import LabelStore, RaggedLabelStore, RaggedRows, cache_key, label_sharded, text_digests
from edgedistill.data import TransferSet
from edgedistill.errors import DataError
from edgedistill.progress import new_progress
from edgedistill.runtimes import iter_batches, torch_cpu
from edgedistill.teachers import Teacher
from edgedistill.tokenizer_io import tokenizer_fingerprint


def _store_root(cache_dir: Path, teacher: Teacher, max_length: int, *what: str) -> Path:
    """Return a label store's folder: one per teacher, tokenizer, max length and head (and `what`, when not the
    outputs themselves)."""
    head = asdict(teacher.module.pooling) if teacher.task == "feature-extraction" else teacher.task
    return cache_dir / "labels" / cache_key("v2", teacher.sha256, tokenizer_fingerprint(teacher.tokenizer), max_length,
                                            head, *what)


def _labelled(store: LabelStore, data: TransferSet, compute, description: str):
    assembled = store.root / f"assembled-{data.sha256[:24]}-{len(data)}.npy"
    with new_progress() as progress:
        bars = []

        def on_todo(n: int) -> None:
            if n:
                bars.append(progress.add_task(description, total=n, status=""))

        return label_sharded(store, data.texts, assembled, compute, distributed.rank(), distributed.world(),
                             distributed.barrier, on_todo, lambda n: bars and progress.update(bars[0], advance=n))


def label_with_teacher(teacher: Teacher, data: TransferSet, max_length: int, cache_dir: Path) -> np.ndarray:
    """Return the teacher's outputs for every text as a read-only memory map: texts the cache has seen (with this
    teacher, max length and head) are not labelled again; the rest are labelled in shards, split across processes."""
    store = LabelStore(_store_root(cache_dir, teacher, max_length))
    names = teacher.family.input_names(teacher.tokenizer)

    def compute(texts: list[str]) -> np.ndarray:
        return torch_cpu.predict(teacher.module, teacher.tokenizer, texts, names, max_length)

    outputs = _labelled(store, data, compute, "labelling with the teacher")
    if not all(np.isfinite(outputs[i : i + 65536]).all() for i in range(0, len(outputs), 65536)):  # in bounded chunks
        raise DataError("the teacher produced non-finite outputs on the transfer set", hint="check the teacher checkpoint")
    return outputs


@torch.no_grad()
def label_token_states(teacher: Teacher, data: TransferSet, max_length: int, cache_dir: Path) -> RaggedRows:
    """Return the teacher's last-layer states of every real token of every text (float16, ragged, memory-mapped),
    labelling only texts the cache lacks. The same pass stores the outputs `label_with_teacher` would compute for
    those texts, so turning token states on costs no second pass over the data."""
    outputs_store = LabelStore(_store_root(cache_dir, teacher, max_length))
    store = RaggedLabelStore(_store_root(cache_dir, teacher, max_length, "token-states"))
    names = teacher.family.input_names(teacher.tokenizer)
    module = teacher.module.eval()
    all_digests = text_digests(data.texts)
    lacking = {all_digests[i].tobytes() for i in outputs_store.missing(all_digests)}  # the outputs store's index, read once

    def compute(texts: list[str]) -> list[np.ndarray]:
        rows: list[np.ndarray] = [np.empty(0)] * len(texts)
        outputs = None
        for idx, inputs in iter_batches(teacher.tokenizer, texts, names, max_length, 64):
            device = next(module.parameters()).device
            out, states = module(**{k: torch.from_numpy(v).to(device) for k, v in inputs.items()}, with_states=True)
            out, states = out.float().cpu().numpy(), states.float().cpu().numpy()
            outputs = np.empty((len(texts), out.shape[-1]), np.float32) if outputs is None else outputs
            outputs[idx] = out
            for j, i in enumerate(idx.tolist()):
                rows[i] = states[j][inputs["attention_mask"][j].astype(bool)].astype(np.float16)
        digests = text_digests(texts)
        new = [i for i, d in enumerate(digests.tolist()) if d in lacking]
        if outputs is not None and new:  # only the texts the outputs store lacks: no duplicate rows
            outputs_store.add(digests[new], outputs[new])
        return rows

    return _labelled(store, data, compute, "labelling with the teacher (outputs and token states)")
