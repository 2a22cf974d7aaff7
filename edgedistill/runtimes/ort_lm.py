"""A causal LM with a KV cache in onnxruntime (Optimum's naming: input_ids, attention_mask, position_ids,
past_key_values.{i}.key|value -> logits, present.{i}.key|value): full passes, cached decoding, generation."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgedistill.runtimes.ort_cpu import cpu_session

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OrtCausalLM:
    """Runs an exported decoder with its KV cache. `past` is the list of (key, value) arrays a call returns."""

    def __init__(self, path: Path, threads: int = 1, session: ort.InferenceSession | None = None) -> None:
        self.path = Path(path)
        self.session = session or cpu_session(self.path, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        if "input_ids" not in inputs or self.num_layers == 0:
            raise ValueError(f"{path} is not a causal LM with a KV cache (inputs: {sorted(inputs)})")
        key = inputs["past_key_values.0.key"]
        self.kv_heads, self.head_dim = int(key.shape[1]), int(key.shape[3])
        self.kv_dtype = _ORT_TYPES[key.type]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [(np.zeros(shape, self.kv_dtype), np.zeros(shape, self.kv_dtype)) for _ in range(self.num_layers)]

    def forward(self, input_ids: np.ndarray, past: list | None = None) -> tuple[np.ndarray, list]:
        """Return (logits (B, T, V) float32, present) for `input_ids` (B, T) after the `past` tokens."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, new = input_ids.shape
        past = past if past is not None else self.empty_past(batch)
        done = past[0][0].shape[2]
        feeds = {"input_ids": input_ids, "attention_mask": np.ones((batch, done + new), np.int64)}
        if "position_ids" in self.input_names:
            feeds["position_ids"] = np.broadcast_to(np.arange(done, done + new, dtype=np.int64), (batch, new)).copy()
        for i, (k, v) in enumerate(past):
            feeds[f"past_key_values.{i}.key"] = k
            feeds[f"past_key_values.{i}.value"] = v
        outs = self.session.run(None, feeds)
        named = dict(zip(self.output_names, outs))
        present = [(named[f"present.{i}.key"], named[f"present.{i}.value"]) for i in range(self.num_layers)]
        return np.asarray(named["logits"], dtype=np.float32), present

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Return the logits of one full pass (no cache) over `input_ids` (B, T)."""
        return self.forward(input_ids)[0]

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, eos_token_id: int | None = None) -> Iterator[int]:
        """Yield new token ids one by one: greedy when temperature is 0, else sampled (top-k / top-p)."""
        rng = np.random.default_rng(seed)
        logits, past = self.forward(np.asarray([prompt_ids], dtype=np.int64))
        for step in range(max_new_tokens):
            token = pick_token(logits[0, -1], temperature, top_k, top_p, rng)
            yield token
            if (eos_token_id is not None and token == eos_token_id) or step == max_new_tokens - 1:
                return
            logits, past = self.forward(np.asarray([[token]], dtype=np.int64), past)


def pick_token(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """Return the next token: argmax at temperature 0, else a sample from the tempered, top-k/top-p-cut softmax."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < len(z):
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < top_p
        keep[0] = True  # the most likely token always stays (top_p 0 means greedy among the samplers)
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))
