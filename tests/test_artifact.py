"""Artifact directory: atomic write, manifest hashes, verification."""
from __future__ import annotations

import hashlib
import json

import pytest

from edgedistill.artifact import (
    MANIFEST,
    REPORT,
    SCHEMA_VERSION,
    Manifest,
    read_manifest,
    sha256_file,
    verify_files,
    write_artifact,
    write_json,
)
from edgedistill.errors import ArtifactError

SECTIONS = ("target", "teacher", "student", "data", "distillation", "export", "optimization", "quantization",
            "model", "metrics", "latency", "sizes")


def make_manifest(**overrides) -> Manifest:
    fields = {s: {"section": s} for s in SECTIONS}
    fields.update(edgedistill_version="0.1.0", versions={"python": "3.11"}, seed=7)
    fields.update(overrides)
    return Manifest(**fields)


@pytest.fixture
def sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.onnx").write_bytes(bytes(range(256)) * 40)
    (src / "tok.json").write_text('{"vocab": ["a", "b"]}', encoding="utf-8")
    return {"model.onnx": src / "model.onnx", "tokenizer.json": src / "tok.json"}


@pytest.fixture
def artifact(tmp_path, sources):
    return write_artifact(tmp_path / "out" / "tiny-cpu", sources, make_manifest(), "# report\n")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _siblings(parent):
    return sorted(p.name for p in parent.iterdir())


# ---- write -------------------------------------------------------------------------------------------------------

def test_write_artifact_layout(artifact, sources, tmp_path):
    assert artifact == tmp_path / "out" / "tiny-cpu"
    assert sorted(p.name for p in artifact.iterdir()) == sorted(["model.onnx", "tokenizer.json", MANIFEST, REPORT])
    assert (artifact / "model.onnx").read_bytes() == sources["model.onnx"].read_bytes()
    assert (artifact / "tokenizer.json").read_bytes() == sources["tokenizer.json"].read_bytes()
    assert (artifact / REPORT).read_text(encoding="utf-8") == "# report\n"
    # only the artifact in the parent: no staging or .old directories left behind
    assert _siblings(artifact.parent) == ["tiny-cpu"]


def test_manifest_file_hashes(artifact):
    data = json.loads((artifact / MANIFEST).read_text(encoding="utf-8"))
    assert set(data["files"]) == {"model.onnx", "tokenizer.json", REPORT}
    for name, digest in data["files"].items():
        assert digest == _sha((artifact / name).read_bytes())
        assert digest == sha256_file(artifact / name)
    assert MANIFEST not in data["files"]


def test_manifest_content_round_trip(artifact):
    data = json.loads((artifact / MANIFEST).read_text(encoding="utf-8"))
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["seed"] == 7
    assert data["teacher"] == {"section": "teacher"}
    m = read_manifest(artifact)
    assert m.edgedistill_version == "0.1.0"
    assert m.files == data["files"]
    assert m.model_dump(exclude={"files"}) == make_manifest().model_dump(exclude={"files"})


def test_write_does_not_mutate_given_manifest(tmp_path, sources):
    m = make_manifest()
    write_artifact(tmp_path / "a", sources, m, "r")
    assert m.files == {}


def test_write_creates_missing_parents(tmp_path, sources):
    out = write_artifact(tmp_path / "x" / "y" / "z", sources, make_manifest(), "r")
    assert (out / MANIFEST).is_file()
    verify_files(out)


def test_sha256_file(tmp_path):
    f = tmp_path / "f.bin"
    data = b"x" * (3 * (1 << 20) + 17)  # more than one read chunk
    f.write_bytes(data)
    assert sha256_file(f) == _sha(data)


# ---- verify ------------------------------------------------------------------------------------------------------

def test_verify_passes(artifact):
    m = verify_files(artifact)
    assert isinstance(m, Manifest)
    assert set(m.files) == {"model.onnx", "tokenizer.json", REPORT}


