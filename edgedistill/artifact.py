"""The artifact directory: manifest schema, atomic write (temp dir, then rename), file hashes and their check."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from edgedistill.errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.md"


class Manifest(BaseModel):
    """Everything needed to trust, reproduce and run an artifact. Sections are plain JSON objects."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    family: str = "text-encoder"  # the model family that built it: text-encoder, causal-lm
    edgedistill_version: str
    target: dict[str, Any]
    teacher: dict[str, Any]
    student: dict[str, Any]
    data: dict[str, Any]
    distillation: dict[str, Any]
    export: dict[str, Any]
    optimization: dict[str, Any]
    quantization: dict[str, Any]
    model: dict[str, Any]
    metrics: dict[str, Any]
    latency: dict[str, Any]
    sizes: dict[str, Any]
    versions: dict[str, str]
    seed: int
    search: dict[str, Any] | None = None  # compile --search: every student measured, the front, the choice
    timings: dict[str, float | int] = {}  # wall seconds per compile stage (load_s, distill_s or search_s, build_s)
    files: dict[str, str] = {}


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_artifact(final_dir: Path, files: dict[str, Path], manifest: Manifest, report_md: str) -> Path:
    """Write files + manifest.json (with every file's sha256) + report.md into `final_dir`, atomically.

    Everything is written to a temporary sibling directory, then renamed into place, so a crash or a failed check
    never leaves a half-written artifact; an older artifact at `final_dir` is replaced only once the new one is whole.
    """
    reserved = {MANIFEST, REPORT} & set(files)
    if reserved:
        raise ValueError(f"artifact files may not be named {sorted(reserved)}: edgedistill writes those itself")
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", suffix=".tmp", dir=final_dir.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes 0700; an artifact is shared like any output directory
        for name, src in files.items():
            shutil.copyfile(src, staging / name)
        (staging / REPORT).write_text(report_md, encoding="utf-8")
        hashes = {name: sha256_file(staging / name) for name in sorted([*files, REPORT])}
        manifest = manifest.model_copy(update={"files": hashes})
        (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
        old = None
        if final_dir.exists():
            old = final_dir.with_name(f".{final_dir.name}.old.{os.getpid()}")
            os.rename(final_dir, old)
        os.rename(staging, final_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final_dir


def read_manifest(artifact_dir: Path) -> Manifest:
    """Return the manifest of an artifact directory, or raise ArtifactError."""
    path = artifact_dir / MANIFEST
    if not artifact_dir.is_dir():
        raise ArtifactError(f"artifact directory {artifact_dir} does not exist", hint="pass a directory written by `edgedistill compile`")
    if not path.is_file():
        raise ArtifactError(f"{artifact_dir} has no {MANIFEST}", hint="pass a directory written by `edgedistill compile`")
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except (ValidationError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not a valid edgedistill manifest ({_first_error(e)})",
                            hint="the file was edited or truncated; re-run compile") from None


def verify_files(artifact_dir: Path) -> Manifest:
    """Return the manifest after checking every listed file exists and matches its sha256; raise ArtifactError if not."""
    manifest = read_manifest(artifact_dir)
    unlisted = sorted(p.name for p in artifact_dir.iterdir() if p.name not in manifest.files and p.name != MANIFEST)
    if unlisted:
        raise ArtifactError(f"{artifact_dir}: {', '.join(unlisted)} not listed in the manifest",
                            hint="an artifact holds exactly the files compile wrote; remove the extra files or re-run compile")
    for name, expected in manifest.files.items():
        path = artifact_dir / name
        if not path.is_file():
            raise ArtifactError(f"{artifact_dir}: {name} is listed in the manifest but missing", hint="re-run compile")
        if sha256_file(path) != expected:
            raise ArtifactError(f"{artifact_dir}: {name} does not match its sha256 in the manifest",
                                hint="the file was modified or corrupted after compile; re-run compile")
    return manifest


def _first_error(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        return f"field '{'.'.join(str(p) for p in err['loc']) or '(top level)'}': {err['msg']}"
    return str(e).splitlines()[0]


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
