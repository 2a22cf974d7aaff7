"""Teacher loading (Hugging Face / sentence-transformers directories) and the text-encoder family's student derivation."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import build_tiny_bert, make_texts, make_vocab, tiny_config

from edgedistill.errors import CheckpointError
from edgedistill.families import family_for
from edgedistill.families.text_encoder import (
    EncoderWithHead,
    Pooling,
    TextEncoderFamily,
    evenly_spaced_layers,
)
from edgedistill.teachers.hf import checkpoint_sha256, count_parameters, load_teacher


def _copy(src, tmp_path, name="model"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _encode(teacher, texts):
    enc = teacher.tokenizer(texts, padding=True, truncation=True, max_length=teacher.max_length, return_tensors="pt")
    with torch.no_grad():
        return teacher.module(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))


# ---- loading -----------------------------------------------------------------------------------------------------

def test_load_sentence_transformers_encoder(tiny_encoder):
    t = load_teacher(str(tiny_encoder))
    assert t.task == "feature-extraction"
    assert t.module.pooling == Pooling(mode="mean", normalize=True)
    assert t.max_length == 32
    assert t.label_names is None
    assert t.name == str(tiny_encoder)
    assert t.path == tiny_encoder
    assert t.config.model_type == "bert"
    assert t.family.num_layers(t.config) == 2
    assert t.family.hidden_size(t.config) == 32
    assert t.sha256 == checkpoint_sha256(tiny_encoder)
    assert not t.module.training
    out = _encode(t, make_texts(4))
    assert out.shape == (4, 32)
    assert torch.allclose(out.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_load_plain_encoder(tiny_plain_encoder):
    t = load_teacher(str(tiny_plain_encoder))
    assert t.task == "feature-extraction"
    assert t.module.pooling.mode == "mean"
    assert t.module.pooling.normalize is False
    assert t.max_length == 64  # max_position_embeddings of the tiny config
    out = _encode(t, make_texts(3))
    assert out.shape == (3, 32)
    assert not torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-3)


def test_mean_pooling_ignores_padding(tiny_plain_encoder):
    t = load_teacher(str(tiny_plain_encoder))
    texts = make_texts(2, seed=5)
    texts = [texts[0], texts[0] + " " + texts[1]]
    batch = _encode(t, texts)
    alone = _encode(t, texts[:1])
    assert torch.allclose(batch[0], alone[0], atol=1e-5)


def test_load_classifier(tiny_classifier):
    t = load_teacher(str(tiny_classifier))
    assert t.task == "text-classification"
    assert t.label_names == ["class_0", "class_1", "class_2"]
    logits = _encode(t, make_texts(5))
    assert logits.shape == (5, 3)


def test_classifier_explicit_task(tiny_classifier):
    t = load_teacher(str(tiny_classifier), task="text-classification")
    assert t.task == "text-classification" and len(t.label_names) == 3


def test_text_classification_task_on_encoder(tiny_encoder):
    with pytest.raises(CheckpointError) as exc:
        load_teacher(str(tiny_encoder), task="text-classification")
    assert "sequence-classification head" in exc.value.message


def test_sentence_transformers_cls_pooling(tiny_encoder, tmp_path):
    path = _copy(tiny_encoder, tmp_path)
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert load_teacher(str(path)).module.pooling == Pooling(mode="cls", normalize=True)


def test_sentence_transformers_unsupported_module(tiny_encoder, tmp_path):
    path = _copy(tiny_encoder, tmp_path)
    modules = json.loads((path / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(CheckpointError, match="Dense"):
        load_teacher(str(path))


# ---- errors ------------------------------------------------------------------------------------------------------

def test_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        load_teacher(str(tmp_path / "no-such-model"))
    assert "does not exist" in exc.value.message


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"not a dir")
    with pytest.raises(CheckpointError) as exc:
        load_teacher(str(f))
    assert "is a file of weights, not a model" in exc.value.message and "its directory" in exc.value.hint


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as exc:
        load_teacher(str(tmp_path / "empty"))
    assert "no config.json" in exc.value.message


def test_config_not_json(tiny_plain_encoder, tmp_path):
    path = _copy(tiny_plain_encoder, tmp_path)
    (path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError) as exc:
        load_teacher(str(path))
    assert "config.json" in exc.value.message and "not valid JSON" in exc.value.message


def test_config_json_array(tiny_plain_encoder, tmp_path):
    path = _copy(tiny_plain_encoder, tmp_path)
    (path / "config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(CheckpointError, match="JSON object"):
        load_teacher(str(path))


def test_unsupported_model_type(tmp_path):
    # GPT-2 compiles as a causal LM now; a vision transformer is neither family
    from transformers import ViTConfig

    path = tmp_path / "vit"
    ViTConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32).save_pretrained(path)
    with pytest.raises(CheckpointError) as exc:
        load_teacher(str(path))
    assert "unsupported architecture" in exc.value.message
    assert "vit" in exc.value.message
    assert "bert" in exc.value.hint and "llama" in exc.value.hint


def test_unknown_model_type_in_config(tiny_plain_encoder, tmp_path):
    path = _copy(tiny_plain_encoder, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "no-such-architecture"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config"):
        load_teacher(str(path))


def test_truncated_weights(tiny_plain_encoder, tmp_path):
    path = _copy(tiny_plain_encoder, tmp_path)
    w = path / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        load_teacher(str(path))
    assert "cannot load weights" in exc.value.message
    assert "truncated or corrupt" in exc.value.hint


def test_corrupted_weights_header(tiny_plain_encoder, tmp_path):
    path = _copy(tiny_plain_encoder, tmp_path)
    w = path / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[:64] = b"\xff" * 64
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="cannot load weights"):
        load_teacher(str(path))


def test_no_weights_file(tiny_plain_encoder, tmp_path):
    path = _copy(tiny_plain_encoder, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as exc:
        load_teacher(str(path))
    assert "no weights" in exc.value.message
    assert "model.safetensors" in exc.value.message


def test_weights_of_another_architecture(tiny_plain_encoder, tmp_path):
    """Weights of a different size than config.json says cannot be loaded."""
    path = _copy(tiny_plain_encoder, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["hidden_size"] = 48
    cfg["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError):
        load_teacher(str(path))


def test_tokenizer_larger_than_vocab(tiny_plain_encoder, tmp_path):
    from transformers import AutoTokenizer

    path = _copy(tiny_plain_encoder, tmp_path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens(["zebra", "giraffe", "elephant"])
    tok.save_pretrained(path)
    with pytest.raises(CheckpointError) as exc:
        load_teacher(str(path))
    assert "tokenizer mismatch" in exc.value.message
    vocab = len(make_vocab())
    assert str(vocab + 3) in exc.value.message and str(vocab) in exc.value.message


def test_missing_tokenizer(tiny_plain_encoder, tmp_path):
    path = _copy(tiny_plain_encoder, tmp_path)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_teacher(str(path))


# ---- identity ----------------------------------------------------------------------------------------------------

def test_sha256_same_for_a_copy(tiny_plain_encoder, tmp_path):
    path = _copy(tiny_plain_encoder, tmp_path)
    assert checkpoint_sha256(path) == checkpoint_sha256(tiny_plain_encoder)
    # files that are not config/weights do not count
    (path / "README.md").write_text("notes")
    assert checkpoint_sha256(path) == checkpoint_sha256(tiny_plain_encoder)


def test_sha256_changes_with_weights(tiny_plain_encoder, tmp_path):
    other = build_tiny_bert(tmp_path / "seed1", seed=1)
    assert load_teacher(str(other)).sha256 != load_teacher(str(tiny_plain_encoder)).sha256

    path = _copy(tiny_plain_encoder, tmp_path)
    w = path / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0x01  # flip one bit in the last tensor's data
    w.write_bytes(bytes(data))
    assert checkpoint_sha256(path) != checkpoint_sha256(tiny_plain_encoder)


def test_sha256_changes_with_config(tiny_plain_encoder, tmp_path):
    path = _copy(tiny_plain_encoder, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["layer_norm_eps"] = 1e-6
    (path / "config.json").write_text(json.dumps(cfg))
    assert checkpoint_sha256(path) != checkpoint_sha256(tiny_plain_encoder)


# ---- family: evenly spaced layers --------------------------------------------------------------------------------

def test_evenly_spaced_layers_examples():
    assert evenly_spaced_layers(6, 3) == [0, 2, 5]
    assert evenly_spaced_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert evenly_spaced_layers(6, 6) == list(range(6))
    assert evenly_spaced_layers(6, 2) == [0, 5]
    assert evenly_spaced_layers(6, 1) == [5]


@pytest.mark.parametrize("num_teacher", range(2, 25))
def test_evenly_spaced_layers_properties(num_teacher):
    for n in range(2, num_teacher + 1):
        kept = evenly_spaced_layers(num_teacher, n)
        assert len(kept) == n
        assert kept[0] == 0 and kept[-1] == num_teacher - 1
        assert all(b > a for a, b in zip(kept, kept[1:]))
        assert all(isinstance(k, int) for k in kept)


# ---- family: student derivation ----------------------------------------------------------------------------------

def _bert(layers: int, classification: bool = False, seed: int = 0):
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cfg = tiny_config(3 if classification else None)
    cfg.num_hidden_layers = layers
    # a pooler, like every BertModel load_teacher returns (AutoModel.from_pretrained adds one)
    model = BertForSequenceClassification(cfg) if classification else BertModel(cfg)
    return model.eval()


def _layer_params(model, prefix: str, i: int) -> dict[str, torch.Tensor]:
    head = f"{prefix}encoder.layer.{i}."
    return {k[len(head):]: v for k, v in model.state_dict().items() if k.startswith(head)}


def test_family_for_bert_and_unsupported():
    from transformers import BertConfig, DistilBertConfig, GPT2Config

    assert isinstance(family_for(BertConfig()), TextEncoderFamily)
    assert family_for(DistilBertConfig()).type.layers_key == "n_layers"
    with pytest.raises(CheckpointError, match="gpt2"):
        family_for(GPT2Config())


def test_derive_student_copies_chosen_layers():
    teacher = _bert(6)
    family = family_for(teacher.config)
    student, kept = family.derive_student(teacher, 3)
    assert kept == [0, 2, 5]
    assert student.config.num_hidden_layers == 3
    assert len(student.encoder.layer) == 3
    assert teacher.config.num_hidden_layers == 6  # the teacher's config is not changed
    assert len(teacher.encoder.layer) == 6
    for s_idx, t_idx in enumerate(kept):
        s_params, t_params = _layer_params(student, "", s_idx), _layer_params(teacher, "", t_idx)
        assert s_params.keys() == t_params.keys() and s_params
        for name in t_params:
            assert torch.equal(s_params[name], t_params[name]), (s_idx, t_idx, name)
    # a layer not chosen differs from the student's layer 1 (so the comparison above can fail)
    assert not torch.equal(_layer_params(student, "", 1)["attention.self.query.weight"],
                           _layer_params(teacher, "", 1)["attention.self.query.weight"])
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    emb = [k for k in s_sd if k.startswith("embeddings.")]
    assert emb
    for k in emb:
        assert torch.equal(s_sd[k], t_sd[k])
    # weights are copies, not shared storage
    assert student.embeddings.word_embeddings.weight.data_ptr() != teacher.embeddings.word_embeddings.weight.data_ptr()
    assert count_parameters(student) < count_parameters(teacher)


def test_derive_student_classifier_keeps_head():
    teacher = _bert(4, classification=True, seed=3)
    student, kept = family_for(teacher.config).derive_student(teacher, 2)
    assert kept == [0, 3]
    assert type(student) is type(teacher)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for k in ("classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.embeddings.word_embeddings.weight"):
        assert torch.equal(s_sd[k], t_sd[k])
    for s_idx, t_idx in enumerate(kept):
        s_params, t_params = _layer_params(student, "bert.", s_idx), _layer_params(teacher, "bert.", t_idx)
        for name in t_params:
            assert torch.equal(s_params[name], t_params[name])


def test_derive_student_full_depth_is_identical_function():
    teacher = _bert(2)
    student, kept = family_for(teacher.config).derive_student(teacher, 2)
    assert kept == [0, 1]
    student.eval()
    ids = torch.randint(5, len(make_vocab()), (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = EncoderWithHead(teacher, "feature-extraction", Pooling())(ids, mask)
        b = EncoderWithHead(student, "feature-extraction", Pooling())(ids, mask)
    assert torch.allclose(a, b, atol=1e-6)


def test_derive_student_from_loaded_teacher(tiny_encoder):
    t = load_teacher(str(tiny_encoder))
    student, kept = t.family.derive_student(t.module.model, 1)
    assert kept == [1]
    t_sd, s_sd = t.module.model.state_dict(), student.state_dict()
    for k in s_sd:
        assert torch.equal(s_sd[k], t_sd[k.replace("encoder.layer.0.", "encoder.layer.1.")]), k


def test_derive_student_distilbert():
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    teacher = DistilBertModel(DistilBertConfig(vocab_size=60, dim=32, n_layers=4, n_heads=2, hidden_dim=64,
                                               max_position_embeddings=64)).eval()
    student, kept = family_for(teacher.config).derive_student(teacher, 2)
    assert kept == [0, 3]
    assert student.config.n_layers == 2
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for k in s_sd:
        src = k.replace("transformer.layer.1.", "transformer.layer.3.")
        assert torch.equal(s_sd[k], t_sd[src]), k
