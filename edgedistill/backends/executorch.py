"""The ExecuTorch backend (the PyTorch-native mobile path): torch.export -> optional PT2E dynamic int8 for XNNPACK ->
XNNPACK delegate -> .pte. ExecuTorch's Python runtime runs the .pte here with the same XNNPACK kernels a phone uses."""
from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from edgedistill.backends import BuildContext, Built, register_backend, trial_latency
from edgedistill.errors import ExportError
from edgedistill.quantize.configs import Fp32Config, XnnpackDynamicInt8Config
from edgedistill.runtimes import iter_batches

MODEL_FILE = "model.pte"


@contextmanager
def _quiet_stderr():
    """Send file descriptor 2 to /dev/null: ExecuTorch's runtime prints five cpuinfo lines from C++ when its first
    program loads on a machine that is not an arm phone, which a user's terminal should not show."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load_pte_method(path: Path):
    """Return a .pte file's loaded `forward` method (executorch.runtime.Method: execute(), metadata).

    ExecuTorch's quantized kernels (embedding_byte / embedding_4bit, for the quantized embedding tables) are
    registered first: the runtime finds them only once `executorch.kernels.quantized` is imported (without it,
    load_method fails with 'error: 0x:14'); a phone app links the same library."""
    import executorch.kernels.quantized  # noqa: F401
    from executorch.runtime import Runtime

    with _quiet_stderr():
        return Runtime.get().load_program(str(path)).load_method("forward")


def pte_runner(method):
    """Return a runner for a loaded method: feeds (numpy, in input order) -> first output as numpy."""

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return method.execute([torch.from_numpy(v) for v in feeds.values()])[0].numpy()

    return run


def load_pte(path: Path):
    """Return a runner for a .pte file (pte_runner of its forward method)."""
    return pte_runner(load_pte_method(path))


class Embedding4bit(torch.nn.Module):
    """An nn.Embedding's table as ExecuTorch's quantized `embedding_4bit` kernel reads it (quantize/int4_rows.py:
    4-bit values two per byte, a float scale per `block` values of a row, rounded as onnxruntime's int4)."""

    def __init__(self, weight: torch.Tensor, block: int):
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  defines embedding_4bit
        import executorch.kernels.quantized  # noqa: F401  its kernel

        from edgedistill.quantize.int4_rows import pack_rows_int4

        super().__init__()
        packed, scales = pack_rows_int4(weight.detach().float().numpy(), block)
        self.register_buffer("packed", torch.from_numpy(packed))
        self.register_buffer("scales", torch.from_numpy(scales))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized_decomposed.embedding_4bit.dtype(self.packed, self.scales, None, -8, 7, indices,
                                                                   dtype=torch.float32)


def with_4bit_token_table(module: torch.nn.Module, vocab_size: int, block: int) -> torch.nn.Module:
    """Return a copy of `module` whose token-embedding table (the nn.Embedding with `vocab_size` rows) is an
    Embedding4bit; the position and token-type tables are left to EmbeddingQuantizer (uint8): every input reads
    every position row, and 4 bits there cost fidelity for little size (README "4-bit token embeddings")."""
    import copy

    module = copy.deepcopy(module)
    found = [(name, m) for name, m in module.named_modules()
             if isinstance(m, torch.nn.Embedding) and m.num_embeddings == vocab_size]
    if len(found) != 1:
        raise ExportError(f"found {len(found)} token-embedding tables of {vocab_size} rows, expected one",
                          hint="set embedding_bits: 8 in the profile's quantization for this model")
    name, table = found[0]
    parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
    setattr(parent, name.rpartition(".")[2], Embedding4bit(table.weight, block))
    return module


def annotate_conv_clamps(gm: torch.fx.GraphModule, config) -> None:
    """Annotate each convolution whose only user is a clamp (ReLU6: aten.hardtanh) as one quantized op: the
    convolution's inputs quantized, its output not, the clamp's output quantized. XNNPACKQuantizer
    does this for ReLU only, so a ReLU6 network's convolution outputs were quantized over their whole range before
    the clamp (a quarter or less of the 256 levels left inside [0, 6]); this way XNNPACK fuses the clamp into the
    convolution (its output_min/max) and the range is the clamp's. Measured (README, "ExecuTorch: ReLU6 fused"):
    MobileNetV2 quantized without training, top-1 agreement 0.778 -> 0.852 on held-out photos. F.relu6 and clamp
    export as aten.relu6 / aten.clamp, which the quantizer gives their own range: their .pte measured the same with
    and without this, so only hardtanh is matched."""
    from torchao.quantization.pt2e.quantizer import (QuantizationAnnotation, get_bias_qspec, get_input_act_qspec,
                                                     get_output_act_qspec, get_weight_qspec)
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY
    from torchao.quantization.pt2e.utils import _is_conv_node

    for clamp in gm.graph.nodes:
        if clamp.op != "call_function" or clamp.target not in (torch.ops.aten.hardtanh.default,
                                                               torch.ops.aten.hardtanh_.default):  # ReLU6
            continue
        conv = clamp.args[0]
        if not (isinstance(conv, torch.fx.Node) and _is_conv_node(conv) and len(conv.users) == 1):
            continue
        if Q_ANNOTATION_KEY in conv.meta or Q_ANNOTATION_KEY in clamp.meta:
            continue
        inputs = {conv.args[0]: get_input_act_qspec(config), conv.args[1]: get_weight_qspec(config)}
        if len(conv.args) > 2 and isinstance(conv.args[2], torch.fx.Node):
            inputs[conv.args[2]] = get_bias_qspec(config)
        conv.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=inputs, _annotated=True)
        clamp.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(output_qspec=get_output_act_qspec(config),
                                                              _annotated=True)


