"""Tokenizers in artifacts and cache keys: saved with the validated length, fingerprinted by behaviour."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path


def save_tokenizer(tokenizer, max_length: int, out_dir: Path) -> None:
    """Save the tokenizer with the truncation length the artifact was validated at (and padding), also in tokenizer.json."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_max_length = max_length
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # plain `tokenizers` users get the same truncation and padding
        backend.enable_truncation(max_length=max_length)
        backend.enable_padding(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    tokenizer.save_pretrained(out_dir)


def tokenizer_fingerprint(tokenizer) -> str:
    """Return a hash of the tokenizer's behaviour (the teacher's sha256 covers config and weights, not the tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # truncation/padding are per-call state that transformers sets on the backend: not identity
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        text = json.dumps(spec, sort_keys=True)
    else:
        text = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
