"""ONNX Runtime runs every exported zoo architecture like ``qcompile.quantize`` does.

Each case exports a quantized zoo model (captured at batch 2 x 16 tokens) and runs the
ONNX file in ONNX Runtime's CPU provider at batch 3 x 11 tokens (ViT: batch 3), so the
dynamic axes are exercised. Session: ``qcompile.export.EXACT_CONFIG``
(``session.qdq_matmulnbits_accuracy_level = "0"``: ONNX Runtime may not quantize
activations when it fuses DequantizeLinear + MatMul), default optimization level; the
"ort" exports carry no ``accuracy_level`` attribute (0: activations unquantized).
The presets that need calibration (w4a16-awq, w8a8, w8a8-static, fp8) are calibrated on
the architecture's other inputs at seeds 0 and 2 (``helpers.calibration_batches``); the
checks run seed 1.

Checked against (tolerances and their reasons in ``tests/export/helpers.py``):
* weight-only presets (w8a16, w4a16, w4a16-awq): the float32 reference path of the
  qcompile ops — EXACT_RTOL (1e-5); ``qm(...)`` itself, whose CPU fast paths compute in
  bfloat16 — BF16_RTOL (2e-2);
* activation-quantized presets (w8a8, w8a8-static, fp8): ONNX Runtime's float ops round
  differently from torch's, and an activation code that lands on the other side of a
  rounding boundary changes its sample's outputs, amplified by the later layers. So: at
  least one sample of the batch matches the float32 reference within EXACT_RTOL (an error
  of the export moves them all), and every output is within ACT_QUANT_REL_NORM (2e-2 int8,
  5e-2 fp8) of the float32 reference and of ``qm(...)`` in relative error norm (these ops'
  CPU paths are their references: the same values).

Coverage: every core architecture (``zoo.ARCHITECTURES``) for (w4a16, "ort") (``make test``
runs one of each structural kind, FAST_W4A16_ARCHITECTURES; ``make test-all`` every one); every
architecture of the wider zoo (``zoo.EXTENDED``) for (w8a16, "ort") in
tests/models/test_zoo_*.py, next to its other tests (``check_parity`` below; the translations
do not depend on the bit width, which the core zoo covers in every flavor); one of each
structural kind for (w8a8, "ort") (W8A8_ARCHITECTURES); one architecture for
each other weight-only (preset, flavor) pair, chosen so that odd sizes are covered (llama's
K=192 and opt's K=200 fall back to per-channel 4-bit groups: per-axis UINT4 in "qdq");
every calibrated preset in every flavor on one of bert (encoder: GELU, LayerNorm, pooler)
or llama (decoder with a KV cache: RMSNorm, gated SiLU MLP, K=192), the presets
themselves, smoothing search included (a fixed alpha saves < 1 s of CPU per model here:
capture and export dominate), except fp8 in "qdq", whose refusal is checked instead. Each
smoothing case smooths some layers, folded into the weights and online (the ``smooth``
argument of the w8a8 / fp8 ops, an explicit multiply in front of w4a16), so both are
exported.
Layouts of every kind (odd block counts, padded blocks, replicated scales) are tested
exhaustively and cheaply in ``test_layouts.py``; every translated op, in every variant,
against the torch op in ``test_activation_quant_export.py``.
Structure: the graph has one target op per quantized linear, every int8 / fp8 linear reads
activation codes quantized in the graph, and no float copy of a quantized weight is left.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch

import qcompile
from qcompile.errors import ExportError
from qcompile.export import EXACT_CONFIG, FLAVORS, TRANSLATIONS, inference_session, onnx_feeds, to_onnx
from qcompile.graph_utils import SMOOTHING_META
from qcompile.kernels import ACTIVATION_QUANT_LINEAR_OPS, WEIGHT_ONLY_LINEAR_OPS
from tests.export.helpers import (
    u8s8_gemm_xfail,
    ACT_QUANT_REL_NORM,
    BF16_RTOL,
    EXACT_RTOL,
    float32_reference,
    quantized_outputs,
    sample_errors,
    worst_relative_error,
    worst_relative_norm_error,
)
from tests.export.test_w4ax_export import ZOO_CASES as W4AX_ZOO_CASES
from tests.models import zoo

ALL_ARCHITECTURES = list(zoo.ARCHITECTURES)
# (w8a8, "ort") on one architecture of each structural kind (each export costs ~7 s; w4a16
# "ort" stays on all of them): RMSNorm + gated MLP + GQA (llama), odd head_dim (gemma), fused
# qkv / gate_up (phi3), Conv1D weights (gpt2), parallel residual (gpt_neox), post-LN encoder
# with a pooler (bert), vision patches (vit). The others (qwen2, qwen3, mistral: llama's
# structure; opt: gpt2's LayerNorm / ReLU MLP; roberta: bert's) add no new translation.
W8A8_ARCHITECTURES = ["llama", "gemma", "phi3", "gpt2", "gpt_neox", "bert", "vit"]
# One architecture per other (preset, flavor) pair (each export costs seconds): w4a16 on
# models already quantized above, w8a16 on the two fastest.
OTHER_CASES = [
    ("bert", "w8a16", "ort"),
    ("vit", "w8a16", "qdq"),
    ("bert", "w8a16", "qcompile"),
    ("llama", "w4a16", "qdq"),
    ("opt", "w4a16", "qcompile"),
]
# The presets that need calibration: each one in every flavor on one of two architectures,
# bert (encoder: GELU, LayerNorm, pooler) or llama (decoder with a KV cache: RMSNorm, gated
# SiLU MLP, K=192), alternating so that both carry every kind of linear ((w8a8, "ort") is
# tested on W8A8_ARCHITECTURES). One architecture per preset keeps the suite short: the
# translations of every op variant are tested op by op in test_activation_quant_export.py.
CALIBRATED_ARCHITECTURE = {"w4a16-awq": "llama", "w8a8": "bert", "w8a8-static": "llama", "fp8": "bert",
                           "w4a16-gptq": "bert", "auto": "llama"}
CALIBRATED_PRESETS = tuple(CALIBRATED_ARCHITECTURE)
# (preset, flavor) pairs qcompile.export refuses; the refusal is tested instead.
REFUSED = {("fp8", "qdq")}
CALIBRATED_CASES = [
    (arch, preset, flavor)
    for preset, arch in CALIBRATED_ARCHITECTURE.items()
    for flavor in FLAVORS
    if (preset, flavor) not in REFUSED and (preset, flavor) != ("w8a8", "ort")
]
# preset -> the (kind, static) its quantized linears may have on the zoo models ("auto" mixes
# 3/4-bit and 8-bit weight-only linears, chosen per layer)
_PRESET_LINEARS = {"w4a16-awq": {("w4", False)}, "w8a8": {("int8", False)}, "w8a8-static": {("int8", True)},
                   "fp8": {("fp8", False)}, "w4a16-gptq": {("w4", False)}, "auto": {("w4", False), ("w8", False)}}

_QUANTIZED_DTYPES = {onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
                     onnx.TensorProto.FLOAT8E4M3FN}
_FLOAT_DTYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class _Linear:
    kind: str  # "w8" / "w4" (weight-only), "int8" / "fp8" (activation-quantized)
    n: int
    k: int
    static: bool = False  # int8 activations with a static (calibrated) per-tensor scale


def _quantized_linears(qm) -> list[_Linear]:
    """Every quantized linear of the quantized torch graph."""
    gm = qm.graph_module
    weight_only = {op: f"w{bits}" for bits, op in WEIGHT_ONLY_LINEAR_OPS.items()}
    act_quant = {op: fmt for fmt, op in ACTIVATION_QUANT_LINEAR_OPS.items()}
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in weight_only:
            scales = node.args[2].meta["val"]
            n, k = int(scales.shape[0]), int(scales.shape[1]) * int(node.args[5])
            out.append(_Linear(weight_only[node.target], n, k))
        elif node.target in act_quant:
            n, k = node.args[1].meta["val"].shape
            act_scale = node.args[5] if len(node.args) > 5 else node.kwargs.get("act_scale")
            out.append(_Linear(act_quant[node.target], int(n), int(k), act_scale is not None))
    return out


def _float_constant_shapes(qm) -> Counter:
    """Shapes of the 2-D floating-point constants the quantized torch graph still reads."""
    gm = qm.graph_module
    shapes = Counter()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users:
            t = getattr(gm, node.target)
            if t.is_floating_point() and t.dim() == 2:
                shapes[tuple(t.shape)] += 1
    return shapes


class _Producers:
    """What produces each tensor of an ONNX graph, looking through reshapes."""

    RESHAPES = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}

    def __init__(self, model: onnx.ModelProto) -> None:
        self.nodes = {out: node for node in model.graph.node for out in node.output}
        self.inits = {t.name: t for t in model.graph.initializer}

    def _through_reshapes(self, name: str) -> str:
        while name in self.nodes and self.nodes[name].op_type in self.RESHAPES:
            name = self.nodes[name].input[0]
        return name

    def node(self, name: str) -> onnx.NodeProto | None:
        """The node that produces ``name`` (None for an initializer or a graph input)."""
        return self.nodes.get(self._through_reshapes(name))

    def source(self, name: str) -> str:
        """An op type, "initializer:<DTYPE>" or "input"."""
        name = self._through_reshapes(name)
        if name in self.inits:
            return "initializer:" + onnx.TensorProto.DataType.Name(self.inits[name].data_type)
        return self.nodes[name].op_type if name in self.nodes else "input"


def _casts_to_e4m3(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type == "Cast"
               and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT8E4M3FN for a in n.attribute))


def _int8_qdq_matmuls(model: onnx.ModelProto) -> int:
    """MatMuls of DequantizeLinear(QuantizeLinear(activation)) by DequantizeLinear(int8 weight)."""
    producers = _Producers(model)
    count = 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or not all(producers.source(i) == "DequantizeLinear" for i in node.input):
            continue
        dequantized = sorted(producers.source(producers.node(i).input[0]) for i in node.input)
        count += dequantized == ["QuantizeLinear", "initializer:INT8"]
    return count


def assert_structure(qm, result, flavor: str) -> None:
    model = onnx.load(str(result.path))
    linears = _quantized_linears(qm)
    kinds = Counter(linear.kind for linear in linears)
    n_weight_only, n_int8, n_fp8 = kinds["w8"] + kinds["w4"], kinds["int8"], kinds["fp8"]
    n_static = sum(linear.static for linear in linears)
    nodes = list(model.graph.node)
    ops = Counter((n.domain or "ai.onnx", n.op_type) for n in nodes)
    inits = list(model.graph.initializer)
    producers = _Producers(model)
    assert len(linears) > 0
    assert result.notes == [], result.notes  # no layer of the zoo needs the DequantizeLinear fallback
    if flavor == "ort":
        assert ops[("com.microsoft", "MatMulNBits")] == n_weight_only
        assert ops[("ai.onnx", "DequantizeLinear")] == 0
        int8 = [n for n in nodes if n.op_type == "MatMulIntegerToFloat"]
        assert len(int8) == n_int8
        # Activation codes quantized in the graph; int8 weights stored as initializers.
        assert all(producers.source(n.input[0]) == "QuantizeLinear" for n in int8)
        assert all(producers.source(n.input[1]) == "initializer:INT8" for n in int8)
        # fp8: e4m3fn weights; activation codes by a Cast to e4m3fn, one per activation the
        # linears read (ONNX's optimizer merges equal ones).
        e4m3_weights = sum(1 for t in inits if t.data_type == onnx.TensorProto.FLOAT8E4M3FN and len(t.dims) == 2)
        assert e4m3_weights == n_fp8
        assert (1 <= _casts_to_e4m3(model) <= n_fp8) if n_fp8 else _casts_to_e4m3(model) == 0
    elif flavor == "qdq":
        assert {d for d, _ in ops} == {"ai.onnx"}
        weight_dq = [n for n in nodes if n.op_type == "DequantizeLinear"
                     and producers.source(n.input[0]).startswith("initializer:")]
        assert len(weight_dq) == n_weight_only + n_int8
        assert _int8_qdq_matmuls(model) == n_int8
        if n_int8 == 0:
            assert ops[("ai.onnx", "DequantizeLinear")] == n_weight_only
        assert n_fp8 == 0  # refused in this flavor
    else:
        domain_ops = Counter({op: n for (d, op), n in ops.items() if d == "qcompile"})
        expected = Counter({"LinearW8A16": kinds["w8"], "LinearW4A16": kinds["w4"], "LinearW8A8": n_int8 - n_static,
                            "LinearW8A8Static": n_static, "LinearFP8": n_fp8})
        assert domain_ops == +expected, (domain_ops, expected)
        assert {f"{f.domain}.{f.name}" for f in model.functions} == {
            f"qcompile.{op}" for (d, op) in ops if d == "qcompile"
        }
        assert ops[("com.microsoft", "MatMulNBits")] == 0 and ops[("com.microsoft", "MatMulIntegerToFloat")] == 0
    # Integer (or e4m3fn) weights are there, and no float copy of a quantized weight is
    # left: every 2-D float initializer shaped like a quantized weight ([N, K] or [K, N])
    # corresponds to a float constant the torch graph itself still reads (a tied embedding, say).
    assert sum(1 for t in inits if t.data_type in _QUANTIZED_DTYPES and len(t.dims) >= 2) >= len(linears)
    float_shapes = Counter(tuple(t.dims) for t in inits if t.data_type in _FLOAT_DTYPES and len(t.dims) == 2)
    torch_float = _float_constant_shapes(qm)
    for n, k in {(linear.n, linear.k) for linear in linears}:
        in_onnx = float_shapes[(n, k)] + (float_shapes[(k, n)] if n != k else 0)
        in_torch = torch_float[(n, k)] + (torch_float[(k, n)] if n != k else 0)
        assert in_onnx <= in_torch, f"a float weight of shape [{n}, {k}] was left for a quantized linear"


def check_parity(exported_zoo, arch: str, preset: str, flavor: str) -> None:
    qm, result = exported_zoo(arch, preset, flavor)
    entry = zoo.ALL_ARCHITECTURES[arch]
    args, kwargs = entry.other_inputs(1)
    session = inference_session(result.path)
    # Dynamic axes: named, and another batch (and sequence length) than the export example.
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert all(shape[0] == "batch" for shape in shapes.values()), shapes
    if "input_ids" in shapes:
        assert shapes["input_ids"] == ["batch", "sequence"]
    outputs = session.run(None, onnx_feeds(qm, args, kwargs))
    mask = kwargs.get("attention_mask")
    names = result.output_names
    case = f"{arch} {preset} {flavor}"
    formats = sorted({linear.kind for linear in _quantized_linears(qm)} & set(ACT_QUANT_REL_NORM))
    if formats:
        # An activation code may flip where ONNX Runtime's float ops round differently from
        # torch's; that changes its own sample only (helpers.py: ACT_QUANT_REL_NORM).
        reference = float32_reference(qm)(args, kwargs)
        samples = sample_errors(outputs, reference, names, mask)
        per_sample = ", ".join(f"{err:.2e} ({where})" for err, where in samples)
        assert min(err for err, _ in samples) < EXACT_RTOL, (
            f"{case}: every sample differs from the float32 reference by more than {EXACT_RTOL:g} (worst "
            f"per sample: {per_sample}): an error of the export, not an activation code flipped by rounding")
        bound = max(ACT_QUANT_REL_NORM[f] for f in formats)
        for expected, what in ((reference, "the float32 reference"), (quantized_outputs(qm, args, kwargs), "qm(...)")):
            err, where = worst_relative_norm_error(outputs, expected, names, mask)
            assert err < bound, (f"{case}: {where} differs from {what} by {err:.2e} in relative norm (bound {bound:g} "
                                 f"for {'/'.join(formats)} activations; worst per sample: {per_sample})")
    else:
        err, where = worst_relative_error(outputs, float32_reference(qm)(args, kwargs), names, mask)
        assert err < EXACT_RTOL, f"{case}: {where} differs from the float32 reference by {err:.2e}"
        err, where = worst_relative_error(outputs, quantized_outputs(qm, args, kwargs), names, mask)
        assert err < BF16_RTOL, f"{case}: {where} differs from qm(...) by {err:.2e}"
    assert_structure(qm, result, flavor)


def _smoothed_layers(qm) -> list[str]:
    return [row["layer"] for row in qm.report().layers if str(row.get("smoothing", "")).startswith("alpha")]


def _online_smoothing(qm) -> int:
    """Places where an activation is divided by its smoothing vector at run time: the
    ``smooth`` argument of a w8a8 / fp8 op, or an explicit multiply (16-bit activations)."""
    act_quant = set(ACTIVATION_QUANT_LINEAR_OPS.values())
    return sum(1 for node in qm.graph_module.graph.nodes
               if SMOOTHING_META in node.meta
               or (node.op == "call_function" and node.target in act_quant and node.args[4] is not None))


# One architecture per structural kind in `make test`, every core architecture in `make test-all`
# (about 25 s each here: the ONNX export dominates).
FAST_W4A16_ARCHITECTURES = ("llama", "gemma", "gpt2", "opt", "bert", "vit")


@pytest.mark.parametrize("arch", [a if a in FAST_W4A16_ARCHITECTURES else pytest.param(a, marks=pytest.mark.slow)
                                  for a in ALL_ARCHITECTURES])
def test_ort_flavor_w4a16_matches_quantized_model(exported_zoo, arch):
    check_parity(exported_zoo, arch, "w4a16", "ort")


@pytest.mark.parametrize("arch,preset,flavor", OTHER_CASES)
def test_other_flavors_and_presets_match_quantized_model(exported_zoo, arch, preset, flavor):
    check_parity(exported_zoo, arch, preset, flavor)


@u8s8_gemm_xfail()
@pytest.mark.parametrize("arch", W8A8_ARCHITECTURES)
def test_ort_flavor_w8a8_matches_quantized_model(exported_zoo, arch):
    check_parity(exported_zoo, arch, "w8a8", "ort")


# The calibrated cases whose files run ONNX Runtime's uint8 x int8 GEMM (measured: the others
# compute those products in float32 or not at all), expected to fail where it saturates.
U8S8_GEMM_CASES = {("bert", "w8a8", "qcompile"), ("llama", "w8a8-static", "ort"), ("llama", "w8a8-static", "qdq"),
                   ("llama", "w8a8-static", "qcompile")}


@pytest.mark.parametrize("arch,preset,flavor", [
    pytest.param(*case, marks=[u8s8_gemm_xfail()] if case in U8S8_GEMM_CASES else []) for case in CALIBRATED_CASES
])
def test_calibrated_presets_match_quantized_model(exported_zoo, quantized_zoo, arch, preset, flavor):
    # The case covers what it claims: the preset's kind of linear, smoothing folded into
    # the weights, and smoothing applied at run time (measured: 1 to 10 places per case).
    qm = quantized_zoo(arch, preset)
    kinds = {(linear.kind, linear.static) for linear in _quantized_linears(qm)}
    assert kinds and kinds <= _PRESET_LINEARS[preset], (arch, preset, kinds)
    smooths = qcompile.resolve_recipe(preset).smooth != "off"
    assert not smooths or (_smoothed_layers(qm) and _online_smoothing(qm)), (
        f"{arch} {preset}: the recipe smoothed no layer, or none online; this case no longer covers the export of "
        "smoothing: choose another architecture in CALIBRATED_ARCHITECTURE")
    check_parity(exported_zoo, arch, preset, flavor)


def test_qdq_flavor_refuses_fp8_models(quantized_zoo, tmp_path):
    qm = quantized_zoo(CALIBRATED_ARCHITECTURE["fp8"], "fp8")
    n_fp8 = sum(linear.kind == "fp8" for linear in _quantized_linears(qm))
    assert n_fp8 > 3
    with pytest.raises(ExportError) as info:
        to_onnx(qm, tmp_path / "m.onnx", flavor="qdq")
    message = str(info.value)
    assert "qcompile::linear_fp8" in message and "flavor 'qdq'" in message
    assert f"and {n_fp8 - 3} more" in message  # names the nodes
    assert "flavors that support it: ort, qcompile" in message
    assert list(tmp_path.iterdir()) == []


def test_every_preset_and_flavor_is_covered():
    """Every landed preset in every flavor: a parity case, or a tested refusal."""
    cases = {(p, f) for _, p, f in OTHER_CASES + CALIBRATED_CASES} | {("w4a16", "ort"), ("w8a8", "ort")}
    # the rotated 4-bit-weight presets, every flavor, in test_w4ax_export.py
    cases |= {(p, f) for p in W4AX_ZOO_CASES for f in FLAVORS}
    assert cases == {(p, f) for p in qcompile.PRESETS for f in FLAVORS} - REFUSED
    assert set(CALIBRATED_PRESETS) | set(W4AX_ZOO_CASES) == {
        p for p in qcompile.PRESETS if qcompile.resolve_recipe(p).needs_calibration}
    # The refused pairs are the ones the translation table refuses.
    fp8_refused = set(TRANSLATIONS.refusals(torch.ops.qcompile.linear_fp8.default))
    assert REFUSED == {(p, f) for p in qcompile.PRESETS for f in fp8_refused
                       if qcompile.resolve_recipe(p).weight_format == "fp8"}


def test_batch_one_and_short_sequence(exported_zoo):
    """Size-oblivious export: batch 1 and 5 tokens run too (no 0/1 specialization)."""
    qm, result = exported_zoo("bert", "w4a16", "ort")
    _, kwargs = zoo.ARCHITECTURES["bert"].other_inputs(1)
    kwargs = {k: v[:1, :5].contiguous() for k, v in kwargs.items()}
    outputs = inference_session(result.path).run(None, onnx_feeds(qm, (), kwargs))
    err, where = worst_relative_error(outputs, float32_reference(qm)((), kwargs), result.output_names)
    assert outputs[0].shape == (1, 5, 128)
    assert err < EXACT_RTOL, f"{where}: {err:.2e}"


def test_parity_session_config_is_the_exact_one():
    """The parity tests' numerics depend on this setting; keep it visible."""
    assert dict(EXACT_CONFIG) == {"session.qdq_matmulnbits_accuracy_level": "0"}


