"""The label stores: ragged rows (a text's token states) written per shard, assembled in any order, read as views."""
from __future__ import annotations

import numpy as np

from edgedistill.cache import RaggedLabelStore, label_sharded, text_digests


def test_ragged_rows_survive_shards_and_reordering(tmp_path, monkeypatch):
    monkeypatch.setattr("edgedistill.cache.SHARD_TEXTS", 3)  # several shards
    rng = np.random.default_rng(0)
    texts = [f"text {i}" for i in range(8)]
    rows = {t: rng.normal(size=(1 + i % 4, 5)).astype(np.float32) for i, t in enumerate(texts)}
    store = RaggedLabelStore(tmp_path / "store")
    computed = []

    def compute(chunk):
        computed.extend(chunk)
        return [rows[t] for t in chunk]

    got = label_sharded(store, texts, tmp_path / "store" / "assembled-a.npy", compute)
    assert sorted(computed) == sorted(texts) and len(list((tmp_path / "store").glob("shard-*.keys.npy"))) == 3
    for i, t in enumerate(texts):
        np.testing.assert_allclose(got.padded([i], 4)[0, : len(rows[t])], rows[t], rtol=1e-3, atol=1e-3)  # float16
    # another order, from the same shards: nothing is computed again
    order = texts[::-1]
    again = label_sharded(store, order, tmp_path / "store" / "assembled-b.npy",
                          lambda chunk: (_ for _ in ()).throw(AssertionError("labelled again")),
                          digests=text_digests(order))
    assert list(again.lengths(range(8))) == [len(rows[t]) for t in order]
    padded = again.padded([0, 7], 6)  # rows 0 and 7 of the reversed order: texts 7 and 0
    assert padded.shape == (2, 6, 5) and padded.dtype == np.float32
    np.testing.assert_allclose(padded[1, :1], rows["text 0"], rtol=1e-3, atol=1e-3)
    assert not padded[1, 1:].any() and not padded[0, len(rows["text 7"]):].any()  # zeros after each row's end
    view = again.rows([7, 0])  # a view, as Rows is for fixed-shape outputs
    assert len(view) == 2 and list(view.lengths([0, 1])) == [len(rows["text 0"]), len(rows["text 7"])]
