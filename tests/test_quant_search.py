"""Accuracy-aware quantization on a graph with a planted sensitive node: plain static int8 misses the budget, the
search finds the node by measuring sensitivity and keeps it in float."""
from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgedistill.quantize.configs import StaticQdqInt8Config
from edgedistill.quantize.search import float_bytes, node_groups, quantize_within_budget


def planted_model(path):
    """out = concat(x @ Wa, (x * spike) @ Wb, x @ Wc): the spike gives one MatMul input a 1e4 outlier (which Wb
    ignores), so a per-tensor uint8 activation scale wipes out all the values that matter."""
    rng = np.random.default_rng(0)
    spike = np.ones((1, 64), np.float32)
    spike[0, 0] = 1e4
    weights = {n: rng.normal(size=(64, 32)).astype(np.float32) for n in ("Wa", "Wb", "Wc")}
    weights["Wb"][0, :] = 0.0
    inits = [numpy_helper.from_array(w, n) for n, w in weights.items()]
    inits.append(numpy_helper.from_array(spike, "spike"))
    nodes = [
        helper.make_node("MatMul", ["x", "Wa"], ["a"], name="/a/MatMul"),
        helper.make_node("Mul", ["x", "spike"], ["xs"], name="/b/Mul"),
        helper.make_node("MatMul", ["xs", "Wb"], ["b"], name="/b/MatMul"),
        helper.make_node("MatMul", ["x", "Wc"], ["c"], name="/c/MatMul"),
        helper.make_node("Concat", ["a", "b", "c"], ["out"], axis=1, name="/concat"),
    ]
    return save_graph(path, nodes, inits, [1, 64], [1, 96])


def save_graph(path, nodes, inits, x_shape, out_shape):
    """Write a float graph from input 'x' to output 'out' at opset 17 and return its path."""
    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def test_search_keeps_the_planted_sensitive_node_in_float(tmp_path):
    model = planted_model(tmp_path / "planted.onnx")
    rng = np.random.default_rng(1)
    calibration = [{"x": rng.normal(size=(1, 64)).astype(np.float32)} for _ in range(16)]
    held_out = [rng.normal(size=(1, 64)).astype(np.float32) for _ in range(32)]
    reference = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    expected = np.concatenate([reference.run(None, {"x": x})[0] for x in held_out])

    def fidelity(path) -> float:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = np.concatenate([sess.run(None, {"x": x})[0] for x in held_out])
        cos = np.sum(got * expected, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
        return float(cos.mean())

    assert set(node_groups(model, ["MatMul"])) == {"/a/MatMul", "/b/MatMul", "/c/MatMul"}
    config = StaticQdqInt8Config(op_types=["MatMul"], calibration_texts=16, search=True)
    path, chosen, trials = quantize_within_budget(model, config, tmp_path, calibration, fidelity, floor=0.99)
    assert not trials[0].passed and trials[0].fidelity < 0.99  # plain quantization misses the budget
    assert trials[-1].passed and fidelity(path) >= 0.99
    # it kept exactly the planted node in float, and still quantized the other two
    graph = onnx.load(str(path)).graph
    dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    quantized = {n.name for n in graph.node if n.op_type == "MatMul" and any(i in dq_outputs for i in n.input)}
    assert quantized == {"/a/MatMul", "/c/MatMul"}
    assert any("only /b/MatMul" in t.description for t in trials)  # the sensitivity probes ran
    assert any("/b/MatMul" in p for p in chosen.exclude)


def test_a_node_kept_in_float_takes_its_weights_from_the_unrounded_graph(tmp_path):
    """With calibrated rounding the graph to quantize holds weights rounded for int8 inputs; a node the search keeps
    in float gets its own float weights back from the unrounded twin, and the search's ceiling is the twin."""
    model = planted_model(tmp_path / "planted.onnx")
    rounded = onnx.load(str(model))
    for t in rounded.graph.initializer:  # "rounded" weights: far from the float ones, so a mix-up shows
        if t.name in ("Wa", "Wb", "Wc"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * -1.0, t.name))
    onnx.save(rounded, tmp_path / "rounded.onnx")
    rng = np.random.default_rng(1)
    calibration = [{"x": rng.normal(size=(1, 64)).astype(np.float32)} for _ in range(16)]
    held_out = [rng.normal(size=(1, 64)).astype(np.float32) for _ in range(32)]
    reference = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    expected = np.concatenate([reference.run(None, {"x": x})[0] for x in held_out])

    def fidelity(path) -> float:  # against the float model: the negated weights score -1 wherever they are used
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = np.concatenate([sess.run(None, {"x": x})[0] for x in held_out])
        return float(np.mean(np.sum(got * expected, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))))

    config = StaticQdqInt8Config(op_types=["MatMul"], calibration_texts=16, search=True)
    path, chosen, trials = quantize_within_budget(tmp_path / "rounded.onnx", config, tmp_path, calibration, fidelity,
                                                  floor=0.5, float_source=model)
    reference_trial = next(t for t in trials if t.description.startswith("reference"))
    assert reference_trial.fidelity > 0.999  # measured on the twin, not on the rounded graph (-1)
    assert trials[-1].passed and chosen.exclude
    floats = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(model)).graph.initializer}
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    kept = {n: w for n, w in (("/a/MatMul", "Wa"), ("/b/MatMul", "Wb"), ("/c/MatMul", "Wc"))
            if any(re.search(p, n) for p in chosen.exclude)}
    assert 0 < len(kept) < 3
    for node, w in (("/a/MatMul", "Wa"), ("/b/MatMul", "Wb"), ("/c/MatMul", "Wc")):
        if node in kept:  # kept in float: its own float weights, not the rounded graph's
            np.testing.assert_array_equal(weights[w], floats[w])
        else:  # quantized, from the rounded graph: no float initializer of that name left
            assert w not in weights
    assert not list((tmp_path / "float-merged").iterdir())  # the merged inputs are not left behind
    # and they were not calibrated afresh: one set of activation ranges per calibration method the search tried
    methods = {t.config.get("calibration") for t in trials if t.config}
    assert len(list(tmp_path.glob(".calibration-*.json"))) == len(methods)


