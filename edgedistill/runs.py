"""A compile's run directory in OUT: the lock that keeps a second compile out, and the record of the compile's
arguments that `compile --resume OUT` re-reads."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
from pathlib import Path

from edgedistill.errors import EdgeDistillError

RUN_DIR = ".edgedistill-run"
LOCK = ".edgedistill.lock"


@contextlib.contextmanager
def run_lock(out_dir: Path):
    """Hold an exclusive lock on out_dir for the whole compile; a second compile into it fails at once."""
    path = out_dir / LOCK
    out_dir.mkdir(parents=True, exist_ok=True)  # compile() checked it is writable, then left it uncreated
    f = path.open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise EdgeDistillError(f"another edgedistill compile is writing to {out_dir} ({holder})",
                               hint="wait for it to finish, or pass a different --out") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {platform.node()}")
        f.flush()
        yield
    finally:
        f.seek(0)
        f.truncate()
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def save_run(out_dir: Path, teacher_spec, data_path, target_specs, options: dict) -> None:
    """Record the compile's arguments in out_dir, for `compile --resume OUT`."""
    run_dir = out_dir / RUN_DIR
    run_dir.mkdir(exist_ok=True)

    def absolute(spec):  # a path typed relative to where the compile started must still resolve on --resume
        return str(Path(spec).resolve()) if spec is not None and Path(spec).exists() else spec

    options = {**options, "resume": False, "cache_dir": absolute(options.get("cache_dir"))}
    record = {"teacher": absolute(teacher_spec), "data": absolute(data_path),
              "targets": [absolute(t) for t in target_specs], "options": options}
    tmp = run_dir / f".run.json.{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    os.replace(tmp, run_dir / "run.json")


def load_run(out_dir: Path, parse_options) -> tuple[str | None, str | None, list[str], object]:
    """Return (teacher, data, targets, parse_options(options)) of the compile that wrote out_dir."""
    path = out_dir / RUN_DIR / "run.json"
    if not path.is_file():
        raise EdgeDistillError(f"{out_dir} holds no interrupted compile ({path} is missing)",
                               hint="pass the --out directory of a compile that was stopped")
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        opts = parse_options(rec["options"])
    except (ValueError, KeyError, TypeError) as e:
        raise EdgeDistillError(f"{path} is unreadable ({e})", hint="start the compile again without --resume") from None
    return rec["teacher"], rec["data"], rec["targets"], opts
