"""ONNX export of ``qcompile::linear_w4a8`` / ``qcompile::linear_w4a4`` in every flavor, run
in ONNX Runtime's CPU provider against the torch ops themselves.

The model (:class:`W4AXModel`) calls both ops in every weight layout the translations
distinguish, on two inputs: x ``[..., 384]`` — per-channel (three MatMulNBits blocks of
128), groups of 32 and 128 (a block per group), 96 (blocks of 32 repeating their group's
scale) — and x2 ``[..., 80]`` — per-channel (one block of 128, padded), groups of 16 and 40
(no MatMulNBits block size divides 40: DequantizeLinear fallback in "ort"); symmetric
(zeros None, or explicit zero points 8) and asymmetric weights, with and without bias and
smoothing. N = 19. Weights, bias, smoothing and inputs are drawn fresh on every run (the
seed is in every failure message). Captured at ``[2, 3, K]`` with dynamic batch and
sequence axes, run at M = 1, 3, 17 and 18 rows, one row all zero (the zero-scale guard)
where there are several.

Tolerances and their reasons (u = 2**-24):

* "qcompile" flavor: bit-identical to the torch op. The function body accumulates each
  group in int32 (MatMulInteger), applies the group scales and sums the groups from first
  to last (ReduceSum), then the per-token scale and the bias: the op's float32 epilogue in
  its order.
* "ort" flavor, per-channel weights: bit-identical too (MatMulNBits with unit scales sums
  integers, exact in float32; see :mod:`qcompile.export.linear_w4ax`).
* "ort" with groups, its DequantizeLinear fallback, and "qdq": the product is a float32
  GEMM of dequantized operands, whose result differs from the exact sum by at most
  ``(K + 2) u T`` (T = ``xscale * Σ_k |a_k| |w_k|``, from a row's codes a and the
  dequantized weight w, computed in float64; standard bound of a float32 dot product plus
  the rounding of each dequantized weight, and for "qdq" of each ``a_k * xscale``); the
  torch op's epilogue rounds each of its G group terms and their sums (``(G + 1) u T``),
  then the per-token scale and the bias add a rounding each (``2 u |y|``). Hence
  ``|onnx - torch| <= (K + G + 4) u T + 4 u |torch|``. The codes and scales are the torch
  op's exactly in every flavor (bit-identical "qcompile" outputs check it).

Also: the structure of each flavor's graph (op counts, weights stored as 4-bit, no float
copy of a weight), float16 activations, and the zoo's bert (w4a8) and llama (w4a4) with
their presets (Hadamard rotations + GPTQ) in every flavor, compared as test_parity.py
compares activation-quantized presets (helpers.py: ACT_QUANT_REL_NORM, "int4" bound).
"""
from __future__ import annotations

import secrets
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch

import qcompile
from qcompile.act_quant import quantize_activation_per_token
from qcompile.errors import ExportError
from qcompile.export import FLAVORS, TRANSLATIONS, inference_session, onnx_feeds, to_onnx
from qcompile.kernels import W4_ACT_QUANT_LINEAR_OPS
from qcompile.quantizers import QuantizedWeight, dequantize_weight, quantize_weight_rtn
from tests.export.helpers import (
    ACT_QUANT_REL_NORM,
    EXACT_RTOL,
    float32_reference,
    quantized_outputs,
    sample_errors,
    worst_relative_norm_error,
)
from tests.models import zoo

U32 = 2.0**-24
FLOAT16_ULP = 2.0**-10
N = 19
K1, K2 = 384, 80
CAPTURE_LEADING = (2, 3)
RUN_LEADING = [(1, 1), (1, 3), (17, 1), (2, 9)]


@dataclass(frozen=True)
class Variant:
    name: str
    k: int  # which input: K1 (x) or K2 (x2)
    group_size: int  # == k: per-channel
    symmetric: bool
    zeros_none: bool = False  # symmetric weights passed with zeros=None (the op's default 8)
    bias: bool = False
    smooth: bool = False
    fallback: bool = False  # no MatMulNBits block size for the group: DequantizeLinear in "ort"

    @property
    def groups(self) -> int:
        return self.k // self.group_size


