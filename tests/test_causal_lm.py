"""Causal LMs end to end on tiny teachers (Llama, Qwen2, GPT-2 from configs; a tiny GGUF): the KV-cache artifact loads
in onnxruntime, matches the torch student, generates, verifies; bad input gets one line and exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import make_texts
from lm_fixtures import build_tiny_causal_lm, tiny_llama_gguf_with_reference, truncate_file, write_tiny_gguf
from typer.testing import CliRunner

from edgedistill.artifact import verify_files
from edgedistill.cli import app
from edgedistill.distill.loop import DistillConfig
from edgedistill.pipeline import CompileOptions, compile
from edgedistill.runtimes.ort_lm import OrtCausalLM

runner = CliRunner()
FAST = DistillConfig(epochs=1, batch_size=8)


def lm_profile(path: Path, recipe: str = "{recipe: weight-only, bits: 4, block_size: 32}", ratio: float = 5.0,
               name: str = "tiny-lm") -> Path:
    path.write_text(f"""name: {name}
threads: 1
quantization: {{recipe: fp32}}
causal_lm:
  quantization: {recipe}
  budget: {{max_perplexity_ratio: {ratio}, min_top1_agreement: 0.0}}
  prompt_tokens: 16
""")
    return path


@pytest.fixture
def lm_data(tmp_path) -> Path:
    path = tmp_path / "lm.txt"
    path.write_text("\n".join(make_texts(500, seed=3)) + "\n", encoding="utf-8")
    return path


def lm_opts(**kw) -> CompileOptions:
    return CompileOptions(max_length=32, student_layers=2, top_k=16, distill=FAST, **kw)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_compile_fp32_artifact_matches_torch_student(model_type, lm_data, tmp_path):
    teacher = build_tiny_causal_lm(tmp_path / "teacher", model_type=model_type)
    result = compile(str(teacher), str(lm_data), [str(lm_profile(tmp_path / "p.yaml", "{recipe: fp32}"))],
                     tmp_path / "out", lm_opts())
    target = result.targets[0]
    assert target.published, target.manifest.metrics["verdict"]
    m = verify_files(target.path)
    assert m.family == "causal-lm" and m.student["num_layers"] == 2 and len(m.student["kept_teacher_layers"]) == 2
    names = m.model["inputs"]
    assert {"input_ids", "attention_mask", "past_key_values.1.value"} <= set(names)
    assert "present.0.key" in m.model["outputs"] and m.model["outputs"][0] == "logits"
    assert m.export["greedy_identical_to_torch"] and m.export["max_abs_diff_cached_vs_full_pass"] < 1e-3
    # plain onnxruntime, as a user would: the full pass equals the torch student's logits
    session = ort.InferenceSession(str(target.path / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.load(target.path / "validation-windows.npy")[:2].astype(np.int64)
    lm = OrtCausalLM(target.path / "model.onnx", session=session)
    with torch.no_grad():
        expected = result.student(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(lm.logits(ids), expected, atol=1e-4)
    v = m.metrics["values"]
    assert abs(v["perplexity"] - v["torch_student_perplexity"]) < 1e-3 * v["perplexity"]
    assert v["teacher_perplexity"] > 1 and 0 <= v["top1_agreement"] <= 1


def test_int4_compile_generate_and_verify(lm_data, tmp_path):
    teacher = build_tiny_causal_lm(tmp_path / "teacher", model_type="llama")
    out = tmp_path / "out"
    res = runner.invoke(app, ["compile", str(teacher), "--data", str(lm_data), "--target", str(lm_profile(tmp_path / "p.yaml")),
                              "--out", str(out), "--max-length", "32", "--student-layers", "3", "--top-k", "8",
                              "--epochs", "1", "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    assert "perplexity" in res.stdout and "tok/s" in res.stdout
    m = verify_files(out / "tiny-lm")
    ops = m.quantization["operators"]
    assert ops.get("MatMulNBits", 0) >= 3 * 7 and ops.get("GatherBlockQuantized") == 1, ops
    assert m.sizes["model_mb"] < 0.5 * m.sizes["teacher_weights_mb"]
    assert m.data["soft_labels"]["top_k"] == 8 and m.data["soft_labels"]["bytes_per_token"] == 8 * 4 + 8
    assert m.latency["artifact_decode_tokens_per_s"] > 0 and m.latency["decode_speedup_vs_teacher"] > 0
    gen = runner.invoke(app, ["generate", str(out / "tiny-lm"), "--prompt", "the red dog", "--max-new-tokens", "12"])
    assert gen.exit_code == 0, gen.output
    assert "tokens/s decoding" in gen.stderr and gen.stdout.strip()
    again = runner.invoke(app, ["generate", str(out / "tiny-lm"), "--prompt", "the red dog", "--max-new-tokens", "12"])
    assert again.stdout == gen.stdout  # greedy is deterministic
    sampled = runner.invoke(app, ["generate", str(out / "tiny-lm"), "-p", "the red dog", "--max-new-tokens", "12",
                                  "--temperature", "1.0", "--top-k", "20", "--seed", "3"])
    assert sampled.exit_code == 0
    verified = runner.invoke(app, ["verify", str(out / "tiny-lm")])
    assert verified.exit_code == 0, verified.output
    assert "perplexity_ratio" in verified.stdout
    bench = runner.invoke(app, ["bench", str(out / "tiny-lm"), "--seq", "16", "--min-time", "0.2", "--no-memory",
                                "--json", str(tmp_path / "bench.json")])
    assert bench.exit_code == 0, bench.output
    result = json.loads((tmp_path / "bench.json").read_text())
    roles = [r["role"] for r in result["results"]]
    assert roles == ["teacher", "peer", "artifact"]
    artifact = result["results"][2]
    assert artifact["accuracy"]["decode_tokens_per_s"] > 0 and 0 <= artifact["accuracy"]["top1_agreement"] <= 1
    assert {"prefill_b1_s16_t1", "generate_b1_s64_t1"} <= set(artifact["ratio_to_teacher"])
    too_long = runner.invoke(app, ["generate", str(out / "tiny-lm"), "--prompt", "the dog " * 100])
    assert too_long.exit_code == 2 and "exceeds the model's context" in too_long.stderr
    assert len(too_long.stderr.strip().splitlines()) == 1


def test_gguf_teacher_is_dequantized_and_recorded(lm_data, tmp_path):
    from edgedistill.teachers import load_teacher

    gguf, reference = tiny_llama_gguf_with_reference(tmp_path, num_layers=3, tensor_type="q8_0")
    teacher = load_teacher(str(gguf))
    assert teacher.family.name == "causal-lm" and teacher.source["format"] == "gguf"
    assert "Q8_0" in teacher.source["tensor_types"]
    ids = torch.tensor([[5, 9, 20, 33, 7]])
    with torch.no_grad():
        assert torch.allclose(teacher.module(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)
    result = compile(str(gguf), str(lm_data), [str(lm_profile(tmp_path / "p.yaml"))], tmp_path / "out", lm_opts())
    assert result.targets[0].manifest.teacher["source"]["tensor_types"]["Q8_0"] > 0


def test_a_gguf_teacher_is_dequantized_once_and_read_back_from_the_cache(tmp_path, monkeypatch):
    import shutil

    from edgedistill.teachers import causal, load_teacher

    gguf, _ = tiny_llama_gguf_with_reference(tmp_path, num_layers=2, tensor_type="q8_0")
    first = load_teacher(str(gguf), cache_dir=tmp_path / "cache")
    [stored] = (tmp_path / "cache" / "gguf-teachers").iterdir()
    assert (stored / causal.GGUF_SOURCE).is_file() and list(stored.glob("*.safetensors"))
    assert not list(stored.rglob("*.bin")) and not list(stored.rglob("*.pt*"))  # nothing to unpickle

    def not_again(*_):
        raise AssertionError("the GGUF file was read again")

    with monkeypatch.context() as m:
        m.setattr(causal, "read_gguf", not_again)
        again = load_teacher(str(gguf), cache_dir=tmp_path / "cache")
    assert (again.sha256, again.source, again.name, again.max_length) == (first.sha256, first.source, first.name,
                                                                          first.max_length)
    assert again.module.config.to_dict() == first.module.config.to_dict()
    text = "the dog runs over the red road"
    assert again.tokenizer(text)["input_ids"] == first.tokenizer(text)["input_ids"]
    ids = torch.tensor([first.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(again.module(input_ids=ids).logits, first.module(input_ids=ids).logits)
    # a damaged entry is rebuilt from the file
    next(stored.glob("*.safetensors")).write_bytes(b"truncated")
    rebuilt = load_teacher(str(gguf), cache_dir=tmp_path / "cache")
    with torch.no_grad():
        assert torch.equal(rebuilt.module(input_ids=ids).logits, first.module(input_ids=ids).logits)
    assert (stored / causal.GGUF_SOURCE).is_file() and load_teacher(str(gguf), cache_dir=tmp_path / "cache").source == first.source
    shutil.rmtree(tmp_path / "cache")
    (tmp_path / "cache").write_text("not a directory")  # a cache that cannot be written costs time, not the load
    assert load_teacher(str(gguf), cache_dir=tmp_path / "cache").source == first.source



def test_a_gguf_teacher_keeps_the_special_tokens_its_file_names(tmp_path):
    """transformers 4.57 reads a GPT-2-style GGUF tokenizer with its BOS as EOS and no padding token; the teacher's
    tokenizer (and so the windows' separator, the artifact's tokenizer and where `generate` stops) follows the file."""
    from edgedistill.teachers import load_teacher

    gguf = write_tiny_gguf(tmp_path / "s.gguf", specials={"eos": 7, "pad": 9})
    teacher = load_teacher(str(gguf), cache_dir=tmp_path / "cache")
    tok = teacher.tokenizer
    assert (tok.eos_token_id, tok.pad_token_id) == (7, 9) and tok.bos_token == "<|endoftext|>"
    assert teacher.source["special_tokens"] == {"bos": "<|endoftext|>", "eos": tok.convert_ids_to_tokens(7),
                                                "pad": tok.convert_ids_to_tokens(9), "unk": "<|endoftext|>"}
    again = load_teacher(str(gguf), cache_dir=tmp_path / "cache")  # read back from the cache: the same tokens
    assert (again.tokenizer.eos_token_id, again.tokenizer.pad_token_id) == (7, 9)


def test_labels_are_cached_per_window(lm_data, tmp_path, monkeypatch):
    from edgedistill.cache import LabelStore

    teacher = build_tiny_causal_lm(tmp_path / "teacher")
    profile = str(lm_profile(tmp_path / "p.yaml", "{recipe: fp32}"))
    compile(str(teacher), str(lm_data), [profile], tmp_path / "a", lm_opts())
    added = []
    real_add = LabelStore.add
    monkeypatch.setattr(LabelStore, "add", lambda self, d, o: added.append(len(d)) or real_add(self, d, o))
    compile(str(teacher), str(lm_data), [profile], tmp_path / "b", lm_opts(layer_criterion="block-influence"))
    assert added == []  # another student: the teacher labels nothing again


def _bad_gguf_arch(tmp_path):
    return str(write_tiny_gguf(tmp_path / "mamba.gguf", architecture="mamba-nonsense"))


def _truncated_gguf(tmp_path):
    return str(truncate_file(write_tiny_gguf(tmp_path / "t.gguf"), 0.5))


@pytest.mark.parametrize("case", ["unsupported-gguf", "truncated-gguf", "vocab-mismatch", "short-text", "long-window",
                                  "encoder-target", "unsupported-target", "unsupported-hf-type"])
def test_bad_input_one_line_exit_2(case, lm_data, tmp_path):
    teacher = str(build_tiny_causal_lm(tmp_path / "teacher"))
    profile = str(lm_profile(tmp_path / "p.yaml"))
    args = {"data": str(lm_data), "target": profile, "extra": ["--max-length", "32"]}
    if case == "unsupported-gguf":
        teacher, expected = _bad_gguf_arch(tmp_path), "GGUF architecture 'mamba-nonsense' is not supported"
    elif case == "truncated-gguf":
        teacher, expected = _truncated_gguf(tmp_path), "is not a readable GGUF file"
    elif case == "vocab-mismatch":
        teacher = str(build_tiny_causal_lm(tmp_path / "bad", vocab_mismatch=True))
        expected = "tokenizer mismatch"
    elif case == "short-text":
        (tmp_path / "short.txt").write_text("the dog\na cat\nred fish\n")
        args["data"], expected = str(tmp_path / "short.txt"), "less than one window of 32"
    elif case == "long-window":
        args["extra"], expected = ["--max-length", "4096"], "exceeds the teacher's context of 128 tokens"
    elif case == "encoder-target":
        (tmp_path / "enc.yaml").write_text("name: enc\nthreads: 1\nquantization: {recipe: fp32}\n")
        args["target"], expected = str(tmp_path / "enc.yaml"), "has no causal_lm section"
    elif case == "unsupported-target":
        args["target"], expected = "arm64-mobile", "builds no causal-LM artifact yet"
    else:
        cfg = json.loads((Path(teacher) / "config.json").read_text())
        cfg["model_type"] = "falcon"
        cfg["architectures"] = ["FalconForCausalLM"]
        (Path(teacher) / "config.json").write_text(json.dumps(cfg))
        expected = "unsupported"
    out = tmp_path / "out"
    res = runner.invoke(app, ["compile", teacher, "--data", args["data"], "--target", args["target"], "--out", str(out),
                              *args["extra"], "--epochs", "1"])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error:") and expected in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not any(p.name in ("tiny-lm", "enc", "arm64-mobile") for p in out.iterdir()) if out.exists() else True


def test_generate_refuses_an_encoder_artifact(tmp_path):
    from edgedistill.artifact import Manifest

    d = tmp_path / "enc"
    d.mkdir()
    fields = {k: {} for k in ("target", "teacher", "student", "data", "distillation", "export", "optimization",
                              "quantization", "model", "metrics", "latency", "sizes")}
    (d / "manifest.json").write_text(Manifest(edgedistill_version="x", versions={}, seed=0, **fields).model_dump_json())
    res = runner.invoke(app, ["generate", str(d), "--prompt", "hi"])
    assert res.exit_code == 2 and "not a language model" in res.stderr


def test_topk_losses_are_exact_when_k_is_the_vocabulary():
    from edgedistill.distill.losses import generalized_jsd, lm_distillation_loss, reverse_kl, topk_bins

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    logp = torch.log_softmax(teacher, -1)
    full_kl = (logp.exp() * (logp - torch.log_softmax(student, -1))).sum(-1).mean()
    top, idx = logp.topk(11, -1)
    tail = torch.full(top.shape[:-1], -30.0)  # no mass outside the top-k
    assert torch.allclose(lm_distillation_loss(student, torch.zeros(2, 5, dtype=torch.long), top, idx, tail), full_kl,
                          atol=1e-5)
    # with k < V the tail bin carries the rest, and the loss is a lower bound of the full KL (data processing)
    top4, idx4 = logp.topk(4, -1)
    tail4 = torch.log1p(-top4.exp().sum(-1))
    t_bins, s_bins = topk_bins(student, top4, idx4, tail4)
    assert torch.allclose(t_bins.exp().sum(-1), torch.ones(2, 5), atol=1e-5)
    assert torch.allclose(s_bins.exp().sum(-1), torch.ones(2, 5), atol=1e-5)
    assert lm_distillation_loss(student, torch.zeros(2, 5, dtype=torch.long), top4, idx4, tail4) <= full_kl + 1e-6
    # identical distributions: every divergence is zero
    assert torch.allclose(reverse_kl(t_bins, t_bins), torch.zeros(2, 5), atol=1e-6)
    assert torch.allclose(generalized_jsd(t_bins, t_bins, 0.5), torch.zeros(2, 5), atol=1e-6)
    jsd = generalized_jsd(t_bins, s_bins, 0.5)
    assert (jsd >= -1e-6).all() and (jsd <= np.log(2) + 1e-6).all()


def test_layer_selection_and_student_cache_wiring():
    from lm_fixtures import tiny_causal_lm

    from edgedistill.families.causal_lm import CAUSAL_LM_TYPES, block_influence, derive_student, select_layers

    teacher = tiny_causal_lm("llama", num_layers=5)
    decoder = CAUSAL_LM_TYPES["llama"]
    windows = torch.randint(1, 300, (4, 24))
    assert len(block_influence(teacher, decoder, windows)) == 5
    for criterion in ("perplexity", "block-influence", "even"):
        kept, evidence = select_layers(teacher, decoder, 3, windows, criterion)
        assert len(kept) == 3 and kept == sorted(kept) and evidence["criterion"] == criterion
    assert len(teacher.model.layers) == 5  # selection leaves the teacher whole
    student = derive_student(teacher, decoder, [0, 2, 4])
    assert student.config.num_hidden_layers == 3 and [l.self_attn.layer_idx for l in student.model.layers] == [0, 1, 2]
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()  # still tied
    ids = windows[:1]
    with torch.no_grad():
        full = student(input_ids=ids).logits
        out = student(input_ids=ids[:, :10], use_cache=True)
        stepped = [out.logits]
        past = out.past_key_values
        for t in range(10, ids.shape[1]):
            out = student(input_ids=ids[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            stepped.append(out.logits)
    assert torch.allclose(torch.cat(stepped, 1), full, atol=1e-4)  # the cache is indexed by the new layer numbers


def test_given_student_must_share_the_vocabulary(lm_data, tmp_path):
    teacher = build_tiny_causal_lm(tmp_path / "teacher", num_layers=4)
    student = build_tiny_causal_lm(tmp_path / "student", num_layers=2, seed=5)
    profile = str(lm_profile(tmp_path / "p.yaml", "{recipe: fp32}"))
    result = compile(str(teacher), str(lm_data), [profile], tmp_path / "out", lm_opts(student=str(student)))
    m = result.targets[0].manifest
    assert m.student["layer_selection"]["criterion"] == "given" and m.student["num_layers"] == 2
    bad = build_tiny_causal_lm(tmp_path / "bad", num_layers=2, vocab_mismatch=True)
    res = runner.invoke(app, ["compile", str(teacher), "--data", str(lm_data), "--target", profile, "--out",
                              str(tmp_path / "out2"), "--max-length", "32", "--student", str(bad)])
    assert res.exit_code == 2 and "error:" in res.stderr and "Traceback" not in res.stderr


def test_int4_search_escalates_to_8_bits_and_records_every_trial(lm_data, tmp_path):
    teacher = build_tiny_causal_lm(tmp_path / "teacher")
    # a budget nothing can keep (the artifact would have to beat the teacher): every step is tried, the most
    # faithful is validated, the target is rejected with the trials in its report
    profile = tmp_path / "p.yaml"
    profile.write_text("""name: tiny-lm
