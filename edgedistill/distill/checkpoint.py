"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, one directory swapped in
atomically. A checkpoint holds the student, the best student so far, the optimizer and scheduler states, every
process's RNG state and the data position (epoch, batches done in it), so a resumed run continues bit for bit."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgedistill.errors import EdgeDistillError

STATE = "state.json"


@dataclass
class Position:
    step: int
    epoch: int
    batch_in_epoch: int


def _optimizer_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for pid, st in state_dict["state"].items():
        meta["state"][str(pid)] = []
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
                meta["state"][str(pid)].append(k)
            else:
                raise TypeError(f"optimizer state {k} is not a tensor")
    return tensors, meta


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {int(pid): {k: tensors[f"{pid}.{k}"] for k in keys} for pid, keys in meta["state"].items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the state dict on the CPU with tensors that share memory copied apart: safetensors refuses shared
    storage, and tied weights (a language model's embedding and LM head) share it. Loading writes the same values
    into the tied parameter twice."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def save_checkpoint(directory: Path, *, key: str, position: Position, model, best_state: dict[str, torch.Tensor],
                    optimizer, scheduler, extra: dict, rank: int = 0, world: int = 1, barrier=lambda: None) -> None:
    """Write the checkpoint to `directory` (replacing an older one whole). Every process writes its RNG state; the
    main process writes the rest and swaps the directory in."""
    tmp = directory.with_name(directory.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    save_file(_rng_state(), str(tmp / f"rng-{rank}.safetensors"))
    barrier()
    if rank != 0:
        barrier()
        return
    save_file(unshared(model.state_dict()), str(tmp / "student.safetensors"))
    save_file(unshared(best_state), str(tmp / "best.safetensors"))
    opt_tensors, opt_meta = _optimizer_tensors(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    meta = {"key": key, "world": world, "position": position.__dict__, "optimizer": opt_meta,
            "scheduler": scheduler.state_dict(), **extra}
    (tmp / STATE).write_text(json.dumps(meta), encoding="utf-8")
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    barrier()


@dataclass
class Checkpoint:
    position: Position
    student: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: dict[str, torch.Tensor]
    extra: dict


def load_checkpoint(directory: Path, key: str, rank: int = 0, world: int = 1) -> Checkpoint | None:
    """Return the checkpoint in `directory`, None if there is none; raise if it belongs to other inputs."""
    state_file = directory / STATE
    old = directory.with_name(directory.name + ".old")
    if not state_file.is_file() and (old / STATE).is_file():  # killed between the two renames of save_checkpoint
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(old, directory)
    if not state_file.is_file():
        return None
    def unreadable(e: Exception) -> EdgeDistillError:
        return EdgeDistillError(f"the checkpoint in {directory} is unreadable ({str(e).splitlines()[0][:160]})",
                                hint="delete it to start the distillation over")

    try:
        meta = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise unreadable(e) from None
    if meta.get("world") != world:  # checked before the key, which covers the process count too
        raise EdgeDistillError(f"the checkpoint was written by {meta.get('world')} processes, this run has {world}",
                               hint=f"resume with --num_processes {meta.get('world')}")
    if meta.get("key") != key:
        raise EdgeDistillError(f"the checkpoint in {directory} is from a run with other inputs or settings",
                               hint="resume with the original command, or delete the checkpoint to start over")
    try:
        student = load_file(str(directory / "student.safetensors"))
        best = load_file(str(directory / "best.safetensors"))
        opt = _optimizer_state(load_file(str(directory / "optimizer.safetensors")), meta["optimizer"])
        rng = load_file(str(directory / f"rng-{rank}.safetensors"))
    except Exception as e:  # noqa: BLE001  truncated or foreign files (safetensors raises its own error type)
        raise unreadable(e) from None
    extra = {k: v for k, v in meta.items() if k not in ("key", "world", "position", "optimizer", "scheduler")}
    return Checkpoint(Position(**meta["position"]), student, best, opt, meta["scheduler"], rng, extra)


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
