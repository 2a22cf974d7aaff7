"""End-to-end compile on tiny teachers: the artifact loads in onnxruntime, matches the torch student, and is trusted."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import make_texts, write_profile
from transformers import AutoTokenizer
from typer.testing import CliRunner

from edgedistill.artifact import sha256_file, verify_files
from edgedistill.cli import app
from edgedistill.distill.loop import DistillConfig
from edgedistill.pipeline import CompileOptions, compile

runner = CliRunner()
FAST = DistillConfig(epochs=1, batch_size=16)


def run_artifact(artifact: Path, texts: list[str]) -> np.ndarray:
    """Run an artifact the way the README tells users to: plain onnxruntime + the tokenizer files beside it."""
    tok = AutoTokenizer.from_pretrained(artifact)
    sess = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="np")
    feeds = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}
    return sess.run(None, feeds)[0]


def torch_outputs(module, artifact: Path, texts: list[str]) -> np.ndarray:
    tok = AutoTokenizer.from_pretrained(artifact)
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        return module(**enc).numpy()


def cosines(a, b):
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_compile_embeddings_int8(tiny_encoder, text_file, profile_file, tmp_path):
    result = compile(str(tiny_encoder), str(text_file), [str(profile_file)], tmp_path / "out", CompileOptions(distill=FAST))
    [target] = result.targets
    assert target.published and target.path == tmp_path / "out" / "tiny-cpu"
    manifest = verify_files(target.path)
    # the manifest's hashes are the files' hashes
    for name, digest in manifest.files.items():
        assert sha256_file(target.path / name) == digest
    assert set(manifest.files) >= {"model.onnx", "report.md", "tokenizer.json"}
    assert manifest.data["sha256"] != manifest.teacher["sha256"]
    assert [i["name"] for i in manifest.model["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest.model["outputs"][0]["name"] == "sentence_embedding"
    # the int8 graph really is quantized
    ops = {n.op_type for n in onnx.load(str(target.path / "model.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLinear"}
    # it runs without edgedistill and stays close to the torch student it came from
    texts = make_texts(20, seed=7)
    got = run_artifact(target.path, texts)
    expected = torch_outputs(result.student, target.path, texts)
    assert got.shape == (20, 32)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)  # the teacher's Normalize module is in the graph
    assert cosines(got, expected).min() > 0.98
    assert manifest.metrics["values"]["cosine_mean"] >= 0.5 and manifest.metrics["passed"]
    assert manifest.latency["artifact"]["p50_ms"] > 0 and manifest.latency["teacher_torch_fp32"]["p50_ms"] > 0
    # the (empty, unlocked) lock file stays: removing it while held would let two compiles lock different files
    assert [p.name for p in (tmp_path / "out").glob(".*")] == [".edgedistill.lock"], "no temporary files left"
    assert (tmp_path / "out" / ".edgedistill.lock").read_text() == ""


def test_compile_fp32_matches_torch_student_exactly(tiny_plain_encoder, text_file, tmp_path):
    profile = write_profile(tmp_path / "fp32.yaml", name="fp32", quantization="recipe: fp32")
    result = compile(str(tiny_plain_encoder), str(text_file), [str(profile)], tmp_path / "out", CompileOptions(distill=FAST))
    artifact = result.targets[0].path
    texts = make_texts(10, seed=3)
    np.testing.assert_allclose(run_artifact(artifact, texts), torch_outputs(result.student, artifact, texts), atol=1e-4)


def test_a_target_cpu_this_machine_is_not_is_named_in_the_manifest_and_the_report(tiny_plain_encoder, text_file,
                                                                                   tmp_path):
    """Validated and timed on this machine's kernels, not the target CPU's: the artifact says which flags it lacked."""
    from edgedistill.targets import cpu_flags

    if not cpu_flags():
        pytest.skip("no /proc/cpuinfo here: this machine's CPU flags are unknown")
    profile = write_profile(tmp_path / "fp32.yaml", name="elsewhere", quantization="recipe: fp32")
    profile.write_text(profile.read_text() + f"cpu_flags: [{sorted(cpu_flags())[0]}, isa_no_cpu_has]\n")
    result = compile(str(tiny_plain_encoder), str(text_file), [str(profile)], tmp_path / "out", CompileOptions(distill=FAST))
    m = verify_files(result.targets[0].path)
    assert m.latency["host_lacks_cpu_flags"] == ["isa_no_cpu_has"]
    report = (result.targets[0].path / "report.md").read_text()
    assert "This machine lacks the target CPU's isa_no_cpu_has" in report
    assert "host_lacks_cpu_flags" not in verify_files(
        compile(str(tiny_plain_encoder), str(text_file), [str(write_profile(tmp_path / "any.yaml", name="any",
                quantization="recipe: fp32"))], tmp_path / "out2", CompileOptions(distill=FAST)).targets[0].path).latency


def test_compile_classification_with_labels(tiny_classifier, labelled_jsonl, profile_file, tmp_path):
    result = compile(str(tiny_classifier), str(labelled_jsonl), [str(profile_file)], tmp_path / "out",
                     CompileOptions(distill=FAST, student_layers=1))
    [target] = result.targets
    m = verify_files(target.path)
    assert m.teacher["task"] == "text-classification" and m.student["num_layers"] == 1
    assert m.teacher["label_names"] == ["class_0", "class_1", "class_2"]
    values = m.metrics["values"]
    assert {"top1_agreement", "kl_mean", "accuracy", "teacher_accuracy"} <= set(values)
    assert m.model["outputs"][0]["name"] == "logits"
    logits = run_artifact(target.path, make_texts(8, seed=5))
    assert logits.shape == (8, 3)
    expected = torch_outputs(result.student, target.path, make_texts(8, seed=5))
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.75


def test_budget_miss_exits_2_keeps_report_and_publishes_nothing(tiny_encoder, text_file, tmp_path):
    profile = write_profile(tmp_path / "strict.yaml", name="strict", min_cosine=0.99999)
    out = tmp_path / "out"
    res = runner.invoke(app, ["compile", str(tiny_encoder), "--data", str(text_file), "--target", str(profile),
                              "--out", str(out), "--epochs", "1"])
    assert res.exit_code == 2
    assert "below the budget" in res.stderr and "Traceback" not in res.stderr
    assert not (out / "strict").exists()
    report = (out / "strict.rejected.md").read_text()
    assert "NOT published" in report
    assert sorted(p.name for p in out.iterdir() if p.name != ".edgedistill.lock") == ["strict.rejected.md"]


def test_cli_compile_prints_summary_and_recompile_replaces(tiny_encoder, text_file, profile_file, tmp_path):
    out = tmp_path / "out"
    args = ["compile", str(tiny_encoder), "--data", str(text_file), "--target", str(profile_file), "--out", str(out),
            "--epochs", "1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "tiny-cpu" in first.stdout and "pass" in first.stdout
    (out / "tiny-cpu" / "stale.txt").write_text("from an older compile")
    second = runner.invoke(app, [*args, "--seed", "1"])
    assert second.exit_code == 0
    assert json.loads((out / "tiny-cpu" / "manifest.json").read_text())["seed"] == 1
    assert not (out / "tiny-cpu" / "stale.txt").exists(), "the new artifact replaces the old directory whole"
    assert sorted(p.name for p in out.iterdir() if p.name != ".edgedistill.lock") == ["tiny-cpu"]
    assert runner.invoke(app, ["verify", str(out / "tiny-cpu")]).exit_code == 0
    # where the wall time went, stage by stage, in the manifest and the report
    timings = json.loads((out / "tiny-cpu" / "manifest.json").read_text())["timings"]
    assert set(timings) == {"load_s", "distill_s", "build_s", "targets"} and type(timings["targets"]) is int and timings["targets"] == 1
    assert all(timings[k] > 0 for k in ("load_s", "distill_s", "build_s"))
    report = (out / "tiny-cpu" / "report.md").read_text()
    assert "## Compile time" in report and f"| {timings['build_s']:.1f} |" in report


def test_teacher_outputs_are_cached_per_text_and_students_per_input_hash(tiny_encoder, text_file, profile_file,
                                                                         tmp_path, monkeypatch):
    from edgedistill.cache import LabelStore
    from edgedistill.families import text_encoder_stages

    cache = tmp_path / "cache"
    opts = CompileOptions(distill=FAST, cache_dir=cache, student_layers=1)
    first = compile(str(tiny_encoder), str(text_file), [str(profile_file)], tmp_path / "a", opts)
    shards = sorted((cache / "labels").glob("*/shard-*.npy"))
    assert shards and [p.name for p in (cache / "students").iterdir()]
    added = []
    real_add = LabelStore.add
    monkeypatch.setattr(LabelStore, "add", lambda self, d, o: added.append(len(d)) or real_add(self, d, o))
    # another student size: the teacher labels nothing again
    opts.student_layers = 2
    compile(str(tiny_encoder), str(text_file), [str(profile_file)], tmp_path / "b", opts)
    assert added == [] and sorted((cache / "labels").glob("*/shard-*.npy")) == shards
    # only the target changes: distillation is not run again, and the student is the same
    monkeypatch.setattr(text_encoder_stages, "distill", lambda *a, **k: pytest.fail("distillation ran again"))
    opts.student_layers = 1
    other = write_profile(tmp_path / "other.yaml", name="tiny-other")
    again = compile(str(tiny_encoder), str(text_file), [str(other)], tmp_path / "c", opts)
    assert all(torch.equal(a, b) for a, b in zip(first.student.state_dict().values(), again.student.state_dict().values()))
    # new texts in the data: only they are labelled
    monkeypatch.undo()
    monkeypatch.setattr(LabelStore, "add", lambda self, d, o: added.append(len(d)) or real_add(self, d, o))
    more = tmp_path / "more.txt"
    more.write_text(text_file.read_text() + "\n".join(f"a brand new sentence number {i}" for i in range(5)) + "\n")
    compile(str(tiny_encoder), str(more), [str(profile_file)], tmp_path / "d", opts)
    assert added == [5]


def test_tampered_artifact_fails_verify(tiny_encoder, text_file, profile_file, tmp_path):
    out = tmp_path / "out"
    compile(str(tiny_encoder), str(text_file), [str(profile_file)], out, CompileOptions(distill=FAST))
    with (out / "tiny-cpu" / "model.onnx").open("ab") as f:
        f.write(b"\0")
    res = runner.invoke(app, ["verify", str(out / "tiny-cpu")])
    assert res.exit_code == 1 and "does not match its sha256" in res.stderr


def test_verify_reruns_the_validation_set(tiny_encoder, text_file, profile_file, tmp_path):
    out = tmp_path / "out"
    compile(str(tiny_encoder), str(text_file), [str(profile_file)], out, CompileOptions(distill=FAST))
    art = out / "tiny-cpu"
    manifest = json.loads((art / "manifest.json").read_text())
    res = runner.invoke(app, ["verify", str(art)])
    assert res.exit_code == 0, res.output
    assert "validation re-run" in res.stdout and f"{manifest['metrics']['values']['cosine_mean']:.4f}" in res.stdout
    # the validation set holds the held-out texts and the teacher's outputs for them
    texts = [json.loads(line) for line in (art / "validation-texts.jsonl").read_text().splitlines()]
    assert len(texts) == manifest["data"]["num_validation"] == len(np.load(art / "validation-teacher.npy"))
    # an artifact whose model no longer reproduces its recorded fidelity fails (hashes made consistent again)
    teacher = np.load(art / "validation-teacher.npy")
    teacher[: len(teacher) // 2] *= -1
    np.save(art / "validation-teacher.npy", teacher)
    manifest["files"]["validation-teacher.npy"] = sha256_file(art / "validation-teacher.npy")
    (art / "manifest.json").write_text(json.dumps(manifest))
    res = runner.invoke(app, ["verify", str(art)])
    assert res.exit_code == 1 and "FAILED" in res.stderr and "below the budget" in res.stderr
    assert runner.invoke(app, ["verify", str(art), "--hashes-only"]).exit_code == 0
    assert runner.invoke(app, ["verify", str(tmp_path / "nope")]).exit_code == 2


def _bad_inputs(tmp_path: Path, tiny_encoder: Path, text_file: Path, profile_file: Path):
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes(b"good line\ncaf\xe9\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in tiny_encoder.iterdir():
        if f.is_file():
            data = f.read_bytes()
            (corrupt / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    bad_profile = tmp_path / "bad.yaml"
    bad_profile.write_text(profile_file.read_text().replace("threads: 1", "threads: many"))
    return {
        "missing teacher": ([str(tmp_path / "nope")], "does not exist"),
        "teacher is a file": ([str(text_file)], "is a file"),
        "corrupt weights": ([str(corrupt)], "cannot load weights"),
        "unknown target": ([str(tiny_encoder), "--target", "nokia-3310"], "unknown target 'nokia-3310'"),
        "malformed profile": ([str(tiny_encoder), "--target", str(bad_profile)], "field 'threads'"),
        "missing data": ([str(tiny_encoder), "--data", str(tmp_path / "none.txt")], "does not exist"),
        "non-UTF-8 data": ([str(tiny_encoder), "--data", str(not_utf8)], "not UTF-8 (line 2"),
        "empty data": ([str(tiny_encoder), "--data", str(empty)], "0 text"),
        "bad task": ([str(tiny_encoder), "--task", "translation"], "unknown task"),
        "too many layers": ([str(tiny_encoder), "--student-layers", "5"], "out of range"),
        "zero layers": ([str(tiny_encoder), "--student-layers", "0"], "out of range"),
        "ffn ratio": ([str(tiny_encoder), "--ffn-ratio", "0"], "--ffn-ratio 0.0 is out of range"),
        "max length too long": ([str(tiny_encoder), "--max-length", "500"], "exceeds the teacher's 64 positions"),
        "data is a directory": ([str(tiny_encoder), "--data", str(tmp_path)], "is a directory"),
        "one text": ([str(tiny_encoder), "--max-texts", "1"], "needs at least 2"),
        "duplicate targets": ([str(tiny_encoder), "--target", str(profile_file), "--target", str(profile_file)],
                              "two --target profiles are named tiny-cpu"),
    }


@pytest.mark.parametrize("case", ["missing teacher", "teacher is a file", "corrupt weights", "unknown target",
                                  "malformed profile", "missing data", "non-UTF-8 data", "empty data", "bad task",
                                  "too many layers", "zero layers", "ffn ratio", "max length too long", "data is a directory",
                                  "one text", "duplicate targets"])
def test_bad_input_one_line_exit_2_nothing_written(case, tiny_encoder, text_file, profile_file, tmp_path):
    args, expected = _bad_inputs(tmp_path, tiny_encoder, text_file, profile_file)[case]
    if "--data" not in args:
        args = [*args, "--data", str(text_file)]
    if "--target" not in args:
        args = [*args, "--target", str(profile_file)]
    out = tmp_path / "out"
    res = runner.invoke(app, ["compile", *args, "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error:") and expected in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not out.exists()  # refused before OUT is locked: nothing is written, not even the lock


def test_targets_commands():
    listing = runner.invoke(app, ["targets"])
    assert listing.exit_code == 0 and "x86-64-avx2" in listing.stdout and "x86-64-avx512" in listing.stdout
    shown = runner.invoke(app, ["targets", "show", "x86-64-avx512"])
    assert shown.exit_code == 0 and "recipe: dynamic-int8" in shown.stdout
    schema = json.loads(runner.invoke(app, ["targets", "schema"]).stdout)
    assert "accuracy_budget" in schema["properties"]
    assert runner.invoke(app, ["targets", "show", "nope"]).exit_code == 2


def test_data_hash_in_manifest_is_content_hash(tiny_encoder, text_file, profile_file, tmp_path):
    result = compile(str(tiny_encoder), str(text_file), [str(profile_file)], tmp_path / "out", CompileOptions(distill=FAST))
    texts = [t for t in text_file.read_text().splitlines() if t.strip()]
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode() + b"\x00\n")
    assert result.targets[0].manifest.data["sha256"] == h.hexdigest()


def test_out_is_a_file_fails_before_any_work(tiny_encoder, text_file, profile_file, tmp_path, monkeypatch):
    import edgedistill.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_teacher", lambda *a, **k: pytest.fail("loaded the teacher before checking --out"))
    out = tmp_path / "out"
    out.write_text("a file")
    res = runner.invoke(app, ["compile", str(tiny_encoder), "--data", str(text_file), "--target", str(profile_file),
                              "--out", str(out)])
    assert res.exit_code == 2 and "--out" in res.stderr and "is a file" in res.stderr
    assert out.read_text() == "a file"


def test_new_verdict_replaces_the_old_one(tiny_encoder, text_file, tmp_path):
    out = tmp_path / "out"
    lenient = write_profile(tmp_path / "lenient.yaml", name="dev", min_cosine=0.5)
    strict = write_profile(tmp_path / "strict.yaml", name="dev", min_cosine=0.99999)
    base = ["compile", str(tiny_encoder), "--data", str(text_file), "--out", str(out), "--epochs", "1", "--target"]
    assert runner.invoke(app, [*base, str(lenient)]).exit_code == 0
    assert (out / "dev").is_dir()
    assert runner.invoke(app, [*base, str(strict)]).exit_code == 2
    assert not (out / "dev").exists(), "a stale artifact must not sit beside a newer rejection"
    assert (out / "dev.rejected.md").is_file()
    assert runner.invoke(app, [*base, str(lenient)]).exit_code == 0
    assert (out / "dev").is_dir() and not (out / "dev.rejected.md").exists()


def test_verify_rejects_unlisted_files(tiny_encoder, text_file, profile_file, tmp_path):
    out = tmp_path / "out"
    compile(str(tiny_encoder), str(text_file), [str(profile_file)], out, CompileOptions(distill=FAST))
    (out / "tiny-cpu" / "extra.onnx").write_bytes(b"not ours")
    res = runner.invoke(app, ["verify", str(out / "tiny-cpu")])
    assert res.exit_code == 1 and "extra.onnx not listed in the manifest" in res.stderr


def test_tokenizer_files_carry_the_validated_max_length(tiny_encoder, text_file, profile_file, tmp_path):
    from tokenizers import Tokenizer

    result = compile(str(tiny_encoder), str(text_file), [str(profile_file)], tmp_path / "out",
                     CompileOptions(distill=FAST, max_length=24))
    artifact = result.targets[0].path
    assert result.targets[0].manifest.data["max_length"] == 24
    tok = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    enc = tok.encode_batch(["dog " * 100, "cat"])
    assert len(enc[0].ids) == 24 and len(enc[1].ids) == 24  # truncation and padding configured
    assert AutoTokenizer.from_pretrained(artifact).model_max_length == 24


def test_tokenizer_is_part_of_the_cache_identity(tiny_encoder):
    from transformers import AutoTokenizer

    from edgedistill.tokenizer_io import tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(tiny_encoder)
    before = tokenizer_fingerprint(tok)
    tok(["a red boat"], padding="max_length", truncation=True, max_length=8)  # per-call state is not identity
    assert tokenizer_fingerprint(tok) == before
    tok.add_tokens(["zebra"])  # a different vocabulary labels differently
    assert tokenizer_fingerprint(tok) != before


def test_profile_sequence_longer_than_the_teachers_positions_is_cut_to_them(tiny_plain_encoder, text_file, tmp_path):
    """The tiny teacher has 64 position embeddings; a profile timing 128 tokens builds at 64 (before: a traceback
    from onnxruntime's QEmbedLayerNormalization, 'input index out of range', in the first quantization trial)."""
    profile = write_profile(tmp_path / "long.yaml", name="long", min_cosine=0.99999)
    profile.write_text(profile.read_text().replace("sequence: 16", "sequence: 128"))
    result = compile(str(tiny_plain_encoder), str(text_file), [str(profile)], tmp_path / "out", CompileOptions(distill=FAST))
    [target] = result.targets
    m = target.manifest
    assert m.target["input_shape"]["sequence"] == 64 and m.latency["sequence"] == 64
    assert m.quantization["trials"][0]["fidelity"] > 0.99 and m.latency["speedup_vs_teacher"] > 0


def test_four_bit_embedding_tables_are_packed_rows_unpacked_after_the_lookup(tiny_encoder, text_file, tmp_path):
    from onnx import numpy_helper

    from edgedistill.quantize.int4_rows import unpack_rows_int4

    profile = write_profile(tmp_path / "e4.yaml", name="e4",
                            quantization="recipe: dynamic-int8\n  per_channel: true\n  embedding_bits: 4\n  embedding_block_size: 16")
    result = compile(str(tiny_encoder), str(text_file), [str(profile)], tmp_path / "out", CompileOptions(distill=FAST))
    [target] = result.targets
    graph = onnx.load(str(target.path / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert "GatherBlockQuantized" not in ops and "EmbedLayerNormalization" not in ops, ops
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}, "the rest is int8 as before"
    tables = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    [packed] = [n for n in tables if n.endswith("_int4_packed")]
    scales = tables[packed.replace("_packed", "_scales")]
    vocab = result.student.model.get_input_embeddings().weight.detach().numpy()
    assert tables[packed].dtype == np.uint8 and tables[packed].shape == (vocab.shape[0], vocab.shape[1] // 2)
    assert scales.shape == (vocab.shape[0], vocab.shape[1] // 16), "one scale per block of 16"
    # the packed table stands for the student's own token table (not the position table, larger in this tiny model):
    # each value within one step of its block (a step where [-8, 7] clips the extreme's opposite, half elsewhere)
    error, step = np.abs(unpack_rows_int4(tables[packed], scales) - vocab), np.repeat(np.abs(scales), 16, 1)
    assert np.all(error <= step + 1e-6) and np.mean(error <= step / 2 + 1e-6) > 0.99
    texts = make_texts(12, seed=9)
    got, expected = run_artifact(target.path, texts), torch_outputs(result.student, target.path, texts)
    assert cosines(got, expected).min() > 0.97


def test_embedding_artifacts_report_out_of_domain_fidelity_beside_the_held_out_split(tiny_encoder, text_file,
                                                                                   profile_file, tmp_path):
    from edgedistill.data import out_of_domain_texts

    result = compile(str(tiny_encoder), str(text_file), [str(profile_file)], tmp_path / "out", CompileOptions(distill=FAST))
    [target] = result.targets
    m = target.manifest
    texts = out_of_domain_texts()
    assert len(texts) == m.data["out_of_domain"]["num_texts"] >= 200
    assert min(len(t) for t in texts) >= 300 and texts == out_of_domain_texts(), "long, and the same every run"
    # recomputed here from the teacher and the artifact as shipped (run as the README runs it)
    got = run_artifact(target.path, texts)
    teacher = torch_outputs(result.distilled.teacher.module, target.path, texts)
    values = m.metrics["values"]
    assert abs(float(cosines(got, teacher).mean()) - values["ood_cosine_mean"]) < 2e-3, values
    assert "torch_student_ood_cosine_mean" in values and "cosine_mean" in values
    report = (target.path / "report.md").read_text()
    assert "| ood_cosine_mean |" in report and "out-of-domain texts" in report


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_ffn_width_pruning_keeps_the_neurons_that_carry_the_function(kind):
    """Half of every FFN's neurons silenced (zero input weights and bias: GELU(0) = 0): they rank last and pruning
    them leaves the encoder's output unchanged."""
    from transformers import BertModel, DistilBertConfig, DistilBertModel

    from conftest import make_vocab, tiny_config
    from edgedistill.families.text_encoder_stages import narrow_ffn
    from edgedistill.teachers.hf import family_for
    from edgedistill.families.text_encoder import EncoderWithHead, Pooling

    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(tiny_config(), add_pooling_layer=False).eval()
    else:
        model = DistilBertModel(DistilBertConfig(vocab_size=len(make_vocab()), dim=32, n_layers=2, n_heads=2,
                                                 hidden_dim=64, max_position_embeddings=64)).eval()
    family = family_for(model.config)
    dead = torch.arange(0, 64, 2)
    with torch.no_grad():
        for layer in family.layers(model):
            [proj], _ = family.ffn_parts(layer)
            proj.weight[dead] = 0
            proj.bias[dead] = 0
    student = EncoderWithHead(model, "feature-extraction", Pooling())
    tokenizer = _tiny_tokenizer()
    texts = make_texts(16, seed=5)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask"]
    with torch.no_grad():
        before = student(enc["input_ids"], enc["attention_mask"])
    record = narrow_ffn(student, family, tokenizer, texts, names, 32, 0.5)
    assert record["teacher_ffn"] == 64 and record["kept_ffn"] == 32 and family.ffn_size(model.config) == 32
    for layer in family.layers(model):
        [proj], out = family.ffn_parts(layer)
        assert proj.weight.shape == (32, 32) and out.weight.shape == (32, 32)
        assert bool(proj.weight.abs().sum(1).gt(0).all())  # only the live neurons stayed
    with torch.no_grad():
        torch.testing.assert_close(student(enc["input_ids"], enc["attention_mask"]), before, atol=1e-5, rtol=1e-5)


def _tiny_tokenizer():
    from transformers import BertTokenizerFast
    import tempfile

    from conftest import make_vocab

    folder = Path(tempfile.mkdtemp())
    (folder / "vocab.txt").write_text("\n".join(make_vocab()) + "\n")
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)


def test_a_width_pruned_encoder_compiles_and_its_artifact_has_the_narrow_ffn(tiny_plain_encoder, text_file, tmp_path):
    profile = write_profile(tmp_path / "fp32.yaml", name="fp32", quantization="recipe: fp32")
    result = compile(str(tiny_plain_encoder), str(text_file), [str(profile)], tmp_path / "out",
                     CompileOptions(distill=FAST, ffn_ratio=0.5))
    artifact = result.targets[0].path
    m = verify_files(artifact)
    assert m.student["ffn_size"] == 32 and m.student["ffn"]["teacher_ffn"] == 64 and m.student["ffn"]["kept_ffn"] == 32
    graph = onnx.load(str(artifact / "model.onnx")).graph
    dims = {i.name: tuple(i.dims) for i in graph.initializer}
    matmuls = [dims[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in dims]
    assert matmuls and 64 not in {d for shape in matmuls for d in shape}  # every FFN is 32 wide now
    texts = make_texts(10, seed=3)
    np.testing.assert_allclose(run_artifact(artifact, texts), torch_outputs(result.student, artifact, texts), atol=1e-4)
    assert "FFN 32 of 64 neurons" in (artifact / "report.md").read_text()


@pytest.mark.parametrize("task", ["feature-extraction", "text-classification"])
def test_token_states_are_matched_at_the_given_weight_and_off_at_zero(task, tiny_encoder, tiny_classifier, text_file,
                                                                      labelled_jsonl, profile_file, tmp_path,
                                                                      monkeypatch):
    from edgedistill.families import text_encoder_stages as stages

    teacher, data = (tiny_encoder, text_file) if task == "feature-extraction" else (tiny_classifier, labelled_jsonl)
    calls = []
    real = stages.token_state_loss
    monkeypatch.setattr(stages, "token_state_loss", lambda s, t, m: calls.append(s.shape) or real(s, t, m))
    cache = tmp_path / "cache"
    on = compile(str(teacher), str(data), [str(profile_file)], tmp_path / "on",
                 CompileOptions(distill=FAST, cache_dir=cache, feature_weight=1.0))
    assert calls and all(len(shape) == 3 for shape in calls)  # (batch, tokens, hidden) of the last layer
    [target] = on.targets
    assert target.manifest.distillation["token_state_weight"] == 1.0
    assert "the last layer's token states" in (target.path / "report.md").read_text()
    n = len(calls)
    off = compile(str(teacher), str(data), [str(profile_file)], tmp_path / "off",
                  CompileOptions(distill=FAST, cache_dir=cache, feature_weight=0.0))
    assert len(calls) == n, "weight 0: no token-state loss"
    assert off.targets[0].manifest.distillation["token_state_weight"] == 0.0
    # a different loss is a different student, never taken from the other's cache (its losses differ)
    assert on.distilled.trained.history != off.distilled.trained.history
    assert CompileOptions().feature_weight == 0.0  # off unless asked for (README "Token states": measured)


def test_token_states_are_labelled_once_with_the_outputs_and_equal_the_teachers(tiny_encoder, text_file, tmp_path,
                                                                               monkeypatch):
    from edgedistill.cache import LabelStore, RaggedLabelStore
    from edgedistill.data import load_transfer_set
    from edgedistill.families import text_encoder_labels as labels
    from edgedistill.teachers import load_teacher

    teacher, data = load_teacher(str(tiny_encoder)), load_transfer_set(str(text_file))
    cache = tmp_path / "cache"
    states = labels.label_token_states(teacher, data, 32, cache)
    assert len(states) == len(data)
    # the same pass stored the outputs: labelling them finds nothing to do, and they are what labelling computes
    monkeypatch.setattr(LabelStore, "add", lambda *a: pytest.fail("the outputs were labelled in a second pass"))
    outputs = np.asarray(labels.label_with_teacher(teacher, data, 32, cache))
    monkeypatch.undo()
    np.testing.assert_allclose(outputs, np.asarray(labels.label_with_teacher(teacher, data, 32, tmp_path / "fresh")),
                               atol=1e-6)
    # each text's rows are the teacher's last-layer states of its real tokens (float16)
    texts = [data.texts[i] for i in (0, 7, 100)]
    enc = teacher.tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        _, live = teacher.module.eval()(enc["input_ids"], enc["attention_mask"], with_states=True)
    cached = states.padded([0, 7, 100], enc["input_ids"].shape[1])
    assert list(states.lengths([0, 7, 100])) == enc["attention_mask"].sum(1).tolist()
    mask = enc["attention_mask"].bool().numpy()
    np.testing.assert_allclose(cached[mask], live.numpy()[mask], rtol=2e-3, atol=2e-3)
    assert not cached[~mask].any()
    # a second compile's labelling reads the store
    monkeypatch.setattr(RaggedLabelStore, "add", lambda *a: pytest.fail("token states were labelled again"))
    labels.label_token_states(teacher, data, 32, cache)


def test_token_states_add_only_the_outputs_the_store_lacks(tiny_encoder, text_file, tmp_path):
    from edgedistill.cache import LabelStore
    from edgedistill.data import TransferSet, load_transfer_set
    from edgedistill.families import text_encoder_labels as labels
    from edgedistill.teachers import load_teacher

    teacher, data = load_teacher(str(tiny_encoder)), load_transfer_set(str(text_file))
    cache = tmp_path / "cache"
    half = TransferSet("half", data.texts[: len(data) // 2], None, "half-" + data.sha256)
    first = np.asarray(labels.label_with_teacher(teacher, half, 32, cache))
    labels.label_token_states(teacher, data, 32, cache)  # outputs for the other half come from the same pass
    store = LabelStore(labels._store_root(cache, teacher, 32))
    keys = np.concatenate([np.load(k) for k in store._shards()])
    assert len(keys) == len(set(keys.tolist())) == len(set(data.texts)), "each text's outputs stored once"
    outputs = np.asarray(labels.label_with_teacher(teacher, data, 32, cache))
    np.testing.assert_array_equal(outputs[: len(half)], first)
    np.testing.assert_allclose(outputs, np.asarray(labels.label_with_teacher(teacher, data, 32, tmp_path / "fresh")),
                               atol=1e-6)