threads: 1
quantization: {recipe: fp32}
causal_lm:
  quantization: {recipe: weight-only, bits: 4, block_size: 32}
  budget: {max_perplexity_ratio: 1.0, min_top1_agreement: 1.0}
  prompt_tokens: 16
""")
    result = compile(str(teacher), str(lm_data), [str(profile)], tmp_path / "out", lm_opts())
    target = result.targets[0]
    assert not target.published and target.path.name == "tiny-lm.rejected.md"
    trials = target.manifest.quantization["trials"]
    assert [t["description"] for t in trials][0] == "as configured" and len(trials) == 5
    assert not any(t["passed"] for t in trials) and sum(bool(t.get("chosen")) for t in trials) == 1
    assert trials[-1]["config"]["int8_nodes"] == ["MatMul"] and trials[-1]["size_mb"] > trials[0]["size_mb"]
    chosen = next(t for t in trials if t.get("chosen"))
    assert chosen["perplexity_ratio"] == min(t["perplexity_ratio"] for t in trials)
    assert "Quantization trials" in target.path.read_text() and not (tmp_path / "out" / "tiny-lm").exists()


def test_gpt2_conv1d_layers_are_quantized_too(lm_data, tmp_path):
    teacher = build_tiny_causal_lm(tmp_path / "teacher", model_type="gpt2")
    result = compile(str(teacher), str(lm_data), [str(lm_profile(tmp_path / "p.yaml"))], tmp_path / "out", lm_opts())
    ops = result.targets[0].manifest.quantization["operators"]
    # Conv1D exports as Gemm: rewritten to MatMul, every layer's 4 weights + the LM head go to MatMulNBits
    assert ops.get("MatMulNBits", 0) == 2 * 4 + 1 and "Gemm" not in ops, ops


def test_mixed_precision_puts_only_the_named_nodes_at_8_bits(tmp_path):
    import onnx

    from edgedistill.export_lm import export_causal_lm
    from edgedistill.quantize import quantize
    from edgedistill.quantize.configs import WeightOnlyConfig
    from edgedistill.teachers import load_teacher

    teacher = load_teacher(str(build_tiny_causal_lm(tmp_path / "teacher")))
    exported = export_causal_lm(teacher.module, teacher.tokenizer, tmp_path / "export", 21,
                                np.arange(64).reshape(2, 32) + 5)
    path = quantize(exported.model, WeightOnlyConfig(int8_nodes=["lm_head"]), tmp_path / "mixed.onnx")
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits")
            for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"}
    assert bits.pop("/lm_head/MatMul_Q8") == 8 and len(bits) == 4 * 7 and set(bits.values()) == {4}


def test_generate_adds_cached_teacher_written_windows_to_training(lm_data, tmp_path, monkeypatch):
    from edgedistill.families import causal_lm_stages

    teacher = build_tiny_causal_lm(tmp_path / "teacher", model_type="llama")
    profile = str(lm_profile(tmp_path / "p.yaml", "{recipe: fp32}"))
    cache = tmp_path / "cache"
    first = compile(str(teacher), str(lm_data), [profile], tmp_path / "out", lm_opts(generate=6, cache_dir=cache))
    m = first.targets[0].manifest
    assert m.data["teacher_generated_windows"] == 6 and m.data["generation"]["tokens"] == 6 * (32 - 16)
    assert m.data["num_train"] == m.data["num_windows"] - m.data["num_validation"]
    (path,) = (cache / "generated").glob("*.npy")
    rows = np.load(path)
    assert rows.shape == (6, 32) and rows.dtype == np.int32
    real = np.load(first.targets[0].path / "validation-windows.npy")
    assert not any((rows[:, :16] == r[:16]).all(1).any() for r in real)  # prompts come from the training split only
    assert len({tuple(r[16:]) for r in rows}) == 6  # sampled, not six copies of one greedy path

    def no_sampling(*a, **k):
        raise AssertionError("the teacher's windows were generated again")

    monkeypatch.setattr(causal_lm_stages, "sample_continuations", no_sampling)
    again = compile(str(teacher), str(lm_data), [profile], tmp_path / "out2", lm_opts(generate=6, cache_dir=cache))
    assert again.targets[0].manifest.student == m.student  # the cached generations and the cached student


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_ffn_width_pruning_drops_the_neurons_that_carry_nothing(model_type):
    from lm_fixtures import tiny_causal_lm

    from edgedistill.families.causal_lm import CAUSAL_LM_TYPES, ffn_importance, ffn_size, prune_ffn

    model = tiny_causal_lm(model_type, num_layers=2)
    decoder = CAUSAL_LM_TYPES[model_type]
    width = ffn_size(model.config)
    dead = torch.arange(0, width, 2)  # half the neurons silenced: zero input weights (and bias) -> zero activation
    with torch.no_grad():
        for layer in decoder_layers_of(model, decoder):
            if model_type == "gpt2":
                layer.mlp.c_fc.weight[:, dead] = 0
                layer.mlp.c_fc.bias[dead] = 0
            else:
                layer.mlp.up_proj.weight[dead] = 0
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    importance = ffn_importance(model, decoder, ids)
    assert all(float(s[dead].max()) == 0.0 and float(s[1::2].min()) > 0 for s in importance)
    prune_ffn(model, decoder, importance, width // 2)
    assert ffn_size(model.config) == width // 2
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)


def decoder_layers_of(model, decoder):
    from edgedistill.families.causal_lm import decoder_layers

    return decoder_layers(model, decoder)


def test_ffn_ratio_compile_records_the_narrowed_student(lm_data, tmp_path):
    teacher = build_tiny_causal_lm(tmp_path / "teacher", model_type="llama")
    result = compile(str(teacher), str(lm_data), [str(lm_profile(tmp_path / "p.yaml", "{recipe: fp32}"))],
                     tmp_path / "out", lm_opts(ffn_ratio=0.5))
    m = verify_files(result.targets[0].path)
    assert m.student["ffn_size"] == 64 and m.student["layer_selection"]["ffn"]["teacher_ffn"] == 128
    assert result.student.model.layers[0].mlp.down_proj.in_features == 64
    assert "FFN narrowed from 128 to 64" in (result.targets[0].path / "report.md").read_text()
