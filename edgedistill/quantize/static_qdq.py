"""Static int8 in QDQ format with onnxruntime's quantizer, calibrated on real transfer-set inputs."""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from edgedistill.errors import DataError
from edgedistill.quantize import Feeds, excluded_nodes, register_recipe
from edgedistill.quantize.configs import StaticQdqInt8Config
from edgedistill.quantize.int4_rows import pack_token_gathers, token_table_gathers

_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}
_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}


class _Reader(CalibrationDataReader):
    def __init__(self, feeds: Sequence[Feeds]) -> None:
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


@register_recipe(StaticQdqInt8Config)
def quantize_static_qdq(model_path: Path, config: StaticQdqInt8Config, out_path: Path,
                        calibration: Sequence[Feeds] = ()) -> Path:
    if len(calibration) < 4:
        raise DataError(f"static quantization needs at least 4 calibration inputs, got {len(calibration)}",
                        hint="pass a larger --data; calibration uses the training split")
    logging.getLogger("root").setLevel(logging.ERROR)
    # activation ranges depend on the model, the inputs and the method, not on which nodes are excluded: the
    # accuracy search re-quantizes many times, so ranges are computed once per method and cached beside the output;
    # the calibrator records the tensors of the quantized operator types, so those are part of the key. The search's
    # graphs with some nodes' float weights put back are saved under the name of the graph they come from and so
    # reuse its ranges (they differ from it only by the rounding of those weights)
    ops = "-".join(sorted(config.op_types))
    cache = out_path.parent / (f".calibration-{model_path.stem}-{config.calibration}-{config.activation_type}-"
                               f"{len(calibration)}-{ops}.json")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # symbolic shape inference fails on these graphs (and is not needed with fixed or plain dims)
        quant_pre_process(str(model_path), str(prepared), skip_symbolic_shape=True)
        excluded = excluded_nodes(prepared, config.exclude)
        dynamic = [n for n in excluded_nodes(prepared, config.dynamic) if n not in set(excluded)]
        weight_only = [n for n in excluded_nodes(prepared, config.weight_only) if n not in set(excluded + dynamic)]
        four_bit = token_table_gathers(onnx.load(str(prepared), load_external_data=False), excluded) \
            if config.embedding_bits == 4 else []
        if config.calibration == "entropy" and not cache.is_file():
            _entropy_ranges(prepared, config, calibration, cache, Path(tmp))
        with contextlib.redirect_stdout(io.StringIO()):  # the entropy/percentile calibrators print progress
            quantize_static(
                str(prepared), str(out_path), _Reader(calibration),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=config.op_types,
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                activation_type=_TYPES[config.activation_type],
                weight_type=_TYPES[config.weight_type],
                calibrate_method=_METHODS[config.calibration],
                nodes_to_exclude=excluded + dynamic + weight_only + four_bit,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT,
                               "ActivationSymmetric": config.activation_type == "int8"},
                calibration_cache_path=cache,
            )
    if dynamic:
        quantize_dynamically(out_path, dynamic, config.per_channel, config.reduce_range)
    if weight_only:
        quantize_weights_only(out_path, weight_only)
    if four_bit:
        pack_token_gathers(out_path, four_bit, config.embedding_block_size)
    if config.unsigned_weights:
        store_weights_unsigned(out_path)
    return out_path


def store_weights_unsigned(model_path: Path) -> int:
    """Rewrite the model in place: every constant int8 weight behind a DequantizeLinear with zero point 0 is stored
    as uint8 with zero point 128 (q + 128: the same values, so the same model), which makes onnxruntime run its
    convolutions with u8*u8 kernels instead of u8*s8 ones. Returns how many weights were rewritten."""
    import numpy as np
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    index = {t.name: i for i, t in enumerate(model.graph.initializer)}
    done = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or node.input[0] not in index \
                or node.input[2] not in index:
            continue
        weight, zero = (model.graph.initializer[index[n]] for n in (node.input[0], node.input[2]))
        w, z = numpy_helper.to_array(weight), numpy_helper.to_array(zero)
        if w.dtype != np.int8 or z.any():  # -128 too maps into uint8 (0)
            continue
        weight.CopyFrom(numpy_helper.from_array((w.astype(np.int16) + 128).astype(np.uint8), weight.name))
        zero.CopyFrom(numpy_helper.from_array(np.full(z.shape, 128, np.uint8), zero.name))
        done += 1
    onnx.save(model, str(model_path))
    return done