VARIANTS = (
    Variant("pc_asym_bias_smooth", K1, K1, False, bias=True, smooth=True),
    Variant("pc_sym_none", K1, K1, True, zeros_none=True),
    Variant("g32_asym_smooth", K1, 32, False, smooth=True),
    Variant("g32_sym_bias", K1, 32, True, bias=True),
    Variant("g128_asym_bias", K1, 128, False, bias=True),
    Variant("g128_sym_none_smooth_bias", K1, 128, True, zeros_none=True, bias=True, smooth=True),
    Variant("g96_asym", K1, 96, False),
    Variant("pc80_asym_bias", K2, K2, False, bias=True),
    Variant("g16_asym_smooth", K2, 16, False, smooth=True),
    Variant("g40_sym_bias", K2, 40, True, bias=True, fallback=True),
)
ACT_BITS = (8, 4)
CASES = [(bits, v) for bits in ACT_BITS for v in VARIANTS]  # the model's outputs, in order


class W4AXModel(torch.nn.Module):
    """``linear_w4a8`` then ``linear_w4a4`` on every variant (see the module docstring)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        for k in (K1, K2):
            self.register_buffer(f"smooth_{k}", torch.rand(k, generator=gen) * 1.5 + 0.5)
        for i, v in enumerate(VARIANTS):
            w = torch.randn(N, v.k, generator=gen) / v.k**0.5
            w = w + 0.3 * torch.rand(N, 1, generator=gen) / v.k**0.5  # off-centre rows: asymmetric zero points vary
            qw = quantize_weight_rtn(w, 4, v.group_size if v.group_size != v.k else None, v.symmetric)
            self.register_buffer(f"qweight_{i}", qw.qweight)
            self.register_buffer(f"scales_{i}", qw.scales)
            bias = torch.randn(N, generator=gen)
            optional = {f"zeros_{i}": None if v.zeros_none else qw.zeros, f"bias_{i}": bias if v.bias else None}
            for name, t in optional.items():
                if t is None:
                    setattr(self, name, None)  # a None buffer breaks torch.export
                else:
                    self.register_buffer(name, t)

    def arguments(self, i: int):
        v = VARIANTS[i]
        return (getattr(self, f"qweight_{i}"), getattr(self, f"scales_{i}"), getattr(self, f"zeros_{i}"),
                getattr(self, f"bias_{i}"), getattr(self, f"smooth_{v.k}") if v.smooth else None, v.group_size)

    def forward(self, x: torch.Tensor, x2: torch.Tensor):
        out = []
        for bits in ACT_BITS:
            op = W4_ACT_QUANT_LINEAR_OPS[bits]
            out += [op(x if v.k == K1 else x2, *self.arguments(i)) for i, v in enumerate(VARIANTS)]
        return tuple(out)


@pytest.fixture(scope="module")
def seed() -> int:
    return secrets.randbits(31)


def _inputs(leading, gen: torch.Generator, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different magnitudes; the first row all zero when there are several."""
    out = []
    for k in (K1, K2):
        x = torch.randn(*leading, k, generator=gen) * torch.exp(torch.randn(*leading, 1, generator=gen))
        if x.numel() > k:
            x.view(-1, k)[0] = 0.0
        out.append(x.to(dtype))
    return tuple(out)


def _quantize(module: W4AXModel, dtype=torch.float32):
    example = _inputs(CAPTURE_LEADING, torch.Generator().manual_seed(0), dtype)
    return qcompile.quantize(module, example, recipe="w8a16", progress=False, verify=False)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, seed):
    """flavor -> (module, QuantizedModel, OnnxExport)."""
    folder = tmp_path_factory.mktemp("w4ax_onnx")
    module = W4AXModel(seed)
    qm = _quantize(module)
    return {flavor: (module, qm, to_onnx(qm, folder / f"w4ax_{flavor}.onnx", flavor=flavor)) for flavor in FLAVORS}


