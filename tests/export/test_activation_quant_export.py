"""ONNX export of the activation-quantized ops (``qcompile::linear_w8a8``, ``linear_fp8``,
``quantize_per_token``) in every flavor, run in ONNX Runtime's CPU provider against the
torch ops themselves.

The model (:class:`tests.export.small_models.ActQuantModel`) calls every variant: w8a8
dynamic per-token with and without smoothing and bias, w8a8 static (0-d and ``[1]``
act_scale, scaled so that about 1% of the activations saturate), fp8 with and without
smoothing and bias, and ``quantize_per_token`` int8 / int4 / fp8. K = 37 and N = 19 (not
multiples of 8); weights and inputs are drawn fresh on every run (the seed is in every
failure message). Captured at x ``[2, 3, K]`` with dynamic batch and sequence axes, run at
M = 1, 3, 17 and 18 rows (shapes ``[1, 1, K]``, ``[1, 3, K]``, ``[17, 1, K]``, ``[2, 9, K]``),
one row all zero (the zero-scale guard) where there are several.

Tolerances and their reasons:

* Scales: exactly equal. Every flavor computes ``max(ReduceMax, -ReduceMin) / qmax`` and
  the guard with the torch op's float32 operations (absmax is exact; one correctly rounded
  division).
* Codes: each may differ from the torch op's by one step (one integer, or one adjacent
  e4m3fn value) on at most 0.1% of elements. Both sides divide by the same scale with a
  correctly rounded division and round half to even, so they agree bit for bit (measured:
  no difference in any run); the allowance keeps the test about what matters if a
  runtime rounds a value that sits exactly on a rounding boundary differently.
* Linear outputs: ``|onnx - torch| <= FLIP[m, n] + 1e-5 * max|torch|`` where ``FLIP[m, n] =
  step * xscale[m] * wscales[n] * max_k |qweight[n, k]|`` bounds one activation code of row
  m flipping by one step (step 1 for int8, 32 for e4m3fn: its largest spacing, between 256
  and 448), and 1e-5 bounds the float32 summation-order difference of the flavors that
  multiply dequantized float32 operands (qdq's int8 linear, every flavor's fp8 linear:
  ~1e-7 per product, K = 37). The int8 linears of the "ort" and "qcompile" flavors
  accumulate in int32 and apply the epilogue in the torch op's order:
  ``test_int8_ort_and_qcompile_are_bit_identical`` checks that they are exactly equal.
  With float16 activations (``test_float16_activations``) the outputs are rounded to
  float16 at the end, so float32 results an ulp apart may land an ulp apart in float16:
  one float16 ulp (2**-10 relative) is added to the allowance.

Also: the structure of each flavor's graph, static shapes at opset 18, the refusal of the
fp8 linear in the "qdq" flavor, and the errors for too low an opset.
"""
from __future__ import annotations

import secrets

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch

import qcompile
from qcompile.act_quant import quantize_activation_per_token, usable_scale
from qcompile.errors import ExportError
from qcompile.export import TRANSLATIONS, inference_session, onnx_feeds, to_onnx
from tests.export.helpers import u8s8_gemm_xfail
from tests.export.small_models import ActQuantModel

# The int8-activation files here run ONNX Runtime's uint8 x int8 GEMM (see u8s8_gemm_xfail).
U8S8_XFAIL = u8s8_gemm_xfail("fresh random inputs each run", strict=False)

K, N = 37, 19
CAPTURE_SHAPE = (2, 3, K)
RUN_SHAPES = [(1, 1, K), (1, 3, K), (17, 1, K), (2, 9, K)]
FLOAT_RTOL = 1e-5
FLOAT16_ULP = 2.0**-10
MAX_FLIP_FRACTION = 1e-3
FP8_MAX_STEP = 32.0
INT8_LINEARS = ("w8a8", "w8a8_smooth_bias", "w8a8_static_bias", "w8a8_static_smooth")
# output name -> (activation format, uses smooth, static act_scale buffer or None)
LINEARS = {
    "w8a8": ("int", False, None),
    "w8a8_smooth_bias": ("int", True, None),
    "w8a8_static_bias": ("int", False, "act_scale"),
    "w8a8_static_smooth": ("int", True, "act_scale_1"),
    "fp8": ("fp8", False, None),
    "fp8_smooth_bias": ("fp8", True, None),
}


@pytest.fixture(scope="module")
def seed() -> int:
    return secrets.randbits(31)