def test_groups_go_float_by_what_they_cost_per_byte_and_probes_rank_by_the_finer_error(tmp_path):
    """Two sensitive nodes, each enough to keep in float: the big one (64 x 256 weights) costs a little more
    fidelity quantized, the small one (64 x 8) far more per byte, so the small one goes float and the big one stays
    int8. The probes read `probe_error` (lower is better), not the fidelity, which here ties on every probe."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(64, 256)).astype(np.float32), "Wbig"),
             numpy_helper.from_array(rng.normal(size=(64, 8)).astype(np.float32), "Wsmall")]
    nodes = [helper.make_node("MatMul", ["x", "Wbig"], ["big"], name="/big/MatMul"),
             helper.make_node("MatMul", ["x", "Wsmall"], ["small"], name="/small/MatMul"),
             helper.make_node("Concat", ["big", "small"], ["out"], axis=1, name="/concat")]
    model = save_graph(tmp_path / "two.onnx", nodes, inits, [1, 64], [1, 264])
    calibration = [{"x": rng.normal(size=(1, 64)).astype(np.float32)} for _ in range(8)]

    def quantized(path) -> set[str]:
        graph = onnx.load(str(path)).graph
        dq = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
        return {n.name.split("/")[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in dq}  # int8 weights

    def fidelity(path) -> float:  # scripted: what each quantized node costs
        q = quantized(path)
        return 1.0 - 0.05 * ("big" in q) - 0.04 * ("small" in q)

    probed = []

    def error(path) -> float:
        probed.append(path)
        return 1.0 - fidelity(path)

    config = StaticQdqInt8Config(op_types=["MatMul"], calibration_texts=8, search=True)
    path, chosen, trials = quantize_within_budget(model, config, tmp_path, calibration, fidelity, floor=0.95,
                                                  probe_error=error)
    assert quantized(path) == {"big"} and trials[-1].passed and fidelity(path) == pytest.approx(0.95)
    probes = [t for t in trials if t.description.startswith("sensitivity probe (error)")]
    assert len(probes) == 2 and len(probed) == 3  # both probes and the unquantized reference read the error
    assert {round(t.fidelity, 4) for t in probes} == {0.05, 0.04}
    assert float_bytes(model, node_groups(model, ["MatMul"])) == {"/big/MatMul": 64 * 256 * 4, "/small/MatMul": 64 * 8 * 4}
    # ranked by fidelity lost alone, the big one would have gone float first (0.96, with 32x the float weights);
    # without probe_error the probes read the fidelity, and the order is still per byte
    (tmp_path / "fid").mkdir()
    without = quantize_within_budget(model, config, tmp_path / "fid", calibration, fidelity, floor=0.95)
    assert quantized(without[0]) == {"big"} and not any("(error)" in t.description for t in without[2])


def test_no_search_when_disabled_or_budget_met(tmp_path):
    model = planted_model(tmp_path / "planted.onnx")
    rng = np.random.default_rng(2)
    calibration = [{"x": rng.normal(size=(1, 64)).astype(np.float32)} for _ in range(8)]
    config = StaticQdqInt8Config(calibration_texts=8, search=False)
    _, _, trials = quantize_within_budget(model, config, tmp_path, calibration, lambda p: 0.5, floor=0.99)
    assert len(trials) == 1 and not trials[0].passed
    _, _, trials = quantize_within_budget(model, config.model_copy(update={"search": True}), tmp_path, calibration,
                                          lambda p: 1.0, floor=0.99)
    assert len(trials) == 1 and trials[0].passed


def test_search_stops_when_even_the_unquantized_graph_misses(tmp_path):
    model = planted_model(tmp_path / "planted.onnx")
    rng = np.random.default_rng(3)
    calibration = [{"x": rng.normal(size=(1, 64)).astype(np.float32)} for _ in range(8)]
    config = StaticQdqInt8Config(calibration_texts=8, search=True)
    _, _, trials = quantize_within_budget(model, config, tmp_path, calibration, lambda p: 0.5, floor=0.99)
    assert [t.description for t in trials] == ["as the profile says", "reference: the unquantized graph"]


def test_entropy_calibration_clips_what_minmax_keeps(tmp_path):
    """onnxruntime's quantize_static builds its entropy calibrator with as many histogram bins as quantized bins,
    which makes entropy equal minmax; ours calibrates with 2048 bins, so an outlier-dominated tensor gets clipped."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    from edgedistill.quantize import quantize

    model = planted_model(tmp_path / "planted.onnx")
    rng = np.random.default_rng(1)
    calibration = [{"x": rng.normal(size=(1, 64)).astype(np.float32)} for _ in range(16)]
    ranges = {}
    for method in ("minmax", "entropy"):
        quantize(model, StaticQdqInt8Config(op_types=["MatMul"], calibration=method), tmp_path / f"{method}.onnx",
                 calibration)
        [cache] = tmp_path.glob(f".calibration-planted-{method}-*.json")
        ranges[method] = load_tensors_data(cache).data
    lo_mm, hi_mm = (float(np.asarray(v).ravel()[0]) for v in ranges["minmax"]["xs"].range_value)
    lo_en, hi_en = (float(np.asarray(v).ravel()[0]) for v in ranges["entropy"]["xs"].range_value)
    assert hi_mm - lo_mm > 1000  # the 1e4 outlier
    assert hi_en - lo_en < (hi_mm - lo_mm) / 4, (lo_en, hi_en, lo_mm, hi_mm)