def _exact(flavor: str, v: Variant) -> bool:
    """Whether the flavor computes the variant bit-identically to the torch op."""
    return flavor == "qcompile" or (flavor == "ort" and v.groups == 1)


def _bound(arguments, bits: int, x: torch.Tensor, expected: np.ndarray) -> np.ndarray:
    """The allowance of the float32-GEMM flavors (module docstring) for the op's
    ``arguments`` (qweight, scales, zeros, bias, smooth, group_size) on x."""
    qweight, scales, zeros, _, smooth, group_size = arguments
    k = x.shape[-1]
    qw = QuantizedWeight(qweight, scales, zeros, 4, group_size, k, qweight.shape[0], zeros is None)
    codes, xscales = quantize_activation_per_token(x.reshape(-1, k), smooth, bits, "int")
    mass = (codes.double().abs() @ dequantize_weight(qw, torch.float64).abs().T) * xscales.double()
    mass = mass.reshape(*x.shape[:-1], -1).numpy()
    return (k + k // group_size + 4) * U32 * mass + 4 * U32 * np.abs(expected.astype(np.float64))


def _check(module, flavor: str, xs, got, expected, context: str) -> dict[str, float]:
    """Assert the outputs; return the worst |onnx - torch| / allowance per inexact case."""
    assert len(got) == len(expected) == len(CASES)
    ratios = {}
    for (bits, v), g, e in zip(CASES, got, expected):
        name = f"w4a{bits}_{v.name}"
        e = e.numpy()
        assert g.dtype == e.dtype and g.shape == e.shape, (name, g.dtype, g.shape, context)
        if _exact(flavor, v) and e.dtype == np.float32:
            np.testing.assert_array_equal(g, e, err_msg=f"{name} ({context})")
            continue
        x = xs[0] if v.k == K1 else xs[1]
        allowed = _bound(module.arguments(VARIANTS.index(v)), bits, x.float(), e)
        if e.dtype == np.float16:  # float32 results an ulp apart can round to float16 values an ulp apart
            allowed = allowed + FLOAT16_ULP * np.abs(e.astype(np.float64))
        diff = np.abs(g.astype(np.float64) - e.astype(np.float64))
        worst = np.unravel_index(np.argmax(diff - allowed), diff.shape)
        assert (diff <= allowed).all(), (
            f"{name}: |onnx - torch| = {diff[worst]:.3e} > {allowed[worst]:.3e} at {worst} ({context})")
        ratios[name] = float((diff / np.maximum(allowed, 1e-300)).max())
    return ratios


@pytest.mark.parametrize("flavor", FLAVORS)
def test_parity_with_the_torch_ops(exports, seed, flavor):
    module, qm, result = exports[flavor]
    onnx.checker.check_model(str(result.path), full_check=True)
    session = inference_session(result.path)
    inputs = onnx.load(str(result.path)).graph.input
    assert [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in inputs] == [
        ["batch", "x_dim1", K1], ["batch", "x2_dim1", K2]]
    gen = torch.Generator().manual_seed(seed + 1)
    for leading in RUN_LEADING:
        xs = _inputs(leading, gen)
        got = session.run(None, onnx_feeds(qm, xs))
        with torch.no_grad():
            expected = module(*xs)
        _check(module, flavor, xs, got, expected, f"flavor {flavor}, leading {list(leading)}, seed {seed}")


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _no_float_weight(model: onnx.ModelProto) -> None:
    """No float initializer holds a weight: nothing 2-D (or more) of N * K elements."""
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(t.dims) >= 2:
            assert int(np.prod(t.dims)) not in (N * K1, N * K2), (t.name, list(t.dims))


def test_ort_flavor_structure(exports):
    _, _, result = exports["ort"]
    model = onnx.load(str(result.path))
    linears = len(CASES)
    fallbacks = sum(v.fallback for _, v in CASES)
    assert result.ops["com.microsoft.MatMulNBits"] == linears - fallbacks
    # The fallback: DequantizeLinear of the 4-bit weight + MatMul (each call lays its weight out).
    assert result.ops["DequantizeLinear"] == result.ops["MatMul"] == fallbacks
    assert len(result.notes) == 1 and "group_size 40" in result.notes[0], result.notes
    inits = _initializers(model)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert {inits[n.input[1]].data_type for n in nbits} == {onnx.TensorProto.UINT8}
    attributes = [{a.name: a.i for a in n.attribute} for n in nbits]
    assert all(a["bits"] == 4 and "accuracy_level" not in a for a in attributes)
    blocks = Counter((a["K"], a["block_size"]) for a in attributes)
    assert blocks == Counter({(K1, 128): 8, (K1, 32): 6, (K2, 128): 2, (K2, 16): 2}), blocks
    # Activation codes come from QuantizeLinear (per token) in the graph: one per distinct
    # (input, smooth, qmax); the optimizer merges equal ones.
    assert result.ops["QuantizeLinear"] == 2 * len({(v.k, v.smooth) for v in VARIANTS})
    _no_float_weight(model)


def test_qdq_flavor_structure(exports):
    _, _, result = exports["qdq"]
    model = onnx.load(str(result.path))
    assert {n.domain or "ai.onnx" for n in model.graph.node} == {"ai.onnx"}
    inits = _initializers(model)
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    # One per call (each call lays its weight out).
    assert len(weights) == len(CASES)
    kinds = Counter(onnx.TensorProto.DataType.Name(inits[n.input[0]].data_type) for n in weights)
    symmetric = sum(v.symmetric for _, v in CASES)
    assert kinds == Counter({"UINT4": len(CASES) - symmetric, "INT4": symmetric})
    activation_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dtypes = Counter(next(a.i for a in n.attribute if a.name == "output_dtype") for n in activation_q)
    distinct = len({(v.k, v.smooth) for v in VARIANTS})
    assert dtypes == Counter({onnx.TensorProto.INT8: distinct, onnx.TensorProto.INT4: distinct}), dtypes
    assert result.ops["MatMul"] == len(CASES)
    _no_float_weight(model)


def test_qcompile_flavor_structure(exports):
    _, _, result = exports["qcompile"]
    model = onnx.load(str(result.path))
    assert {k: v for k, v in result.ops.items() if k.startswith("qcompile.")} == {
        "qcompile.LinearW4A8": len(VARIANTS), "qcompile.LinearW4A4": len(VARIANTS)}
    assert sorted(f.name for f in model.functions) == ["LinearW4A4", "LinearW4A8"]
    assert all(n.domain in ("", "ai.onnx") for f in model.functions for n in f.node)  # standard ops only
    inits = _initializers(model)
    for node in (n for n in model.graph.node if n.domain == "qcompile"):
        qweight, scales, zeros, bias, smooth = (inits[name] for name in node.input[1:])
        group_size = next(a.i for a in node.attribute if a.name == "group_size")
        n, packed = qweight.dims
        k = 2 * packed
        assert qweight.data_type == onnx.TensorProto.UINT8 and n == N and k in (K1, K2)  # qcompile's storage
        assert list(scales.dims) == list(zeros.dims) == [N, k // group_size]
        assert list(bias.dims) == [N] and list(smooth.dims) == [k]
    _no_float_weight(model)


def test_every_flavor_translates_the_ops():
    for op in W4_ACT_QUANT_LINEAR_OPS.values():
        assert TRANSLATIONS.flavors_for(op) == FLAVORS


def test_float16_activations(tmp_path, seed):
    """x in float16: quantized in float32 after a Cast, outputs cast back (bias and smoothing
    stay float32)."""
    module = W4AXModel(seed + 5)
    qm = _quantize(module, torch.float16)
    xs = _inputs((3, 5), torch.Generator().manual_seed(seed + 4), torch.float16)
    with torch.no_grad():
        expected = module(*xs)
    for flavor in FLAVORS:
        result = to_onnx(qm, tmp_path / f"fp16_{flavor}.onnx", flavor=flavor)
        got = inference_session(result.path).run(None, onnx_feeds(qm, xs))
        assert all(g.dtype == np.float16 for g in got)
        _check(module, flavor, xs, got, expected, f"float16, flavor {flavor}, seed {seed}")
        if flavor == "qcompile":  # the float32 results are the op's bits, so are their float16 casts
            for g, e in zip(got, expected):
                np.testing.assert_array_equal(g, e.numpy(), err_msg=f"float16, flavor {flavor}, seed {seed}")



class VectorModel(torch.nn.Module):
    """w4a8 per-channel and w4a4 in groups of 32 on a 1-D x [64]."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        for name, group in (("pc", None), ("g32", 32)):
            qw = quantize_weight_rtn(torch.randn(N, 64, generator=gen), 4, group, symmetric=False)
            self.register_buffer(f"qweight_{name}", qw.qweight)
            self.register_buffer(f"scales_{name}", qw.scales)
            self.register_buffer(f"zeros_{name}", qw.zeros)
        self.register_buffer("bias", torch.randn(N, generator=gen))

    def calls(self):
        return ((8, (self.qweight_pc, self.scales_pc, self.zeros_pc, self.bias, None, 64)),
                (4, (self.qweight_g32, self.scales_g32, self.zeros_g32, None, None, 32)))

    def forward(self, x: torch.Tensor):
        return tuple(W4_ACT_QUANT_LINEAR_OPS[bits](x, *arguments) for bits, arguments in self.calls())


def test_vector_input(tmp_path, seed):
    """A 1-D x (MatMulNBits and blocked QuantizeLinear need a row axis: added and removed)."""
    module = VectorModel(seed + 6)
    qm = qcompile.quantize(module, (torch.randn(64),), recipe="w8a16", progress=False, verify=False)
    x = torch.randn(64, generator=torch.Generator().manual_seed(seed + 7))
    with torch.no_grad():
        expected = [e.numpy() for e in module(x)]
    for flavor in FLAVORS:
        result = to_onnx(qm, tmp_path / f"vector_{flavor}.onnx", flavor=flavor)
        got = inference_session(result.path).run(None, onnx_feeds(qm, (x,)))
        for (bits, arguments), g, e in zip(module.calls(), got, expected):
            context = f"w4a{bits}, flavor {flavor}, seed {seed}"
            assert g.shape == e.shape == (N,), context
            if flavor == "qcompile" or (flavor == "ort" and bits == 8):  # per-channel "ort": exact
                np.testing.assert_array_equal(g, e, err_msg=context)
            else:
                assert (np.abs(g.astype(np.float64) - e) <= _bound(arguments, bits, x, e)).all(), context

@pytest.mark.parametrize("flavor,opset,needed", [("qdq", 20, 21), ("ort", 18, 21)])
def test_opset_too_low_is_named(tmp_path, exports, flavor, opset, needed):
    """"qdq" needs blocked QuantizeLinear (opset 21); "ort" needs it only for the
    DequantizeLinear fallback of the groups of 40."""
    _, qm, _ = exports[flavor]
    with pytest.raises(ExportError) as info:
        to_onnx(qm, tmp_path / "m.onnx", flavor=flavor, opset=opset)
    message = str(info.value)
    assert "qcompile::linear_w4a8" in message and f"needs opset >= {needed}" in message and f"opset {opset}" in message
    assert list(tmp_path.iterdir()) == []

# --------------------------------------------------------------------------- zoo models, the presets

# preset -> (zoo architecture, activation format: the key of helpers.ACT_QUANT_REL_NORM)
ZOO_CASES = {"w4a8": ("bert", "int8"), "w4a4": ("llama", "int4")}
_DOMAIN_OPS = {"w4a8": "LinearW4A8", "w4a4": "LinearW4A4"}
_CODE_TYPES = {"w4a8": onnx.TensorProto.INT8, "w4a4": onnx.TensorProto.INT4}


def _w4ax_linears(qm) -> int:
    ops = set(W4_ACT_QUANT_LINEAR_OPS.values())
    return sum(1 for n in qm.graph_module.graph.nodes if n.op == "call_function" and n.target in ops)


def _hadamards(qm) -> int:
    return sum(1 for n in qm.graph_module.graph.nodes
               if n.op == "call_function" and n.target == torch.ops.qcompile.hadamard.default)


def _check_zoo_structure(qm, result, preset: str, flavor: str) -> None:
    model = onnx.load(str(result.path))
    linears = _w4ax_linears(qm)
    assert linears > 0 and _hadamards(qm) > 0 and result.notes == []
    if flavor == "ort":
        assert result.ops["com.microsoft.MatMulNBits"] == linears
        assert result.ops.get("DequantizeLinear", 0) == 0
    elif flavor == "qdq":
        assert {n.domain or "ai.onnx" for n in model.graph.node} == {"ai.onnx"}
        codes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
        assert codes and {next(a.i for a in n.attribute if a.name == "output_dtype") for n in codes} == {
            _CODE_TYPES[preset]}
    else:
        assert result.ops[f"qcompile.{_DOMAIN_OPS[preset]}"] == linears
        assert result.ops["qcompile.Hadamard"] == _hadamards(qm)
    packed = [t for t in model.graph.initializer if len(t.dims) >= 2 and t.data_type in (
        onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4)]
    assert len(packed) >= linears  # 4-bit weights (MatMulNBits' B, INT4/UINT4, or qcompile's packed bytes)
    # No float copy of a quantized weight: every 2-D float initializer shaped like one ([N, K]
    # or [K, N]) corresponds to a float constant the torch graph itself reads (an embedding, say);
    # the rotations' Hadamard factors (export/hadamard.py names them "*.hadamard_*") aside.
    gm = qm.graph_module
    in_onnx = Counter(tuple(t.dims) for t in model.graph.initializer
                      if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and ".hadamard_" not in t.name)
    in_torch = Counter(tuple(getattr(gm, c.target).shape) for c in gm.graph.nodes
                       if c.op == "get_attr" and c.users and getattr(gm, c.target).is_floating_point())
    ops = set(W4_ACT_QUANT_LINEAR_OPS.values())
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ops:
            n, groups = (int(d) for d in node.args[2].meta["val"].shape)
            k = groups * int(node.args[6])
            assert in_onnx[(n, k)] + in_onnx[(k, n)] <= in_torch[(n, k)] + in_torch[(k, n)], (n, k)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("preset", list(ZOO_CASES))
def test_zoo_preset_matches_quantized_model(exported_zoo, preset, flavor):
    """The zoo's bert with w4a8 and llama with w4a4 (Hadamard rotations, GPTQ; calibrated on
    helpers.calibration_batches), at the other inputs (seed 1): at least one sample within
    EXACT_RTOL of the float32 reference (an error of the export moves every sample), every
    output within ACT_QUANT_REL_NORM[format] in relative norm of the reference and of
    ``qm(...)`` (a code flipped by ONNX Runtime's different float rounding upstream moves its
    own sample; reasons in tests/export/helpers.py)."""
    arch, fmt = ZOO_CASES[preset]
    qm, result = exported_zoo(arch, preset, flavor)
    entry = zoo.ARCHITECTURES[arch]
    args, kwargs = entry.other_inputs(1)
    outputs = inference_session(result.path).run(None, onnx_feeds(qm, args, kwargs))
    mask, names = kwargs.get("attention_mask"), result.output_names
    reference = float32_reference(qm)(args, kwargs)
    samples = sample_errors(outputs, reference, names, mask)
    per_sample = ", ".join(f"{err:.2e} ({where})" for err, where in samples)
    case = f"{arch} {preset} {flavor}"
    assert min(err for err, _ in samples) < EXACT_RTOL, f"{case}: every sample differs: {per_sample}"
    bound = ACT_QUANT_REL_NORM[fmt]
    for expected, what in ((reference, "the float32 reference"), (quantized_outputs(qm, args, kwargs), "qm(...)")):
        err, where = worst_relative_norm_error(outputs, expected, names, mask)
        assert err < bound, f"{case}: {where} differs from {what} by {err:.2e} in relative norm ({per_sample})"
    _check_zoo_structure(qm, result, preset, flavor)
