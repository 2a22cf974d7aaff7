"""The vision student to ONNX: input `pixels` at the profile's fixed size (only the batch is free), output `logits`,
checked against torch; TensorFlow-style zero Pads folded into the following Conv's own pads."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from edgedistill.errors import EdgeDistillError
from edgedistill.families.vision_stages import INPUT, OUTPUT
from edgedistill.runtimes.ort_cpu import cpu_session


def export_vision(student: torch.nn.Module, size: int, out: Path, opset: int) -> tuple[Path, dict]:
    """Export the student to ONNX (input `pixels` (batch, 3, S, S) in [0, 1], output `logits`, dynamic batch) and
    check onnxruntime against torch on real-looking inputs."""
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    student = student.eval()
    with warnings.catch_warnings():  # the fixed input size is meant (Conv2dSame's pads), and the exporter's notes
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(student, (example,), str(out), input_names=[INPUT], output_names=[OUTPUT],
                          opset_version=opset, dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, dynamo=False)
    pads_folded = fold_pads_into_convs(out)
    with torch.no_grad():
        expected = student(example).numpy()
    got = cpu_session(out, threads=1).run(None, {INPUT: example.numpy()})[0]
    diff = float(np.max(np.abs(got - expected)))
    if not diff < 1e-3 * max(1.0, float(np.abs(expected).max())):
        raise EdgeDistillError(f"the exported graph differs from the torch student by {diff:.3g}",
                               hint="report this model; try another opset in the profile")
    return out, {"exporter": "torch.onnx.export (TorchScript)", "opset": opset, "max_abs_diff_vs_torch": diff,
                 "pads_folded_into_convs": pads_folded}


def fold_pads_into_convs(path: Path) -> int:
    """Fold each zero-valued constant Pad that feeds only a Conv into that Conv's own (asymmetric) pads, in place;
    return how many. TensorFlow's 'SAME' padding (EfficientNet-Lite's stride-2 convolutions) exports as a Pad before
    the Conv; left apart, the quantized graph ran it in float between a DequantizeLinear and a QuantizeLinear, with
    layout Transposes around it (measured on efficientnet-lite0's int8 artifact: 38% of its time). The pads are first
    made constants by onnxruntime's basic (hardware-independent) optimizations, which constant-fold the shape
    arithmetic the TorchScript exporter writes for F.pad; nothing is written when there is no Pad to fold."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    if not any(n.op_type == "Pad" for n in onnx.load(str(path), load_external_data=False).graph.node):
        return 0
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path.with_suffix(".basic.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(options.optimized_model_filepath)
    Path(options.optimized_model_filepath).unlink()
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    folded = 0
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        attrs = {a.name: helper.get_attribute_value(a) for a in pad.attribute}
        after = consumers.get(pad.output[0], [])
        if (attrs.get("mode", b"constant") != b"constant" or len(pad.input) < 2 or pad.input[1] not in inits
                or len(after) != 1 or after[0].op_type != "Conv" or pad.output[0] in outputs
                or (len(pad.input) > 2 and pad.input[2] and not (pad.input[2] in inits and not inits[pad.input[2]].any()))
                or (len(pad.input) > 3 and pad.input[3])):
            continue
        pads, conv = [int(v) for v in inits[pad.input[1]]], after[0]
        rank = len(pads) // 2
        conv_attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        if rank < 3 or any(pads[i] or pads[rank + i] for i in (0, 1)) or min(pads) < 0 \
                or conv_attrs.get("auto_pad", b"NOTSET") != b"NOTSET":
            continue
        spatial = pads[2:rank] + pads[rank + 2:]
        old = conv_attrs.get("pads", [0] * len(spatial))
        for a in list(conv.attribute):
            if a.name == "pads":
                conv.attribute.remove(a)
        conv.attribute.append(helper.make_attribute("pads", [x + y for x, y in zip(old, spatial)]))
        conv.input[0] = pad.input[0]
        graph.node.remove(pad)
        folded += 1
    onnx.save(model, str(path))
    return folded
