"""`edgedistill generate`: stream text from a causal-LM artifact with onnxruntime and its tokenizer, nothing else."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from edgedistill.artifact import read_manifest
from edgedistill.errors import ArtifactError, DataError
from edgedistill.runtimes.ort_lm import OrtCausalLM


class ArtifactLM:
    """A causal-LM artifact opened for generation: runner, tokenizer, context length; `last_stats` after a stream."""

    def __init__(self, runner: OrtCausalLM, tokenizer, context: int) -> None:
        self.runner, self.tokenizer, self.context = runner, tokenizer, context
        self.last_stats: dict | None = None


def open_artifact(artifact_dir: Path, threads: int | None = None) -> ArtifactLM:
    """Return the artifact in `artifact_dir` ready to generate, or raise ArtifactError if it is not a causal LM."""
    import os

    from transformers import AutoTokenizer

    manifest = read_manifest(artifact_dir)
    if manifest.family != "causal-lm":
        raise ArtifactError(f"{artifact_dir} holds a {manifest.family} artifact, not a language model",
                            hint="generate runs artifacts compiled from a causal LM (e.g. `edgedistill compile smollm2`)")
    threads = threads or min(int(manifest.target.get("threads", 1)), os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(artifact_dir, local_files_only=True)
    return ArtifactLM(OrtCausalLM(artifact_dir / manifest.model["file"], threads), tokenizer,
                      int(manifest.teacher["context"]))


def stream(lm: ArtifactLM, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, seed: int = 0, chat: bool = False) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece as the tokens come."""
    tok = lm.tokenizer
    if chat:
        if not getattr(tok, "chat_template", None):
            raise DataError("this artifact's tokenizer has no chat template", hint="leave out --chat")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError("the prompt is empty", hint="pass some text with --prompt")
    if len(ids) + max_new_tokens > lm.context:
        raise DataError(f"the prompt ({len(ids)} tokens) plus --max-new-tokens {max_new_tokens} exceeds the model's "
                        f"context of {lm.context} tokens", hint="shorten the prompt or lower --max-new-tokens")
    new: list[int] = []
    shown = ""
    start = time.perf_counter()
    first_at = None
    for token in lm.runner.generate(ids, max_new_tokens, temperature, top_k, top_p, seed, tok.eos_token_id):
        first_at = first_at or time.perf_counter()
        if token == tok.eos_token_id:
            break
        new.append(token)
        text = tok.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # a multi-byte character still incomplete: wait for its next token
            yield text[len(shown):]
            shown = text
    end = time.perf_counter()
    decode_s = end - (first_at or end)
    lm.last_stats = {"prompt_tokens": len(ids), "new_tokens": len(new), "prefill_ms": ((first_at or end) - start) * 1e3,
                     "decode_tokens_per_s": (len(new) - 1) / decode_s if len(new) > 1 and decode_s > 0 else 0.0}
