"""Transfer sets: file formats, labels, errors, the deterministic split, the built-in English set, content hash."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgedistill.data import (
    TransferSet,
    _content_sha256,
    builtin_english_texts,
    load_transfer_set,
    split_indices,
)
from edgedistill.errors import DataError

LABELS = ["class_0", "class_1", "class_2"]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---- .txt --------------------------------------------------------------------------------------------------------

def test_txt_skips_blank_lines_and_strips(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first text\n\n   \n  second text  \n\nthird\n", encoding="utf-8")
    ts = load_transfer_set(path)
    assert isinstance(ts, TransferSet)
    assert ts.texts == ["first text", "second text", "third"]
    assert ts.labels is None
    assert len(ts) == 3
    assert ts.source == str(path)
    assert len(ts.sha256) == 64


def test_txt_fixture(text_file):
    ts = load_transfer_set(text_file)
    assert len(ts) == 240
    assert all(t and t == t.strip() for t in ts.texts)


def test_txt_crlf_and_bom(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffalpha\r\nbeta\r\n".encode("utf-8"))
    assert load_transfer_set(path).texts == ["alpha", "beta"]


def test_unknown_suffix_read_as_text(tmp_path):
    path = tmp_path / "t.data"
    path.write_text("one\ntwo\n", encoding="utf-8")
    assert load_transfer_set(path).texts == ["one", "two"]


def test_max_texts(tmp_path, labelled_jsonl):
    ts = load_transfer_set(labelled_jsonl, max_texts=10)
    assert len(ts) == 10 and len(ts.labels) == 10
    full = load_transfer_set(labelled_jsonl)
    assert ts.texts == full.texts[:10] and ts.labels == full.labels[:10]


# ---- .jsonl ------------------------------------------------------------------------------------------------------

def test_jsonl_without_labels(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a b"}, {"text": "c d", "other": 1}, {"text": "e"}])
    ts = load_transfer_set(path)
    assert ts.texts == ["a b", "c d", "e"]
    assert ts.labels is None


def test_jsonl_with_int_labels(labelled_jsonl):
    ts = load_transfer_set(labelled_jsonl, label_names=LABELS)
    raw = [json.loads(line) for line in labelled_jsonl.read_text().splitlines()]
    assert ts.texts == [r["text"] for r in raw]
    assert ts.labels == [r["label"] for r in raw]
    assert set(ts.labels) <= {0, 1, 2}


def test_jsonl_blank_lines_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "x", "label": 0}\n\n{"text": "y", "label": 1}\n', encoding="utf-8")
    ts = load_transfer_set(path)
    assert ts.texts == ["x", "y"] and ts.labels == [0, 1]


def test_jsonl_label_names_mapped_to_ids(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "class_2"}, {"text": "b", "label": "class_0"},
                                         {"text": "c", "label": "class_1"}])
    ts = load_transfer_set(path, label_names=LABELS)
    assert ts.labels == [2, 0, 1]


def test_jsonl_custom_columns(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"sentence": "a", "y": 1}, {"sentence": "b", "y": 0}])
    ts = load_transfer_set(path, text_column="sentence", label_column="y")
    assert ts.texts == ["a", "b"] and ts.labels == [1, 0]


# ---- .csv --------------------------------------------------------------------------------------------------------

def test_csv_with_text_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('id,body\n1,"hello, world"\n2,second row\n3,  \n4,third\n', encoding="utf-8")
    ts = load_transfer_set(path, text_column="body")
    assert ts.texts == ["hello, world", "second row", "third"]
    assert ts.labels is None


def test_csv_with_label_names(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nfirst,class_1\nsecond,class_2\nthird,0\n", encoding="utf-8")
    ts = load_transfer_set(path, label_names=LABELS)
    assert ts.texts == ["first", "second", "third"]
    assert ts.labels == [1, 2, 0]


def test_csv_missing_column_lists_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,body\n1,a\n2,b\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        load_transfer_set(path, text_column="text")
    assert "'text'" in exc.value.message
    assert "body" in exc.value.message and "id" in exc.value.message


# ---- errors ------------------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_transfer_set(tmp_path / "nope.txt")


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        load_transfer_set(tmp_path)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"e{suffix}"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="0 text"):
        load_transfer_set(path)


def test_empty_csv(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="is empty"):
        load_transfer_set(path)


def test_csv_header_only(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(DataError, match="0 text"):
        load_transfer_set(path)


def test_only_blank_lines(tmp_path):
    path = tmp_path / "e.txt"
    path.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="0 text"):
        load_transfer_set(path)


def test_single_line(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("just one\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        load_transfer_set(path)
    assert "1 text" in exc.value.message and "at least 2" in exc.value.message


def test_max_texts_one_is_too_few(text_file):
    with pytest.raises(DataError, match="at least 2"):
        load_transfer_set(text_file, max_texts=1)


def test_non_utf8_names_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine line\nanother\ncaf\xe9 latin-1\nlast\n")
    with pytest.raises(DataError) as exc:
        load_transfer_set(path)
    assert "not UTF-8" in exc.value.message
    assert "line 3" in exc.value.message


def test_non_utf8_line_number_with_bom(tmp_path):
    # Same bad byte on line 2, in a file that starts with a UTF-8 BOM.
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfab\n\xffcd\n")
    with pytest.raises(DataError) as exc:
        load_transfer_set(path)
    assert "line 2" in exc.value.message


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok2"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(DataError) as exc:
        load_transfer_set(path)
    assert f"{path}:3" in exc.value.message
    assert "not valid JSON" in exc.value.message


def test_missing_text_field(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"body": "b"}])
    with pytest.raises(DataError) as exc:
        load_transfer_set(path)
    assert f"{path}:2" in exc.value.message and "'text'" in exc.value.message


def test_text_field_not_a_string(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": 5}])
    with pytest.raises(DataError, match="'text'"):
        load_transfer_set(path)


def test_jsonl_line_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n["text", "b"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=":2"):
        load_transfer_set(path)


def test_labels_on_some_records_only(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b"}, {"text": "c", "label": 1}])
    with pytest.raises(DataError) as exc:
        load_transfer_set(path)
    assert "some records only" in exc.value.message and "'label'" in exc.value.message


def test_unknown_label_name(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "class_0"}, {"text": "b", "label": "positive"}])
    with pytest.raises(DataError) as exc:
        load_transfer_set(path, label_names=LABELS)
    assert "record 2" in exc.value.message
    assert "'positive'" in exc.value.message
    assert "class_0" in exc.value.message  # lists the teacher's labels


def test_label_id_out_of_range(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 3}])
    with pytest.raises(DataError) as exc:
        load_transfer_set(path, label_names=LABELS)
    assert "record 2" in exc.value.message and "3 classes" in exc.value.message


def test_label_name_without_teacher_labels(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    with pytest.raises(DataError, match="record 1"):
        load_transfer_set(path)


# ---- split_indices -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,frac", [(240, 0.1), (2, 0.1), (3, 0.5), (10, 0.01), (1000, 0.25)])
def test_split_partition(n, frac):
    train, val = split_indices(n, frac, seed=0)
    assert len(val) >= 1 and len(train) >= 1
    assert len(np.intersect1d(train, val)) == 0
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(n))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)


def test_split_size():
    train, val = split_indices(240, 0.1, seed=0)
    assert len(val) == 24 and len(train) == 216


def test_split_max_val():
    _, val = split_indices(100_000, 0.5, seed=0, max_val=2000)
    assert len(val) == 2000


def test_split_deterministic_per_seed():
    a = split_indices(500, 0.2, seed=7)
    b = split_indices(500, 0.2, seed=7)
    c = split_indices(500, 0.2, seed=8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5])
def test_split_bad_fraction(frac):
    with pytest.raises(DataError, match="val-fraction"):
        split_indices(100, frac, seed=0)


# ---- built-in English set ----------------------------------------------------------------------------------------

def test_builtin_english_texts():
    a = builtin_english_texts(limit=500)
    b = builtin_english_texts(limit=500)
    assert len(a) == 500
    assert a == b
    assert all(isinstance(t, str) and t.strip() for t in a)
    assert len(set(a)) >= 450


def test_load_transfer_set_none_is_builtin(monkeypatch):
    import edgedistill.data as data

    monkeypatch.setattr(data, "builtin_english_texts", lambda: ["one builtin text", "another builtin text"])
    ts = load_transfer_set(None)
    assert ts.source == "builtin:english"
    assert ts.texts == ["one builtin text", "another builtin text"] and ts.labels is None


# ---- sha256 ------------------------------------------------------------------------------------------------------

def test_sha256_identical_content_same_hash(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": 0}, {"text": "y", "label": 1}])
    b = tmp_path / "b.txt"
    b.write_text("x\ny\n", encoding="utf-8")
    c = tmp_path / "c.txt"
    c.write_text("x\n\ny\n", encoding="utf-8")
    assert load_transfer_set(b).sha256 == load_transfer_set(c).sha256
    assert load_transfer_set(a).sha256 != load_transfer_set(b).sha256  # labels count


def test_sha256_changes_with_text(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": 0}, {"text": "y", "label": 1}])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": "x", "label": 0}, {"text": "z", "label": 1}])
    assert load_transfer_set(a).sha256 != load_transfer_set(b).sha256


def test_sha256_changes_with_label(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": 0}, {"text": "y", "label": 1}])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": "x", "label": 0}, {"text": "y", "label": 2}])
    assert load_transfer_set(a).sha256 != load_transfer_set(b).sha256


def test_sha256_text_boundaries_matter():
    assert _content_sha256(["ab", "c"], None) != _content_sha256(["a", "bc"], None)
    assert _content_sha256(["a", "b"], [1, 2]) != _content_sha256(["a", "b"], [2, 1])
    assert _content_sha256(["a", "b"], [0, 0]) != _content_sha256(["a", "b"], None)


def test_builtin_varied_texts_mix_sources_and_lengths():
    from edgedistill.data import BUILTIN_VARIED, builtin_texts

    a = builtin_texts(BUILTIN_VARIED, 900)
    assert a == builtin_texts(BUILTIN_VARIED, 900) and a[:300] == builtin_texts(BUILTIN_VARIED, 300)  # prefix-stable
    assert len(a) == len(set(a)) == 900 and all(t.strip() == t and t for t in a)
    lengths = sorted(len(t) for t in a)
    assert lengths[450] > 60 and lengths[-90] > 250, lengths[::90]  # longer and more varied than the glosses alone
    from edgedistill.data import out_of_domain_texts

    ood = set(out_of_domain_texts())
    assert not ood & set(a)


def test_a_builtin_set_can_be_named_as_data():
    from edgedistill.data import BUILTIN_VARIED

    ts = load_transfer_set(BUILTIN_VARIED, max_texts=50)
    assert ts.source == BUILTIN_VARIED and len(ts) == 50 and ts.labels is None
    with pytest.raises(DataError, match="builtin:varied"):
        load_transfer_set("builtin:nothing")