def _entropy_ranges(prepared: Path, config: StaticQdqInt8Config, calibration: Sequence[Feeds], cache: Path,
                    tmp: Path) -> None:
    """Write KL-divergence (entropy) ranges to the calibration cache that quantize_static then reads.

    quantize_static builds its entropy calibrator with 128 histogram bins and 128 quantized bins and passes no option
    to change them; with as many bins as quantized bins the threshold search has one candidate, the full range, so
    "entropy" silently equals "minmax" (measured: identical cosines on MiniLM). We calibrate with TensorRT's
    setting instead: TensorRT histograms |x| in 2048 bins and searches the threshold over 128 quantized bins (int8's
    magnitudes); onnxruntime's histogram spans both signs, so the equivalent is 4096 bins over 256 quantized bins.
    """
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    with contextlib.redirect_stdout(io.StringIO()):
        calibrator = create_calibrator(
            prepared, config.op_types, augmented_model_path=str(tmp / "augmented.onnx"),
            calibrate_method=CalibrationMethod.Entropy,
            extra_options={"symmetric": config.activation_type == "int8", "num_bins": 4096, "num_quantized_bins": 256})
        calibrator.collect_data(_Reader(calibration))
        # the same threshold search, without onnxruntime's per-bin Python loops (their sums took 198 of 210 s on
        # MobileNetV2's 100 tensors); the thresholds are equal, tested against onnxruntime's own
        calibrator.collector.get_entropy_threshold = entropy_threshold
        save_tensors_data(calibrator.compute_data(), cache)


def entropy_threshold(histogram, num_quantized_bins: int):
    """onnxruntime's HistogramCollector.get_entropy_threshold (onnxruntime 1.32) for integer histograms, its bin
    merging done with reshapes and cumulative sums instead of Python loops: for each symmetric window around the zero
    bin, p is the window with the outliers added to its end bins, q its bins merged into `num_quantized_bins` and
    spread back (integer-truncated over p's non-zero bins' count, as onnxruntime does); the least KL wins."""
    import numpy as np
    from onnxruntime.quantization.calibrate import entropy
    from onnxruntime.quantization.quant_utils import smooth_distribution

    hist, edges, min_value, max_value = histogram[0], histogram[1], histogram[2], histogram[3]
    if not np.issubdtype(hist.dtype, np.integer):
        raise TypeError(f"entropy_threshold takes integer histograms, got {hist.dtype}")
    num_bins, dtype = hist.size, edges.dtype
    zero, half = num_bins // 2, num_quantized_bins // 2
    total = np.concatenate([[0], np.cumsum(hist)])  # exact: integers
    divergences, windows = [], []
    for i in range(half, zero + 1):
        start, end = zero - i, min(zero + i + 1, num_bins)
        windows.append((edges[start], edges[end]))
        window = hist[start:end]
        p = window.copy()
        p[0] += total[start]
        p[-1] += total[-1] - total[end]
        merged = window.size // num_quantized_bins
        body = num_quantized_bins * merged
        quantized = window[:body].reshape(num_quantized_bins, merged).sum(1)
        quantized[-1] += window[body:].sum()
        norm = (p[:body] != 0).reshape(num_quantized_bins, merged).sum(1)
        q = np.zeros(p.size, dtype=np.int64)
        q[:body] = np.repeat(np.where(norm != 0, quantized / np.maximum(norm, 1), 0), merged)
        p, q = smooth_distribution(p), smooth_distribution(q)
        divergences.append(np.inf if p is None or q is None else float(np.array(entropy(p, q), dtype=dtype)))
    low, high = windows[int(np.argmin(divergences))]
    return (min_value if low < min_value else low), (max_value if high > max_value else high)


def _replace_node(graph, node, replacement: list) -> None:
    """Put `replacement` (nodes in order) where `node` stands in the topologically sorted node list."""
    position = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, new in enumerate(replacement):
        graph.node.insert(position + offset, new)