def ffn_model(path, spike_value=1e4):
    """out = ((x @ W1) * spike) @ W2 + b2: the spike gives the hidden layer a 1e4 outlier (GELU's long tail,
    exaggerated; W2 ignores it). 2-D, so onnxruntime's quantization pre-processing fuses the down MatMul+Add into a
    Gemm named '/down/MatMul/MatMulAddFusion'."""
    rng = np.random.default_rng(1)
    w1, w2 = rng.normal(size=(32, 64)).astype(np.float32), rng.normal(size=(64, 16)).astype(np.float32) / 8
    spike = np.ones(64, np.float32)
    spike[0] = spike_value
    w2[0, :] = 0.0
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (spike, "spike"), (w2, "W2"),
                                                         (np.zeros(16, np.float32), "b2"))]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"], name="/up/MatMul"),
             helper.make_node("Mul", ["h0", "spike"], ["h"], name="/act/Mul"),
             helper.make_node("MatMul", ["h", "W2"], ["o0"], name="/down/MatMul"),
             helper.make_node("Add", ["o0", "b2"], ["out"], name="/down/Add")]
    return save_graph(path, nodes, inits, [4, 32], [4, 16])


def test_weight_only_nodes_store_int8_weights_over_float_activations(tmp_path):
    from edgedistill.quantize import quantize

    model = ffn_model(tmp_path / "ffn.onnx")
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.normal(size=(4, 32)).astype(np.float32)} for _ in range(8)]
    ref = ort.InferenceSession(str(model)).run(None, feeds[0])[0]

    def run(cfg):
        out = quantize(model, cfg, tmp_path / f"q{len(list(tmp_path.iterdir()))}.onnx", feeds)
        graph = onnx.load(str(out)).graph
        return graph, ort.InferenceSession(str(out)).run(None, feeds[0])[0]

    def err(y):
        return float(np.abs(y - ref).max() / np.abs(ref).max())

    # both layers static int8: the spike's uint8 range wipes out the down-projection's input
    _, plain = run(StaticQdqInt8Config(op_types=["MatMul", "Gemm"], calibration_texts=8, search=False))
    # the fused Gemm is found by the MatMul's name it grew from; its weight int8 behind a DequantizeLinear (the
    # up-projection kept in float, so the error measured is the weight-only node's alone, 0.7%: the up-projection's
    # static int8 alone costs 5.9% on an AVX2 CPU without VNNI, whose u8s8 kernels sum pairs in 16 bits, and < 2%
    # on an AVX-512 VNNI one)
    graph, wo = run(StaticQdqInt8Config(op_types=["MatMul", "Gemm"], calibration_texts=8, search=False,
                                        weight_only=["^/down/MatMul$"], exclude=["^/up/MatMul$"]))
    down = next(n for n in graph.node if n.name == "/down/MatMul/MatMulAddFusion")
    producers = {o: n for n in graph.node for o in n.output}
    weight_dq = producers[down.input[1]]  # stored (N, K), so onnxruntime does not turn it into MatMulNBits
    assert weight_dq.op_type == "DequantizeLinear" and next(a.i for a in weight_dq.attribute if a.name == "axis") == 0
    assert next(a.i for a in down.attribute if a.name == "transB") == 1
    assert {t.name: t.data_type for t in graph.initializer}[weight_dq.input[0]] == TensorProto.INT8
    assert down.input[0] not in producers or producers[down.input[0]].op_type != "DequantizeLinear", "float input"
    assert "W2" not in {t.name for t in graph.initializer}, "the float weight is gone"
    assert err(wo) < 0.02 < err(plain), (err(wo), err(plain))
    # exclude (float weights too) also finds the fused node by its original name
    graph, _ = run(StaticQdqInt8Config(op_types=["MatMul", "Gemm"], calibration_texts=8, search=False,
                                       exclude=["^/down/MatMul$"]))
    down = next(n for n in graph.node if n.name == "/down/MatMul/MatMulAddFusion")
    assert down.input[1] == "W2"