def _cuda_provider() -> bool:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    return session.get_providers()[0] == "CUDAExecutionProvider"


@pytest.mark.parametrize("arch,preset,flavor", [("llama", "w4a16", "ort"), ("bert", "w8a16", "ort"),
                                                ("llama", "w4a16", "qdq"), ("bert", "w8a16", "qcompile")])
def test_cuda_provider_matches_quantized_model(exported_zoo, arch, preset, flavor):
    """With a working CUDAExecutionProvider (onnxruntime-gpu and a GPU), the same files run
    there. Tolerance 1e-2: the CUDA kernels may compute float32 matmuls in TF32 (10-bit
    mantissa, ~5e-4 per product sum)."""
    if not _cuda_provider():
        pytest.skip("onnxruntime has no working CUDAExecutionProvider here")
    qm, result = exported_zoo(arch, preset, flavor)
    args, kwargs = zoo.ARCHITECTURES[arch].other_inputs(1)
    session = inference_session(result.path, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    outputs = session.run(None, onnx_feeds(qm, args, kwargs))
    err, where = worst_relative_error(outputs, float32_reference(qm)(args, kwargs), result.output_names,
                                      kwargs.get("attention_mask"))
    assert np.isfinite(err) and err < 1e-2, f"{where}: {err:.2e}"