def quantize_dynamically(model_path: Path, node_names: list[str], per_channel: bool, reduce_range: bool = False) -> None:
    """Rewrite the model in place: each named MatMul/Gemm gets int8 weights and an input quantized on each call
    (onnxruntime's `quantize_dynamic` on those nodes alone; the graph's static Q/DQ pairs are left as they are).

    onnxruntime's dynamic quantizer takes MatMul, not Gemm, and its pre-processing fused MatMul+Add into Gemm: a
    named Gemm (alpha = beta = 1, 2-D) is first written back as MatMul + Add, keeping its name on the MatMul."""
    from onnx import helper, numpy_helper
    from onnxruntime.quantization import quantize_dynamic

    model = onnx.load(str(model_path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    wanted, names = set(node_names), []
    for node in list(graph.node):
        if node.name not in wanted or node.input[1] not in inits:
            continue
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
                continue
            if attrs.get("transB", 0):
                w = inits[node.input[1]]
                transposed = numpy_helper.from_array(numpy_helper.to_array(w).T.copy(), f"{w.name}_kn")
                graph.initializer.append(transposed)
                weight = transposed.name
            else:
                weight = node.input[1]
            product = f"{node.output[0]}_matmul" if len(node.input) > 2 and node.input[2] else node.output[0]
            matmul = helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name)
            replacement = [matmul]
            if product != node.output[0]:
                replacement.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                                    name=f"{node.name}_bias_Add"))
            _replace_node(graph, node, replacement)
        elif node.op_type != "MatMul":
            continue
        names.append(node.name)
    if not names:
        return
    with tempfile.TemporaryDirectory() as tmp:
        unfused = Path(tmp) / "unfused.onnx"
        onnx.save(model, str(unfused))
        quantize_dynamic(unfused, model_path, weight_type=QuantType.QInt8, per_channel=per_channel,
                         reduce_range=reduce_range, op_types_to_quantize=["MatMul"], nodes_to_quantize=names,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def quantize_weights_only(model_path: Path, node_names: list[str]) -> None:
    """Rewrite the model in place: the constant weight of each named MatMul/Gemm becomes int8 (one symmetric scale
    per output channel, max|w| / 127) behind a DequantizeLinear; the node's activations stay float.

    The int8 weight is stored (N, K), output channels first, and reaches a Gemm through transB; a MatMul becomes
    Reshape(x, [-1, K]) -> Gemm -> Reshape(x's leading dims + [N]). onnxruntime 1.32 rewrites any
    DequantizeLinear(int8) -> MatMul (a Transpose between them included, and per-tensor scales too) into
    MatMulNBits, which computes with int8 activations (accuracy level 4), the opposite of what is asked here
    (measured: a 1e4 outlier in the input then wipes out the other values); DequantizeLinear -> Gemm it leaves."""
    import numpy as np
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    wanted, added = set(node_names), []
    for node in list(graph.node):
        if node.name not in wanted or node.op_type not in ("MatMul", "Gemm") or node.input[1] not in inits:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if weight.ndim != 2:
            continue
        trans_b = next((a for a in node.attribute if a.name == "transB"), None) if node.op_type == "Gemm" else None
        nk = weight if trans_b is not None and trans_b.i else weight.T  # (N, K): one row per output channel
        scale = np.abs(nk).max(axis=1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.round(nk / scale[:, None]), -127, 127).astype(np.int8)
        base = f"{node.input[1]}_weight_only"
        graph.initializer.extend([numpy_helper.from_array(q, f"{base}_int8"), numpy_helper.from_array(scale, f"{base}_scale"),
                                  numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{base}_zero_point")])
        added.append(helper.make_node("DequantizeLinear", [f"{base}_int8", f"{base}_scale", f"{base}_zero_point"],
                                      [base], name=f"{node.name}_weight_DequantizeLinear", axis=0))
        consumers[node.input[1]] -= 1
        if consumers[node.input[1]] == 0:
            graph.initializer.remove(inits.pop(node.input[1]))
        if node.op_type == "Gemm":
            if trans_b is None:
                node.attribute.append(helper.make_attribute("transB", 1))
            else:
                trans_b.i = 1
            node.input[1] = base
            continue
        x, y, n = node.input[0], node.output[0], node.name
        graph.initializer.extend([
            numpy_helper.from_array(np.array([-1, q.shape[1]], np.int64), f"{base}_rows"),
            numpy_helper.from_array(np.array([0], np.int64), f"{base}_zero"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{base}_minus_one"),
            numpy_helper.from_array(np.array([q.shape[0]], np.int64), f"{base}_n")])
        gemm = [
            helper.make_node("Reshape", [x, f"{base}_rows"], [f"{y}_rows_in"], name=f"{n}_Reshape_in"),
            helper.make_node("Gemm", [f"{y}_rows_in", base], [f"{y}_rows"], name=n, transB=1),
            helper.make_node("Shape", [x], [f"{y}_x_shape"], name=f"{n}_Shape"),
            helper.make_node("Slice", [f"{y}_x_shape", f"{base}_zero", f"{base}_minus_one"], [f"{y}_lead"],
                             name=f"{n}_Slice"),
            helper.make_node("Concat", [f"{y}_lead", f"{base}_n"], [f"{y}_shape"], name=f"{n}_Concat", axis=0),
            helper.make_node("Reshape", [f"{y}_rows", f"{y}_shape"], [y], name=f"{n}_Reshape_out")]
        _replace_node(graph, node, gemm)
    for i, n in enumerate(added):  # before every consumer: they lead the (topologically sorted) node list
        graph.node.insert(i, n)
    onnx.save(model, str(model_path))
