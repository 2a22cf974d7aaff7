"""Causal LM -> ONNX with a KV cache, by Optimum's exporter (task text-generation-with-past, so every runner that
reads Optimum's naming runs it), then checked before anything else runs on it:

- one full pass of the ONNX graph equals the torch student's logits;
- decoding token by token through the cache gives the logits of one full pass (the cache is wired right);
- greedy generation of 32 tokens is the torch student's, token for token.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgedistill.errors import ExportError
from edgedistill.runtimes.ort_lm import OrtCausalLM

LOGITS_ATOL = 1e-3  # fp32 graph vs torch, and cached vs full pass (logits are O(10))


@dataclass
class LMExport:
    """The exported graph (and the files a runner needs beside it) and what the checks measured."""

    model: Path
    side_files: list[Path]
    checks: dict


def export_causal_lm(student: torch.nn.Module, tokenizer, out_dir: Path, opset: int, check_windows: np.ndarray,
                     greedy_tokens: int = 32) -> LMExport:
    """Export `student` to out_dir/model.onnx with a KV cache; raise ExportError if any check fails."""
    from optimum.exporters.onnx import main_export

    hf_dir = out_dir / "hf"
    student.save_pretrained(hf_dir, safe_serialization=True)
    tokenizer.save_pretrained(hf_dir)
    onnx_dir = out_dir / "onnx"
    sink = io.StringIO()
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")  # the tracer's and the exporter's warnings about dynamic control flow
            main_export(str(hf_dir), output=str(onnx_dir), task="text-generation-with-past", opset=opset,
                        do_validation=False, library_name="transformers", device="cpu", no_post_process=True)
    except Exception as e:  # noqa: BLE001  optimum raises many types; the first line says what it could not do
        raise ExportError(f"Optimum could not export the student: {str(e).strip().splitlines()[0][:300]}",
                          hint="report this model to the edgedistill developers") from None
    finally:
        logging.disable(logging.NOTSET)
    model = onnx_dir / "model.onnx"
    side = [p for p in sorted(onnx_dir.iterdir()) if p.name != "model.onnx" and p.is_file()]
    checks = check_lm_graph(student, OrtCausalLM(model, threads=1), check_windows, greedy_tokens)
    return LMExport(model, side, checks)


@torch.no_grad()
def torch_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """Return `new_tokens` greedy tokens of a transformers causal LM (its own cache), never stopping early."""
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=0,
                         eos_token_id=None)
    return out[0, len(prompt):].tolist()


def check_lm_graph(student: torch.nn.Module, runner: OrtCausalLM, windows: np.ndarray, greedy_tokens: int) -> dict:
    """Return the three export checks' figures; raise ExportError if one fails."""
    windows = np.asarray(windows[:2], dtype=np.int64)
    with torch.no_grad():
        expected = student(input_ids=torch.from_numpy(windows), use_cache=False).logits.float().numpy()
    full = runner.logits(windows)
    diff_torch = float(np.max(np.abs(full - expected)))
    # token by token through the cache, on the first window (the prefix in one call, then one token at a time)
    split = min(8, windows.shape[1] - 1)
    step_logits, past = runner.forward(windows[:1, :split])
    stepped = [step_logits[0]]
    for t in range(split, windows.shape[1]):
        logits, past = runner.forward(windows[:1, t : t + 1], past)
        stepped.append(logits[0])
    diff_cache = float(np.max(np.abs(np.concatenate(stepped) - full[0])))
    prompt = windows[0, :16].tolist()
    ours = list(runner.generate(prompt, greedy_tokens))
    theirs = torch_greedy(student, prompt, greedy_tokens)
    checks = {"max_abs_diff_vs_torch": diff_torch, "max_abs_diff_cached_vs_full_pass": diff_cache,
              "greedy_tokens_checked": greedy_tokens, "greedy_identical_to_torch": ours == theirs}
    if not diff_torch <= LOGITS_ATOL * 10:
        raise ExportError(f"the exported graph's logits differ from the torch student's by {diff_torch:.2e}",
                          hint="report this model to the edgedistill developers")
    if not diff_cache <= LOGITS_ATOL * 10:
        raise ExportError(f"decoding through the KV cache differs from a full pass by {diff_cache:.2e}",
                          hint="report this model to the edgedistill developers")
    if ours != theirs:
        first = next(i for i, (a, b) in enumerate(zip(ours + [None] * greedy_tokens, theirs)) if a != b)
        raise ExportError(f"greedy generation from the exported graph leaves the torch student's at token {first}",
                          hint="report this model to the edgedistill developers")
    return checks
