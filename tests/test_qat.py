"""Quantization-aware distillation: the rounding the student trains through is onnxruntime's, bit for bit; the
artifact built from it computes what the rounded torch student computes; mismatched targets are refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from lm_fixtures import build_tiny_causal_lm, tiny_causal_lm
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits
from test_causal_lm import lm_data, lm_opts, lm_profile  # noqa: F401 (fixture)

from edgedistill.artifact import verify_files
from edgedistill.distill.qat import FakeQuantSpec, block_round, fake_quantized, quantized_weights
from edgedistill.errors import EdgeDistillError
from edgedistill.pipeline import compile
from edgedistill.runtimes.ort_lm import OrtCausalLM


def _ort_dequantized(w_in_out: np.ndarray, bits: int, block: int) -> np.ndarray:
    """What MatMulNBits computes with: onnxruntime's own block quantization of a (K, N) weight, dequantized."""
    k, n = w_in_out.shape
    kb, per_byte = k // block, 8 // bits
    packed = np.zeros((n, kb, block // per_byte), np.uint8)
    zero = np.zeros((n, (kb + per_byte - 1) // per_byte), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(packed, w_in_out, scales, zero, block, n, k, True)
    if bits == 4:
        q = np.stack([packed & 0xF, packed >> 4], -1).reshape(n, kb, block).astype(np.int32) - 8
    else:
        q = packed.astype(np.int32) - 128
    return (q.astype(np.float32) * scales[:, :, None]).reshape(n, k).T  # in float32, as the kernel


@pytest.mark.parametrize("bits", [4, 8])
def test_block_round_is_onnxruntimes_quantizer(bits):
    w = np.random.default_rng(bits).standard_normal((128, 48)).astype(np.float32)  # (in, out) as the MatMul holds it
    w[:32, 0] = 0.0  # an all-zero block stays zero
    ours = block_round(torch.from_numpy(w.T.copy()), bits, 32).T.numpy()
    np.testing.assert_array_equal(ours, _ort_dequantized(w, bits, 32))


def test_fake_quant_rounds_forward_passes_gradients_and_leaves_float_weights():
    model = tiny_causal_lm("llama", num_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    spec = FakeQuantSpec(bits=4, block_size=32)
    modules = quantized_weights(model, spec)
    assert len(modules) == 2 * 7 + 1 + 1  # q k v o gate up down per layer, the LM head, the embeddings
    with fake_quantized(model, spec):
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr() or \
            model.config.tie_word_embeddings
        out = model(input_ids=ids).logits
        out.float().pow(2).mean().backward()
        grad = model.model.layers[0].mlp.down_proj.parametrizations.weight.original.grad
        assert grad is not None and grad.abs().sum() > 0  # straight through the rounding
        rounded = model.model.layers[0].mlp.down_proj.weight
        raw = model.model.layers[0].mlp.down_proj.parametrizations.weight.original
        torch.testing.assert_close(rounded, block_round(raw.detach(), 4, 32))
    reference = tiny_causal_lm("llama", num_layers=2)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(block_round(module.weight, 4, 32))
        torch.testing.assert_close(out.detach(), reference(input_ids=ids).logits)
    after = model.state_dict()
    assert after.keys() == before.keys()  # no parametrization left behind
    for k in before:
        torch.testing.assert_close(after[k], before[k])
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight



def test_rounding_is_kept_until_the_weight_changes_and_shared_by_tied_weights(monkeypatch):
    import copy

    from edgedistill.distill import qat

    calls = []
    real = qat.block_round
    monkeypatch.setattr(qat, "block_round", lambda w, *a: calls.append(w.shape) or real(w, *a))
    model = tiny_causal_lm("llama", num_layers=2)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.model.embed_tokens.weight.requires_grad_(False)  # frozen, as freeze_embeddings leaves it
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    table = tuple(model.model.embed_tokens.weight.shape)
    with fake_quantized(model, FakeQuantSpec(bits=4, block_size=32)):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        calls.clear()  # registering the parametrizations rounded each weight once
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        model(input_ids=ids)
        assert calls == []  # no weight changed since
        optimizer.step()
        optimizer.zero_grad()
        model(input_ids=ids)
        assert table not in [tuple(c) for c in calls]  # frozen: never rounded again
        assert len(calls) == 2 * 7  # q k v o gate up down per layer rounded again after the step (the LM head is tied)
        down = model.model.layers[0].mlp.down_proj
        torch.testing.assert_close(down.weight, block_round(down.parametrizations.weight.original.detach(), 4, 32))
        n = len(calls)
        with torch.no_grad():
            model(input_ids=ids)
            model(input_ids=ids)
        assert len(calls) == n  # evaluation passes read the kept roundings
        clone = copy.deepcopy(model)  # the loop's best state: its own roundings, of its own weights
        with torch.no_grad():
            clone.model.layers[0].mlp.down_proj.parametrizations.weight.original.mul_(2)
        torch.testing.assert_close(clone.model.layers[0].mlp.down_proj.weight, 2 * down.weight)


def test_quantization_aware_compile_artifact_computes_the_rounded_student(lm_data, tmp_path):  # noqa: F811
    teacher = build_tiny_causal_lm(tmp_path / "teacher", model_type="llama")
    profile = lm_profile(tmp_path / "p.yaml", "{recipe: weight-only, bits: 4, block_size: 32, accuracy_level: 1}")
    result = compile(str(teacher), str(lm_data), [str(profile)], tmp_path / "out", lm_opts(quantization_aware=True))
    target = result.targets[0]
    m = verify_files(target.path)
    assert m.distillation["quantization_aware"] == {"bits": 4, "block_size": 32, "embeddings": True}
    assert m.quantization["trials"][0]["description"] == "as configured"
    student = result.student
    assert not any("parametrizations" in k for k in student.state_dict())
    ids = np.load(target.path / "validation-windows.npy")[:2].astype(np.int64)
    with torch.no_grad():
        for module, transposed in quantized_weights(student, FakeQuantSpec()):
            module.weight.copy_(block_round(module.weight, 4, 32))
        expected = student(input_ids=torch.from_numpy(ids)).logits.numpy()
    # fp32 activations (accuracy level 1): the int4 artifact is the rounded student up to float summation order
    np.testing.assert_allclose(OrtCausalLM(target.path / "model.onnx").logits(ids), expected, atol=2e-3)


def test_quantization_aware_refuses_targets_that_round_differently(lm_data, tmp_path):  # noqa: F811
    teacher = build_tiny_causal_lm(tmp_path / "teacher", model_type="llama")
    a = lm_profile(tmp_path / "a.yaml", "{recipe: weight-only, bits: 4, block_size: 32}", name="a")
    b = lm_profile(tmp_path / "b.yaml", "{recipe: weight-only, bits: 4, block_size: 64}", name="b")
    with pytest.raises(EdgeDistillError, match="round weights differently"):
        compile(str(teacher), str(lm_data), [str(a), str(b)], tmp_path / "out", lm_opts(quantization_aware=True))
    c = lm_profile(tmp_path / "c.yaml", "{recipe: fp32}", name="c")
    with pytest.raises(EdgeDistillError, match="symmetric rtn weight-only"):
        compile(str(teacher), str(lm_data), [str(c)], tmp_path / "out2", lm_opts(quantization_aware=True))
    assert not (tmp_path / "out" / "a").exists() and not (tmp_path / "out2" / "c").exists()
