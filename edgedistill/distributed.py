"""Process topology for `accelerate launch` / `torchrun` runs, from Accelerate's PartialState (no hand-made groups).

A plain `edgedistill compile` is one process (rank 0 of 1). Under `accelerate launch --num_processes N` every
process runs the pipeline: they label disjoint shards of the transfer set, train one student with DDP, and only
the main process builds, validates and writes the artifacts.
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def state():
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def rank() -> int:
    return state().process_index


def world() -> int:
    return state().num_processes


def is_main() -> bool:
    return state().is_main_process


def barrier() -> None:
    if world() > 1:
        state().wait_for_everyone()
