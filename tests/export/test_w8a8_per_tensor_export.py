"""``to_onnx(..., w8a8_activations="per-tensor")``: the "ort" flavor's faster, numerically
different form of a dynamic ``qcompile::linear_w8a8``.

Graph: each dynamic w8a8 linear is ONNX Runtime's ``DynamicQuantizeLinear`` (of x, or of
x / smooth) feeding ``com.microsoft.MatMulIntegerToFloat`` with the int8 ``[K, N]`` weight,
the per-channel ``wscales [N]`` as ``b_scale`` and the bias as its 7th input (no Mul / Add
after it); static linears (calibrated ``act_scale``) and ``quantize_per_token`` keep the
default form, bit for bit; the export's notes say that the numerics are not the torch op's.

Numerics, against the unquantized float64 product ``xs @ (qweight * wscales).T + bias``
(``xs`` = float32 x, divided by smooth in float32 where the linear has one): ONNX
Runtime's per-tensor uint8 grid has step ``a = (max(xs, 0) - min(xs, 0)) / 255`` (the ONNX
``DynamicQuantizeLinear`` definition, recomputed here), and every activation is rounded to
within ``a / 2`` of itself (the range includes every value, so nothing clips by more than
half a step; zero-point rounding included), so ``|onnx - exact| <= a / 2 * sum_k
|W[n, k]|`` per output, plus ``1e-5 * max|exact|`` for the float32 epilogue (``acc * (a *
wscales) + bias``: a few float32 roundings, ~1e-7 relative each). A missing ``wscales``,
bias or zero point breaks the bound by orders of magnitude. K = 37, N = 19, fresh random
inputs of odd shapes (seed in every failure message).
"""
from __future__ import annotations

import secrets

import numpy as np
import onnx
import pytest
import torch

import qcompile
from qcompile.errors import ExportError
from qcompile.export import inference_session, onnx_feeds, to_onnx
from qcompile.export.activation_ort import PER_TENSOR_NOTE
from tests.export.helpers import u8s8_gemm_xfail
from tests.export.small_models import ActQuantModel

K, N = 37, 19
RUN_SHAPES = [(1, 1, K), (3, 5, K), (2, 17, K)]
# float32 rounding of ORT's scale epilogue against the float64 exact product (~1e-7 of
# max|y|); added to the bound of half a quantization step per input, so a missing zero point
# (a whole step) or a wrong scale still fails
FLOAT_RTOL = 1e-5
DYNAMIC = {"w8a8": False, "w8a8_smooth_bias": True}  # output -> uses smooth (and bias)
STATIC = ("w8a8_static_bias", "w8a8_static_smooth")


@pytest.fixture(scope="module")
def seed() -> int:
    return secrets.randbits(31)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, seed):
    """(module, qm, default "ort" export, per-tensor "ort" export)."""
    folder = tmp_path_factory.mktemp("w8a8_per_tensor")
    module = ActQuantModel(K, N, seed, fp8_linear=False)
    qm = qcompile.quantize(module, (torch.randn(2, 3, K),), recipe="w8a16", progress=False, verify=False)
    default = to_onnx(qm, folder / "per_token.onnx", flavor="ort")
    per_tensor = to_onnx(qm, folder / "per_tensor.onnx", flavor="ort", w8a8_activations="per-tensor")
    return module, qm, default, per_tensor


def _run(result, qm, x: torch.Tensor, names: list[str]) -> dict[str, np.ndarray]:
    return dict(zip(names, inference_session(result.path).run(None, onnx_feeds(qm, (x,)))))