def xnnpack_quantizer(per_channel: bool, dynamic: bool, activation_observer: str = "histogram"):
    """Return XNNPACKQuantizer with its symmetric int8 config (int8 weights, symmetric, per output channel when
    per_channel; int8 activations, quantized at run time when dynamic, else over ranges observed by
    `activation_observer`: histogram (XNNPACK's default, an L2-optimal range) or minmax), convolutions followed by
    a clamp annotated as one op (annotate_conv_clamps)."""
    import dataclasses

    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e import MinMaxObserver

    config = get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=dynamic)
    if not dynamic and activation_observer == "minmax":
        act = dataclasses.replace(config.input_activation,
                                  observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
        config = dataclasses.replace(config, input_activation=act, output_activation=act)

    class ClampFusingQuantizer(XNNPACKQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            if not dynamic:
                annotate_conv_clamps(model, config)
            return super().annotate(model)

    return ClampFusingQuantizer().set_global(config)


def quantize_for_xnnpack(exported, example: tuple, calibration, per_channel: bool, dynamic: bool,
                         embeddings: bool = False, activation_observer: str = "histogram"):
    """Return `exported` (a torch.export program) quantized by PT2E with XNNPACKQuantizer's symmetric int8 config
    (xnnpack_quantizer: dynamic: activations quantized at run time; static: ranges observed on `calibration`, an
    iterable of input tuples, by `activation_observer`), re-exported at `example`. embeddings: also torchao's
    EmbeddingQuantizer (uint8 tables, a scale per row), which `lower_to_pte` then fuses into ExecuTorch's
    embedding_byte kernel."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = xnnpack_quantizer(per_channel, dynamic, activation_observer)
    if embeddings:
        import executorch.kernels.quantized  # noqa: F401  registers quantized_decomposed.embedding_byte for export
        from torchao.quantization.pt2e.quantizer import ComposableQuantizer
        from torchao.quantization.pt2e.quantizer.embedding_quantizer import EmbeddingQuantizer

        quantizer = ComposableQuantizer([EmbeddingQuantizer(), quantizer])
    prepared = prepare_pt2e(exported.module(), quantizer)
    for inputs in calibration:
        prepared(*inputs)
    return torch.export.export(convert_pt2e(prepared), example)


def pte_operators(path: Path) -> list[str]:
    """Return the operators a .pte calls outside its delegates (the kernels the runtime must be built with)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(path.read_bytes())
    program = getattr(program, "program", program)
    return sorted({op.name for plan in program.execution_plan for op in plan.operators})


def lower_to_pte(exported) -> bytes:
    """Return the .pte bytes of a torch.export program: XNNPACK delegate, then ExecuTorch's quantized-op fusion
    (dequantize -> embedding becomes embedding_byte; a no-op for graphs without quantized embeddings)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.quant_fusion_pass import QuantFusionPass

    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    return edge.to_executorch(ExecutorchBackendConfig(passes=[QuantFusionPass()])).buffer


@register_backend("executorch")
def build_executorch(profile, ctx: BuildContext, stage_dir: Path) -> Built:
    try:
        from executorch import version as et_version
    except ImportError:
        raise ExportError("the ExecuTorch target needs the executorch package", hint="run `make install`") from None
    shape = profile.input_shape
    batches = [feeds for _, feeds in iter_batches(ctx.tokenizer, ctx.calibration_texts or ["a"], ctx.input_names,
                                                  shape.sequence, shape.batch, fixed=True)]
    example = tuple(torch.from_numpy(v) for v in batches[0].values())
    module = ctx.student.eval()
    cfg = profile.quantization
    if isinstance(cfg, XnnpackDynamicInt8Config) and cfg.embeddings and cfg.embedding_bits == 4:
        module = with_4bit_token_table(module, ctx.student.model.config.vocab_size, cfg.embedding_block_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export / pytree deprecation chatter, one line per tensor
        exported = torch.export.export(module, example)
        if isinstance(cfg, XnnpackDynamicInt8Config):
            exported = quantize_for_xnnpack(exported, example, ([torch.from_numpy(v) for v in feeds.values()]
                                                                for feeds in batches[:8]), cfg.per_channel, dynamic=True,
                                            embeddings=cfg.embeddings)
        buffer = lower_to_pte(exported)
    path = stage_dir / MODEL_FILE
    path.write_bytes(buffer)
    run = load_pte(path)
    with torch.no_grad():
        expected = module(*example).numpy()
    diff = float(np.max(np.abs(run(batches[0]) - expected)))
    if isinstance(cfg, Fp32Config) and diff > 1e-3:
        raise ExportError(f"the .pte differs from the torch student by {diff:.2e}", hint="report this model")
    fixed = (shape.batch, shape.sequence)
    fidelity = ctx.fidelity(run, fixed)
    trial = {"description": "as the profile says", "config": cfg.model_dump(mode="json"), "fidelity": fidelity,
             "passed": fidelity >= ctx.floor, "size_mb": path.stat().st_size / 1e6,
             "latency_ms": trial_latency(run, batches[0])}
    record = {
        "export": {"exporter": "torch.export -> ExecuTorch, XNNPACK delegate", "executorch": et_version.__version__,
                   "max_abs_diff_vs_torch": diff},
        "optimization": {"mode": "XNNPACK partitioner", "fused_ops": {}},
        "quantization": {"profile": cfg.model_dump(mode="json"), "chosen": cfg.model_dump(mode="json"), "trials": [trial]},
        "model": {"file": MODEL_FILE, "format": "pte", "device_execution_providers": ["XNNPACK"],
                  "operators": pte_operators(path),
                  "inputs": [{"name": n, "elem_type": "INT64", "shape": list(fixed)} for n in ctx.input_names],
                  "outputs": [{"name": "output", "elem_type": "FLOAT", "shape": list(expected.shape)}]},
    }
    return Built({MODEL_FILE: path}, run, fixed, MODEL_FILE, record)