def test_verify_detects_modified_file(artifact):
    data = bytearray((artifact / "model.onnx").read_bytes())
    data[100] ^= 0xFF
    (artifact / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as exc:
        verify_files(artifact)
    assert "model.onnx" in exc.value.message and "sha256" in exc.value.message


def test_verify_detects_modified_report(artifact):
    (artifact / REPORT).write_text("# edited\n", encoding="utf-8")
    with pytest.raises(ArtifactError, match="report.md"):
        verify_files(artifact)


def test_verify_detects_deleted_file(artifact):
    (artifact / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError) as exc:
        verify_files(artifact)
    assert "tokenizer.json" in exc.value.message and "missing" in exc.value.message


def test_verify_missing_manifest(artifact):
    (artifact / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        verify_files(artifact)


def test_verify_not_a_directory(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        verify_files(tmp_path / "nothing-here")


@pytest.mark.parametrize("content", [
    "{not json",
    "[]",
    '{"schema_version": 1}',
    b"\xff\xfe\x00garbage",
])
def test_verify_invalid_manifest(artifact, content):
    path = artifact / MANIFEST
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ArtifactError, match="not a valid edgedistill manifest"):
        verify_files(artifact)


def test_verify_manifest_with_unknown_field(artifact):
    data = json.loads((artifact / MANIFEST).read_text(encoding="utf-8"))
    data["surprise"] = 1
    (artifact / MANIFEST).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ArtifactError, match="not a valid edgedistill manifest"):
        verify_files(artifact)


def test_verify_detects_tampered_hash(artifact):
    data = json.loads((artifact / MANIFEST).read_text(encoding="utf-8"))
    data["files"]["model.onnx"] = "0" * 64
    (artifact / MANIFEST).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ArtifactError, match="model.onnx"):
        verify_files(artifact)


# ---- atomicity ---------------------------------------------------------------------------------------------------

def test_failed_write_leaves_nothing(tmp_path, sources):
    parent = tmp_path / "out"
    bad = dict(sources, **{"missing.bin": tmp_path / "does-not-exist.bin"})
    with pytest.raises(OSError):
        write_artifact(parent / "tiny-cpu", bad, make_manifest(), "r")
    assert not (parent / "tiny-cpu").exists()
    assert _siblings(parent) == []


def test_failed_rewrite_keeps_old_artifact(artifact, tmp_path, sources):
    before = {p.name: p.read_bytes() for p in artifact.iterdir()}
    bad = dict(sources, **{"missing.bin": tmp_path / "does-not-exist.bin"})
    with pytest.raises(OSError):
        write_artifact(artifact, bad, make_manifest(seed=99), "new report")
    assert {p.name: p.read_bytes() for p in artifact.iterdir()} == before
    assert _siblings(artifact.parent) == ["tiny-cpu"]
    verify_files(artifact)


def test_failure_after_copy_cleans_staging(tmp_path, sources, monkeypatch):
    import edgedistill.artifact as art

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(art, "sha256_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_artifact(tmp_path / "out" / "a", sources, make_manifest(), "r")
    assert _siblings(tmp_path / "out") == []


def test_rewrite_replaces_existing(artifact, tmp_path):
    (artifact / "stale.txt").write_text("from an older compile")
    new_src = tmp_path / "new.onnx"
    new_src.write_bytes(b"new model bytes")
    out = write_artifact(artifact, {"model.onnx": new_src}, make_manifest(seed=99), "# new report\n")
    assert out == artifact
    assert sorted(p.name for p in artifact.iterdir()) == sorted(["model.onnx", MANIFEST, REPORT])
    assert (artifact / "model.onnx").read_bytes() == b"new model bytes"
    assert (artifact / REPORT).read_text(encoding="utf-8") == "# new report\n"
    m = verify_files(artifact)
    assert m.seed == 99
    assert m.files["model.onnx"] == _sha(b"new model bytes")
    assert _siblings(artifact.parent) == ["tiny-cpu"]


def test_artifact_dir_is_not_private(artifact):
    # mkdtemp makes 0700; the artifact gets the umask's usual permissions
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert artifact.stat().st_mode & 0o777 == 0o777 & ~umask


# ---- write_json --------------------------------------------------------------------------------------------------

def test_write_json(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"a": [1, 2]})
    write_json(path, {"b": 3})
    assert json.loads(path.read_text()) == {"b": 3}
    assert _siblings(tmp_path) == ["x.json"]