def test_dynamic_nodes_quantize_their_input_on_each_call(tmp_path):
    """A node named in `dynamic` (here the Gemm that quantization's pre-processing fused, found by its MatMul's name)
    becomes DynamicQuantizeLinear -> MatMulInteger with int8 weights per channel, its float weight gone; the other
    layer stays static QDQ; the output stays within 2% of the float graph's."""
    from edgedistill.quantize import quantize

    model = ffn_model(tmp_path / "ffn.onnx", spike_value=3.0)
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.normal(size=(4, 32)).astype(np.float32)} for _ in range(8)]
    ref = ort.InferenceSession(str(model)).run(None, feeds[0])[0]
    # 7-bit weights: without VNNI onnxruntime's u8*s8 kernels saturate 8-bit ones (measured here on an AVX2 EPYC:
    # 18% off the float graph), and this test is about the graph, not the host's kernels
    out = quantize(model, StaticQdqInt8Config(op_types=["MatMul", "Gemm"], calibration_texts=8, search=False,
                                              dynamic=["^/down/MatMul$"], weight_only=["^/down/MatMul$"],
                                              reduce_range=True),
                   tmp_path / "dyn.onnx", feeds)
    graph = onnx.load(str(out)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("DynamicQuantizeLinear") == 1 and ops.count("MatMulInteger") == 1, ops
    assert "Gemm" not in ops  # written back as MatMul + Add for the dynamic quantizer
    integer = next(n for n in graph.node if n.op_type == "MatMulInteger")
    producers = {o: n for n in graph.node for o in n.output}
    assert producers[integer.input[0]].op_type == "DynamicQuantizeLinear"
    inits = {t.name: t for t in graph.initializer}
    assert inits[integer.input[1]].data_type == TensorProto.INT8
    assert not {"W2", "W2_kn"} & set(inits), "the float down-projection weight is gone"
    up = next(n for n in graph.node if n.name.startswith("/up/MatMul"))
    assert producers[up.input[0]].op_type == "DequantizeLinear", "the other layer is still static QDQ"
    y = ort.InferenceSession(str(out)).run(None, feeds[0])[0]
    assert float(np.abs(y - ref).max() / np.abs(ref).max()) < 0.02


def test_search_turns_failing_dynamic_nodes_weight_only_before_keeping_anything_float(tmp_path):
    """The planted node's spike also wipes out a range measured on each call: as dynamic it misses the budget, and
    the search's next step after calibration is that node as weight-only (int8 weights, float activations), which
    holds it; no group is kept in float."""
    model = planted_model(tmp_path / "planted.onnx")
    rng = np.random.default_rng(4)
    calibration = [{"x": rng.normal(size=(1, 64)).astype(np.float32)} for _ in range(8)]
    held_out = [rng.normal(size=(1, 64)).astype(np.float32) for _ in range(16)]
    expected = [ort.InferenceSession(str(model)).run(None, {"x": x})[0] for x in held_out]

    def fidelity(path) -> float:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = [sess.run(None, {"x": x})[0] for x in held_out]
        return float(np.mean([np.sum(g * e) / (np.linalg.norm(g) * np.linalg.norm(e)) for g, e in zip(got, expected)]))

    config = StaticQdqInt8Config(op_types=["MatMul"], calibration_texts=8, search=True, dynamic=["^/b/MatMul$"])
    path, chosen, trials = quantize_within_budget(model, config, tmp_path, calibration, fidelity, floor=0.99)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "trial0.onnx")).graph.node]
    assert "MatMulInteger" in ops and not trials[0].passed  # dynamic, and it misses
    assert trials[-1].description == "dynamic nodes weight-only (float activations)" and trials[-1].passed
    assert chosen.dynamic == [] and chosen.weight_only == ["^/b/MatMul$"] and chosen.exclude == []
    assert not any("probe" in t.description for t in trials)
    assert fidelity(path) >= 0.99


