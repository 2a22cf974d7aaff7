"""Fixtures: tiny BERT teachers built from configs (2 layers, hidden 32), small transfer sets, a test profile."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("EDGEDISTILL_QUIET", "1")

WORDS = ("the a red blue green small large fast slow dog cat bird fish tree house river road city car boat "
         "runs jumps sleeps eats sees likes walks swims flies reads writes sings over under near with from into "
         "happy sad old new bright dark quiet loud cold warm stone glass paper metal light water fire wind").split()


def make_vocab() -> list[str]:
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def _save_tokenizer(path: Path) -> None:
    from transformers import BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(make_vocab()) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True).save_pretrained(path)


def tiny_config(num_labels: int | None = None):
    from transformers import BertConfig

    kwargs = dict(vocab_size=len(make_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64)
    if num_labels:
        kwargs.update(num_labels=num_labels, id2label={i: f"class_{i}" for i in range(num_labels)},
                      label2id={f"class_{i}": i for i in range(num_labels)})
    return BertConfig(**kwargs)


def build_tiny_bert(path: Path, *, classification: bool = False, sentence_transformers: bool = False, seed: int = 0) -> Path:
    """Write a tiny BERT model directory (safetensors + tokenizer), optionally as a sentence-transformers dir."""
    import torch
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_config(3)) if classification else BertModel(tiny_config(), add_pooling_layer=False)
    model.save_pretrained(path)
    _save_tokenizer(path)
    if sentence_transformers:
        (path / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
        (path / "1_Pooling").mkdir()
        (path / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
        (path / "2_Normalize").mkdir()
        (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    return path


def tiny_workspace(root: Path, texts: int = 200) -> tuple[Path, Path]:
    """Write a tiny sentence-transformers teacher and a transfer set of `texts` lines under `root`."""
    teacher = build_tiny_bert(root / "teacher", sentence_transformers=True)
    data = root / "data.txt"
    data.write_text("\n".join(make_texts(texts)))
    return teacher, data


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """A tiny sentence-transformers teacher (mean pooling + normalize)."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-st"), sentence_transformers=True)


@pytest.fixture(scope="session")
def tiny_plain_encoder(tmp_path_factory) -> Path:
    """A tiny plain Hugging Face BertModel directory (mean pooling, no normalization)."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-hf"))


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    """A tiny BertForSequenceClassification teacher with 3 labels."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-cls"), classification=True)


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "transfer.txt"
    path.write_text("\n".join(make_texts(240)) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def labelled_jsonl(tmp_path) -> Path:
    rng = random.Random(1)
    path = tmp_path / "transfer.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": rng.randrange(3)}) + "\n" for t in make_texts(240, seed=2)))
    return path


def write_profile(path: Path, name: str = "tiny-cpu", min_cosine: float = 0.5, min_top1: float = 0.5,
                  quantization: str = "recipe: dynamic-int8\n  per_channel: true", optimization: str = "transformer-fusion") -> Path:
    path.write_text(f"""name: {name}
description: test profile
threads: 1
optimization: {optimization}
quantization:
  {quantization}
input_shape: {{batch: 1, sequence: 16}}
accuracy_budget: {{min_cosine: {min_cosine}, min_top1_agreement: {min_top1}}}
""")
    return path


@pytest.fixture
def profile_file(tmp_path) -> Path:
    return write_profile(tmp_path / "tiny-cpu.yaml")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path / "cache"))