def _quantize(module: ActQuantModel):
    return qcompile.quantize(module, (torch.randn(CAPTURE_SHAPE),), recipe="w8a16", progress=False, verify=False)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, seed):
    """flavor -> (module, QuantizedModel, OnnxExport). "qdq" gets the model without fp8
    linears (refused in that flavor: see test_qdq_refuses_the_fp8_linear)."""
    folder = tmp_path_factory.mktemp("act_quant_onnx")
    full = ActQuantModel(K, N, seed)
    qdq = ActQuantModel(K, N, seed, fp8_linear=False)
    qm_full, qm_qdq = _quantize(full), _quantize(qdq)
    out = {}
    for flavor, module, qm in (("ort", full, qm_full), ("qdq", qdq, qm_qdq), ("qcompile", full, qm_full)):
        out[flavor] = module, qm, to_onnx(qm, folder / f"act_quant_{flavor}.onnx", flavor=flavor)
    return out


def _input(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Rows of different magnitudes; the first row all zero when there are several."""
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn((*shape[:-1], 1), generator=gen))
    if x.numel() > x.shape[-1]:
        x.view(-1, x.shape[-1])[0] = 0.0
    return x


def _row_scales(module: ActQuantModel, x: torch.Tensor, fmt: str, smooth: bool, act_scale: str | None):
    """[M, 1] scale of each row's activation codes, as the torch op computes it."""
    x2 = x.reshape(-1, x.shape[-1])
    if act_scale is not None:
        return usable_scale(getattr(module, act_scale).reshape(1, 1)).expand(x2.shape[0], 1)
    return quantize_activation_per_token(x2, module.smooth if smooth else None, 8, fmt)[1]


def _flip_bound(module: ActQuantModel, x: torch.Tensor, name: str) -> np.ndarray:
    """[..., N]: what one activation code of the row flipping by one step can change."""
    fmt, smooth, act_scale = LINEARS[name]
    if fmt == "fp8":
        codes, wscales, step = module.fweight.float(), module.fscales, FP8_MAX_STEP
    else:
        codes, wscales, step = module.qweight.float(), module.wscales, 1.0
    xs = _row_scales(module, x, fmt, smooth, act_scale).double()
    bound = step * xs * (wscales.double() * codes.abs().amax(dim=1).double())[None, :]
    return bound.reshape(*x.shape[:-1], -1).numpy()


def _as_comparable(array: np.ndarray) -> np.ndarray:
    if array.dtype == ml_dtypes.float8_e4m3fn:
        return array.view(np.uint8)
    return array


def _torch_array(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).numpy() if t.dtype == torch.float8_e4m3fn else t.numpy()


def _check_codes(name: str, got: np.ndarray, expected: np.ndarray, context: str) -> None:
    got, expected = _as_comparable(got), _as_comparable(expected)
    assert got.dtype == expected.dtype and got.shape == expected.shape, (name, got.dtype, got.shape, context)
    if name == "codes_fp8":  # adjacent e4m3fn values have adjacent magnitude bits, same sign
        g, e = got.astype(np.int16), expected.astype(np.int16)
        step = np.abs((g & 0x7F) - (e & 0x7F))
        same_sign = ((g & 0x80) == (e & 0x80)) | (((g & 0x7F) <= 1) & ((e & 0x7F) <= 1))
        assert same_sign.all(), f"{name}: sign differs ({context})"
    else:
        step = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    differ = step != 0
    assert step.max(initial=0) <= 1, f"{name}: a code differs by {step.max()} steps ({context})"
    assert differ.mean() <= MAX_FLIP_FRACTION, f"{name}: {differ.sum()} of {differ.size} codes differ ({context})"


def _check_outputs(module, x, names, got, expected, context: str) -> None:
    assert len(got) == len(expected) == len(names), (len(got), len(expected), names)
    for name, g, e in zip(names, got, expected):
        e = _torch_array(e)
        if name.startswith("codes"):
            _check_codes(name, g, e, context)
        elif name.startswith("scales"):
            assert g.dtype == e.dtype == np.float32 and g.shape == e.shape, (name, g.dtype, g.shape, context)
            np.testing.assert_array_equal(g, e, err_msg=f"{name} ({context})")
        else:
            assert g.dtype == e.dtype and g.shape == e.shape, (name, g.dtype, g.shape, context)
            diff = np.abs(g.astype(np.float64) - e.astype(np.float64))
            allowed = _flip_bound(module, x, name) + FLOAT_RTOL * np.abs(e).max()
            if e.dtype == np.float16:  # float32 results an ulp apart can round to float16 values an ulp apart
                allowed = allowed + FLOAT16_ULP * np.abs(e.astype(np.float64))
            worst = np.unravel_index(np.argmax(diff - allowed), diff.shape)
            assert (diff <= allowed).all(), (
                f"{name}: |onnx - torch| = {diff[worst]:.3e} > {allowed[worst]:.3e} at {worst} ({context})")


@U8S8_XFAIL
@pytest.mark.parametrize("flavor", ["ort", "qdq", "qcompile"])
def test_parity_with_the_torch_ops(exports, seed, flavor):
    module, qm, result = exports[flavor]
    onnx.checker.check_model(str(result.path), full_check=True)
    session = inference_session(result.path)
    names = module.output_names()
    assert result.output_names == [f"output_{i}" for i in range(len(names))]
    # Dynamic batch and sequence axes.
    assert [d.dim_param or d.dim_value for d in onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim] \
        == ["batch", "x_dim1", K]
    gen = torch.Generator().manual_seed(seed + 1)
    for shape in RUN_SHAPES:
        x = _input(shape, gen)
        got = session.run(None, onnx_feeds(qm, (x,)))
        with torch.no_grad():
            expected = module(x)
        _check_outputs(module, x, names, got, expected, f"flavor {flavor}, x {list(shape)}, seed {seed}")


@U8S8_XFAIL
def test_int8_ort_and_qcompile_are_bit_identical(exports, seed):
    """The int8 linears' integer accumulation and epilogue order are the torch op's: equal bits."""
    gen = torch.Generator().manual_seed(seed + 2)
    x = _input((3, 11, K), gen)
    for flavor in ("ort", "qcompile"):
        module, qm, result = exports[flavor]
        names = module.output_names()
        got = dict(zip(names, inference_session(result.path).run(None, onnx_feeds(qm, (x,)))))
        with torch.no_grad():
            expected = dict(zip(names, module(x)))
        for name in (*INT8_LINEARS, "codes8", "scales8", "codes4", "scales4", "codes_fp8", "scales_fp8"):
            np.testing.assert_array_equal(_as_comparable(got[name]), _torch_array(expected[name]),
                                          err_msg=f"{name}, flavor {flavor}, seed {seed}")


def _initializers(path) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


def test_ort_flavor_structure(exports):
    _, _, result = exports["ort"]
    assert result.ops["com.microsoft.MatMulIntegerToFloat"] == len(INT8_LINEARS)
    assert result.ops.get("DequantizeLinear", 0) == 0 and result.ops.get("MatMulInteger", 0) == 0
    inits = _initializers(result.path)
    weights = [(onnx.TensorProto.DataType.Name(t.data_type), list(t.dims)) for t in inits.values() if len(t.dims) == 2]
    # The int8 weight (shared by the four w8a8 linears) and the e4m3fn one, each [K, N]; no float copy.
    assert sorted(weights) == [("FLOAT8E4M3FN", [K, N]), ("INT8", [K, N])], weights


def test_qdq_flavor_structure(exports):
    _, _, result = exports["qdq"]
    model = onnx.load(str(result.path))
    assert {n.domain or "ai.onnx" for n in model.graph.node} == {"ai.onnx"}
    # Per-token (blocked) Q: the two dynamic w8a8 linears and quantize_per_token int4 / fp8
    # (its int8 call quantizes x / smooth like w8a8_smooth_bias: the optimizer merges the
    # two); per-tensor Q: the two static linears. DQ: those four activations and the
    # weight (the four linears share one int8 weight).
    assert result.ops["QuantizeLinear"] == 6 and result.ops["DequantizeLinear"] == 5
    blocked = [n for n in model.graph.node if n.op_type == "QuantizeLinear"
               and any(a.name == "block_size" and a.i == K for a in n.attribute)]
    assert len(blocked) == 4
    weights = [(onnx.TensorProto.DataType.Name(t.data_type), list(t.dims)) for t in model.graph.initializer
               if len(t.dims) == 2]
    assert weights == [("INT8", [K, N])]


def test_qcompile_flavor_structure(exports):
    _, _, result = exports["qcompile"]
    model = onnx.load(str(result.path))
    assert {k: v for k, v in result.ops.items() if k.startswith("qcompile.")} == {
        "qcompile.LinearW8A8": 2, "qcompile.LinearW8A8Static": 2, "qcompile.LinearFP8": 2,
        "qcompile.QuantizePerToken": 2, "qcompile.QuantizePerTokenFP8": 1,
    }
    assert sorted(f.name for f in model.functions) == [
        "LinearFP8", "LinearW8A8", "LinearW8A8Static", "QuantizePerToken", "QuantizePerTokenFP8"]
    assert {f.domain for f in model.functions} == {"qcompile"}
    assert all(n.domain in ("", "ai.onnx") for f in model.functions for n in f.node)  # standard ops only
    # The nodes read qcompile's storage unchanged: int8 / e4m3fn [N, K].
    inits = _initializers(result.path)
    linear = [n for n in model.graph.node if n.op_type.startswith("Linear")]
    stored = {(n.op_type, onnx.TensorProto.DataType.Name(inits[n.input[1]].data_type), tuple(inits[n.input[1]].dims))
              for n in linear}
    assert stored == {("LinearW8A8", "INT8", (N, K)), ("LinearW8A8Static", "INT8", (N, K)),
                      ("LinearFP8", "FLOAT8E4M3FN", (N, K))}
    bits = sorted(a.i for n in model.graph.node if n.op_type == "QuantizePerToken" for a in n.attribute)
    assert bits == [4, 8]


@U8S8_XFAIL
def test_static_shapes(tmp_path, seed):
    module = ActQuantModel(K, N, seed, fp8_linear=False, fp8_codes=False)
    qm = _quantize(module)
    result = to_onnx(qm, tmp_path / "static.onnx", flavor="ort", dynamic=False, opset=18)
    model = onnx.load(str(result.path))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == list(CAPTURE_SHAPE)
    assert {o.domain or "": o.version for o in model.opset_import}[""] == 18
    x = _input(CAPTURE_SHAPE, torch.Generator().manual_seed(seed + 3))
    got = inference_session(result.path).run(None, onnx_feeds(qm, (x,)))
    with torch.no_grad():
        expected = module(x)
    _check_outputs(module, x, module.output_names(), got, expected, f"static shapes, opset 18, seed {seed}")


@U8S8_XFAIL
def test_float16_activations(tmp_path, seed):
    """x in float16: quantized in float32 after a Cast, outputs cast back (bias and smoothing
    stay float32, of another type than x)."""
    module = ActQuantModel(K, N, seed)
    qm = qcompile.quantize(module, (torch.randn(CAPTURE_SHAPE, dtype=torch.float16),), recipe="w8a16",
                           progress=False, verify=False)
    x = _input((3, 5, K), torch.Generator().manual_seed(seed + 4)).to(torch.float16)
    with torch.no_grad():
        expected = module(x)
    names = module.output_names()
    for flavor in ("ort", "qcompile"):
        result = to_onnx(qm, tmp_path / f"fp16_{flavor}.onnx", flavor=flavor)
        got = inference_session(result.path).run(None, onnx_feeds(qm, (x,)))
        assert got[0].dtype == np.float16
        _check_outputs(module, x.float(), names, got, expected, f"float16, flavor {flavor}, seed {seed}")
        for name in INT8_LINEARS:
            i = names.index(name)
            np.testing.assert_array_equal(got[i], expected[i].numpy(), err_msg=f"{name}, float16, flavor {flavor}")


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_qdq_refuses_the_fp8_linear(tmp_path, exports):
    _, qm, _ = exports["ort"]  # the model with fp8 linears
    with pytest.raises(ExportError) as info:
        to_onnx(qm, tmp_path / "m.onnx", flavor="qdq")
    message = str(info.value)
    assert "qcompile::linear_fp8" in message and "flavor 'qdq'" in message
    assert "MatMulIntegerToFloat" in message and "float8" in message  # why
    assert "flavors that support it: ort, qcompile" in message
    assert _listing(tmp_path) == []
    op = torch.ops.qcompile.linear_fp8.default
    assert TRANSLATIONS.flavors_for(op) == ("ort", "qcompile") and set(TRANSLATIONS.refusals(op)) == {"qdq"}


@pytest.mark.parametrize("flavor,opset,needed,op", [
    ("qdq", 20, 21, "qcompile::linear_w8a8"),
    ("ort", 18, 19, "qcompile::linear_fp8"),
    ("qcompile", 18, 19, "qcompile::linear_fp8"),
])
def test_opset_too_low_is_named(tmp_path, exports, flavor, opset, needed, op):
    _, qm, _ = exports[flavor]
    with pytest.raises(ExportError) as info:
        to_onnx(qm, tmp_path / "m.onnx", flavor=flavor, opset=opset)
    message = str(info.value)
    assert op in message and f"flavor {flavor!r}" in message
    assert f"needs opset >= {needed}" in message and f"opset {opset}" in message
    assert _listing(tmp_path) == []


def test_qdq_one_dimensional_input(tmp_path, seed):
    """A 1-D input (one token) has one activation scale; ONNX Runtime refuses a blocked
    QuantizeLinear whose scale has one element, so the "qdq" flavor quantizes it as a
    ``[1, K]`` row and squeezes after the MatMul. Both with ONNX Runtime's graph
    optimizations off and at the default level (whose QDQ fusion must not take over)."""
    import onnxruntime as ort

    torch.manual_seed(seed)
    model = torch.nn.Linear(K, N).eval()
    x = torch.randn(K)
    qm = qcompile.quantize(model, (x,), recipe=qcompile.Recipe(weight_bits=8, activation_bits=8), progress=False)
    result = to_onnx(qm, tmp_path / "one_d.onnx", flavor="qdq")
    with torch.no_grad():
        expected = qm(x).numpy()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(result.path), options, providers=["CPUExecutionProvider"])
    for session in (plain, inference_session(result.path)):
        (got,) = session.run(None, onnx_feeds(qm, (x,)))
        assert got.shape == expected.shape == (N,)
        # float32 GEMM of the dequantized operands against the torch op's int32 accumulation
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