def test_per_tensor_graph_structure(exports):
    module, _, default, per_tensor = exports
    onnx.checker.check_model(str(per_tensor.path), full_check=True)
    model = onnx.load(str(per_tensor.path))
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    outputs = {o.name for o in model.graph.output}

    mitf = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert all(n.domain == "com.microsoft" for n in mitf)
    fused = [n for n in mitf if producers[n.input[0]].op_type == "DynamicQuantizeLinear"]
    # The two dynamic linears (x and x / smooth: two quantizations); the two static ones keep
    # the default form (per-row / static QuantizeLinear, scale 1 in b_scale, Mul after).
    assert len(fused) == len(DYNAMIC) and len(mitf) == len(DYNAMIC) + len(STATIC)
    assert per_tensor.ops["DynamicQuantizeLinear"] == len(DYNAMIC)
    assert default.ops.get("DynamicQuantizeLinear", 0) == 0
    for node in fused:
        dql = producers[node.input[0]]
        # codes, int8 weight, a_scale, b_scale, a_zero_point from the same DynamicQuantizeLinear
        assert [node.input[2], node.input[4]] == [dql.output[1], dql.output[2]]
        weight, b_scale = inits[node.input[1]], inits[node.input[3]]
        assert (weight.data_type, list(weight.dims)) == (onnx.TensorProto.INT8, [K, N])
        assert (b_scale.data_type, list(b_scale.dims)) == (onnx.TensorProto.FLOAT, [N])
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(b_scale), module.wscales.numpy())
        assert len(node.input) in (5, 7)
        if len(node.input) == 7:  # the biased linear: bias inside the op, no b_zero_point
            assert node.input[5] == ""
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits[node.input[6]]), module.bias.numpy())
        # Nothing after it: the op's output is the model's output.
        assert node.output[0] in outputs and node.output[0] not in consumers
    biased = [n for n in fused if len(n.input) == 7]
    assert len(biased) == 1
    # The export says that its numerics are not the torch op's; the default export does not.
    assert per_tensor.notes.count(PER_TENSOR_NOTE) == 1 and PER_TENSOR_NOTE not in default.notes


def _exact(module: ActQuantModel, x: torch.Tensor, smooth: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """(xs float32 [M, K], exact float64 output [M, N], the DynamicQuantizeLinear step of xs)."""
    xs = x.reshape(-1, K).to(torch.float32)
    if smooth:
        xs = xs / module.smooth
    xs = xs.numpy()
    step = float((np.float32(max(xs.max(), 0.0)) - np.float32(min(xs.min(), 0.0))) / np.float32(255.0))
    w = module.qweight.double().numpy() * module.wscales.double().numpy()[:, None]
    y = xs.astype(np.float64) @ w.T
    if smooth:
        y = y + module.bias.double().numpy()
    return xs, y, step


@u8s8_gemm_xfail("ONNX Runtime's own DynamicQuantizeMatMul; fresh random inputs each run", strict=False)
def test_per_tensor_numerics_bound(exports, seed):
    module, qm, _, per_tensor = exports
    names = module.output_names()
    w_abs = (module.qweight.double().abs() * module.wscales.double()[:, None]).sum(dim=1).numpy()
    gen = torch.Generator().manual_seed(seed + 1)
    for shape in RUN_SHAPES:
        x = torch.randn(shape, generator=gen) * 2.0
        got = _run(per_tensor, qm, x, names)
        for name, smooth in DYNAMIC.items():
            _, exact, step = _exact(module, x, smooth)
            out = got[name].reshape(-1, N)
            assert got[name].dtype == np.float32 and got[name].shape == (*shape[:-1], N)
            diff = np.abs(out.astype(np.float64) - exact)
            allowed = 0.5 * step * w_abs[None, :] + FLOAT_RTOL * np.abs(exact).max()
            worst = np.unravel_index(np.argmax(diff - allowed), diff.shape)
            assert (diff <= allowed).all(), (
                f"{name}: |onnx - exact| = {diff[worst]:.3e} > {allowed[worst]:.3e} at {worst} "
                f"(x {list(shape)}, seed {seed})")


def test_static_linears_and_codes_unchanged(exports, seed):
    """Only the dynamic w8a8 linears change: the rest equals the default export bit for bit."""
    module, qm, default, per_tensor = exports
    names = module.output_names()
    gen = torch.Generator().manual_seed(seed + 2)
    x = torch.randn((4, 7, K), generator=gen)
    got, expected = _run(per_tensor, qm, x, names), _run(default, qm, x, names)
    for name in names:
        if name not in DYNAMIC:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{name}, seed {seed}")


@pytest.mark.parametrize("flavor", ["qdq", "qcompile"])
def test_per_tensor_is_ort_only(tmp_path, exports, flavor):
    _, qm, _, _ = exports
    with pytest.raises(ExportError, match=r"w8a8_activations='per-tensor'.*only the 'ort' flavor"):
        to_onnx(qm, tmp_path / "x.onnx", flavor=flavor, w8a8_activations="per-tensor")
    assert list(tmp_path.iterdir()) == []


def test_unknown_w8a8_activations(tmp_path, exports):
    _, qm, _, _ = exports
    with pytest.raises(ExportError, match=r"w8a8_activations must be one of .*'per-token'.*'per-tensor'.*'per-row'"):
        to_onnx(qm, tmp_path / "x.onnx", flavor="ort", w8a8_activations="per-row")