def test_weight_only_matmul_keeps_float_activations_in_onnxruntimes_optimized_graph(tmp_path):
    """onnxruntime turns DequantizeLinear(int8) -> MatMul into MatMulNBits with int8 activations; a weight-only
    MatMul is therefore written as a Gemm between Reshapes. 3-D input with free leading dims and a 1e4 outlier
    in the first feature (whose weight row is zero): the output stays within 1% of the float graph's."""
    from edgedistill.quantize.static_qdq import quantize_weights_only

    rng = np.random.default_rng(5)
    w = rng.normal(size=(64, 32)).astype(np.float32)
    w[0, :] = 0.0
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["out"], name="/m/MatMul")], "m",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 64])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "t", 32])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    quantize_weights_only(path, ["/m/MatMul"])
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert "MatMulNBits" not in {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    x = rng.normal(size=(2, 5, 64)).astype(np.float32)
    x[..., 0] = 1e4
    y, ref = session.run(None, {"x": x})[0], x @ w
    assert y.shape == (2, 5, 32) and float(np.abs(y - ref).max() / np.abs(ref).max()) < 0.01


def test_entropy_thresholds_equal_onnxruntimes_own():
    """Our entropy threshold search (without onnxruntime's per-bin Python loops) picks exactly onnxruntime's
    thresholds: on skewed, sparse and outlier-heavy integer histograms, at TensorRT's and at onnxruntime's bins."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    from edgedistill.quantize.static_qdq import entropy_threshold

    rng = np.random.default_rng(7)
    cases = []
    for bins, quantized in ((512, 128), (1024, 256), (256, 128)):
        x = np.concatenate([rng.normal(0.3, 1.0, 20000), rng.standard_cauchy(300)])
        cases.append((x, bins, quantized))
        relu = np.maximum(rng.normal(0.0, 2.0, 5000), 0)  # half the mass in one bin, the rest one-sided
        cases.append((relu, bins, quantized))
        sparse = rng.choice([-3.0, -0.1, 0.0, 0.2, 5.0], 400)  # most bins empty
        cases.append((sparse, bins, quantized))
    for x, bins, quantized in cases:
        hist, edges = np.histogram(x, bins=bins, range=(-np.abs(x).max(), np.abs(x).max()))
        edges = edges.astype(np.float32)
        histogram = (hist, edges, np.float32(x.min()), np.float32(x.max()))
        ours = entropy_threshold(histogram, quantized)
        theirs = HistogramCollector.get_entropy_threshold(None, histogram, quantized)
        assert (float(ours[0]), float(ours[1])) == (float(theirs[0]), float(theirs[1]))
        assert hasattr(ours[0], "dtype") and hasattr(ours[1], "dtype")
