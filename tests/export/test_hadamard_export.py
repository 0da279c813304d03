"""ONNX export of ``qcompile::hadamard`` (``qcompile/export/hadamard.py``) in every flavor,
run in ONNX Runtime's CPU provider against the torch op and a float64 truth.

:class:`HadamardModel` calls the op once per variant (:data:`VARIANTS`): powers of two
with one product (64) and with the power split in two (256: 64 x 4), ``H_12 (x) H_16``
(192) and ``H_12 (x) H_128`` (1536: the Sylvester part split, a left factor of 24),
3 blocks of ``H_12 (x) H_4`` (144, block 48) with the small matrix stored as int8,
block-diagonal fallbacks (50: 25 blocks of 2; 172: 43 blocks of 4), a block that is the
small matrix alone (36 = H_36, Paley II: no Sylvester part), and odd n (7: signs only; and
no signs: the identity); signs absent, random +-1, or +-1 times magnitudes in [1/4, 4]
(a smoothing vector folded in, as ``insert_rotations`` does). Inputs are drawn fresh on
every run (the seed is in every failure message). Captured at ``[2, 3, n]`` with dynamic
batch and sequence axes, run at ``[1, 1, n]``, ``[1, 3, n]``, ``[17, 1, n]``, ``[2, 9, n]``.

Bounds, with S = sum over the block of ``|x_i * s_i| / sqrt(block)`` (the magnitude every
output of the block is a signed sum of) and u = 2**-24:

* ONNX against the float64 truth ``(x * s) @ Q``: the translation rounds the sign product,
  the scale constant (folded into ``H_R``) and each product by it (u each), and sums R
  terms, then L terms, each partial sum within S: within ``(R + L + 3) u S`` (R x L the
  split of the block; first order, the factor 1.01 covers the rest);
* the torch op (CPU path: one GEMM per Kronecker factor, orders F_i) within
  ``(sum F_i + 3) u S`` of the truth, so ONNX and the torch op within the sum of the two;
* float16 activations: both round a float32 result once to float16, so one float16 ulp
  (2**-10 relative) more.

Also: the full path of a rotated, quantized model (``qcompile.quantize`` with
``Recipe(rotate="input")`` on a small MLP whose widths cover every case above, and the
zoo's llama with ``{"preset": "w8a8", "rotate": "input"}``, compared as
``tests/export/test_parity.py`` compares activation-quantized presets), the structure of
each flavor (no ``[n, n]`` matrix; op counts; the "qcompile" body folded by ONNX Runtime
into the "ort" graph), and the refusal of float64 activations.
"""
from __future__ import annotations

import math
import secrets
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import qcompile
from qcompile.errors import ExportError
from qcompile.export import FLAVORS, TRANSLATIONS, inference_session, onnx_feeds, session_options, to_onnx
from qcompile.export.context import ExportContext
from qcompile.export.hadamard import factoring, hadamard_domain, hadamard_standard
from qcompile.hadamard import apply_block_hadamard, random_signs, rotation_plan
from qcompile.kernels.hadamard import hadamard_args, kronecker_factors
from tests.export.helpers import (
    u8s8_gemm_xfail,
    ACT_QUANT_REL_NORM,
    BF16_RTOL,
    EXACT_RTOL,
    calibration_batches,
    float32_reference,
    quantized_outputs,
    sample_errors,
    worst_relative_error,
    worst_relative_norm_error,
)
from tests.models import zoo

U32 = 2.0**-24
FLOAT16_ULP = 2.0**-10
CAPTURE_LEADING = (2, 3)
RUN_LEADING = [(1, 1), (1, 3), (17, 1), (2, 9)]
HADAMARD = torch.ops.qcompile.hadamard.default


@dataclass(frozen=True)
class Variant:
    name: str
    n: int
    signs: str | None  # None, "pm1" (random +-1) or "scaled" (+-1 times magnitudes in [1/4, 4])
    block: int | None = None  # None: the rotation plan's
    small_dtype: torch.dtype = torch.float32


VARIANTS = (
    Variant("pow2_64", 64, None),
    Variant("pow2_256", 256, "pm1"),
    Variant("h12x16", 192, "scaled"),
    Variant("h12x128", 1536, "pm1"),
    Variant("h12x4_int8_blocks", 144, None, block=48, small_dtype=torch.int8),
    Variant("blocks_of_2", 50, "scaled"),
    Variant("blocks_of_4", 172, None),
    Variant("h36_small_only", 36, "pm1"),
    Variant("odd_signs_only", 7, "scaled"),
    Variant("odd_identity", 7, None),
)


def _arguments(v: Variant, seed: int) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """(small, signs, block) of a variant; signs random from ``seed``."""
    plan = rotation_plan(v.n if v.block is None else v.block)
    small, block = hadamard_args(plan)
    small = None if small is None else small.to(v.small_dtype)
    signs = None
    if v.signs is not None:
        signs = random_signs(v.n, seed, torch.float32)
        if v.signs == "scaled":
            gen = torch.Generator().manual_seed(seed + 1)
            signs = signs * torch.exp2(torch.empty(v.n).uniform_(-2.0, 2.0, generator=gen))
    return small, signs, block if v.block is None else v.block


class HadamardModel(torch.nn.Module):
    """One ``qcompile::hadamard`` call per variant, each on its own input ``[..., n]``."""

    def __init__(self, variants: tuple[Variant, ...], seed: int) -> None:
        super().__init__()
        self.variants = variants
        self.blocks = []
        for i, v in enumerate(variants):
            small, signs, block = _arguments(v, seed + 7 * i)
            self.register_buffer(f"small_{i}", small)
            self.register_buffer(f"signs_{i}", signs)
            self.blocks.append(block)

    def arguments(self, i: int):
        return getattr(self, f"small_{i}"), getattr(self, f"signs_{i}"), self.blocks[i]

    def forward(self, *xs: torch.Tensor):
        return tuple(HADAMARD(x, *self.arguments(i)) for i, x in enumerate(xs))


@pytest.fixture(scope="module")
def seed() -> int:
    return secrets.randbits(31)


def _inputs(variants, leading, gen: torch.Generator, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    """Rows of different magnitudes."""
    out = []
    for v in variants:
        x = torch.randn(*leading, v.n, generator=gen) * torch.exp(torch.randn(*leading, 1, generator=gen))
        out.append(x.to(dtype))
    return tuple(out)


def _quantize(module: torch.nn.Module, dtype=torch.float32):
    example = _inputs(module.variants, CAPTURE_LEADING, torch.Generator().manual_seed(0), dtype)
    return qcompile.quantize(module, example, recipe="w8a16", progress=False, verify=False)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, seed):
    """flavor -> (module, QuantizedModel, OnnxExport)."""
    folder = tmp_path_factory.mktemp("hadamard_onnx")
    module = HadamardModel(VARIANTS, seed)
    qm = _quantize(module)
    return {flavor: (module, qm, to_onnx(qm, folder / f"hadamard_{flavor}.onnx", flavor=flavor)) for flavor in FLAVORS}


def _split(module: HadamardModel, i: int):
    small, _, block = module.arguments(i)
    return factoring(block, 1 if small is None else small.shape[0])


def _truth_and_bounds(module: HadamardModel, i: int, x: torch.Tensor):
    """float64 truth of call i on x, and the bounds (ONNX, torch op) of their errors from it."""
    small, signs, block = module.arguments(i)
    x64 = x.double()
    s64 = None if signs is None else signs.double()
    truth = apply_block_hadamard(x64, None if small is None else small.double(), block, s64)
    signed = (x64 if s64 is None else x64 * s64).abs()
    mass = signed.reshape(*x.shape[:-1], -1, block).sum(-1, keepdim=True) / math.sqrt(block)
    mass = mass.expand(*x.shape[:-1], x.shape[-1] // block, block).reshape(x.shape)
    f = _split(module, i)
    onnx_terms = f.right + f.left + 3
    torch_terms = sum(kronecker_factors(f.m, block)) + 3
    return truth, 1.01 * onnx_terms * U32 * mass, 1.01 * torch_terms * U32 * mass


def _check(module, xs, got, expected, context: str) -> None:
    assert len(got) == len(expected) == len(module.variants)
    for i, (v, x, g, e) in enumerate(zip(module.variants, xs, got, expected)):
        e = e.numpy()
        assert g.dtype == e.dtype and g.shape == e.shape, (v.name, g.dtype, g.shape, context)
        truth, onnx_bound, torch_bound = (t.numpy() for t in _truth_and_bounds(module, i, x))
        rounding = FLOAT16_ULP * np.abs(truth) if x.dtype == torch.float16 else 0.0
        g64, e64 = g.astype(np.float64), e.astype(np.float64)
        for what, diff, allowed in (("the float64 truth", np.abs(g64 - truth), onnx_bound + rounding),
                                    ("the torch op", np.abs(g64 - e64), onnx_bound + torch_bound + rounding)):
            worst = np.unravel_index(np.argmax(diff - allowed), diff.shape)
            assert (diff <= allowed).all(), (
                f"{v.name}: |onnx - {what}| = {diff[worst]:.3e} > {allowed[worst]:.3e} at {worst} ({context})")


@pytest.mark.parametrize("flavor", FLAVORS)
def test_parity_with_the_torch_op(exports, seed, flavor):
    module, qm, result = exports[flavor]
    onnx.checker.check_model(str(result.path), full_check=True)
    session = inference_session(result.path)
    # Dynamic batch and sequence axes.
    for i, v in zip(onnx.load(str(result.path)).graph.input, VARIANTS):
        dims = [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        assert isinstance(dims[0], str) and isinstance(dims[1], str) and dims[2] in (v.n, f"{i.name}_dim2"), dims
    gen = torch.Generator().manual_seed(seed + 1)
    for leading in RUN_LEADING:
        xs = _inputs(VARIANTS, leading, gen)
        got = session.run(None, onnx_feeds(qm, xs))
        with torch.no_grad():
            expected = module(*xs)
        _check(module, xs, got, expected, f"flavor {flavor}, leading {list(leading)}, seed {seed}")


def test_float16_activations(tmp_path, seed):
    """x in float16: cast to float32, rotated, cast back (small and signs stay float32)."""
    variants = tuple(v for v in VARIANTS if v.name in ("h12x16", "pow2_256", "blocks_of_2", "h36_small_only"))
    module = HadamardModel(variants, seed)
    qm = _quantize(module, torch.float16)
    xs = _inputs(variants, (3, 5), torch.Generator().manual_seed(seed + 2), torch.float16)
    with torch.no_grad():
        expected = module(*xs)
    for flavor in ("ort", "qcompile"):
        result = to_onnx(qm, tmp_path / f"fp16_{flavor}.onnx", flavor=flavor)
        got = inference_session(result.path).run(None, onnx_feeds(qm, xs))
        _check(module, xs, got, expected, f"float16, flavor {flavor}, seed {seed}")


def _products(f) -> int:
    """MatMuls of one call in the "ort" graph: none for a block of 1, else one per factor > 1."""
    return 0 if f.block == 1 else (f.right > 1) + (f.left > 1)


def _float_matrices(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    return [tuple(t.dims) for t in model.graph.initializer
            if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2]


@pytest.mark.parametrize("flavor", ["ort", "qdq"])
def test_standard_flavor_structure(exports, flavor):
    module, _, result = exports[flavor]
    model = onnx.load(str(result.path))
    splits = [_split(module, i) for i in range(len(VARIANTS))]
    assert {n.domain or "ai.onnx" for n in model.graph.node} == {"ai.onnx"}
    assert result.ops["MatMul"] == sum(_products(f) for f in splits)
    assert set(result.ops) <= {"MatMul", "Mul", "Reshape", "Shape", "Identity", "Cast"}, result.ops
    assert result.ops["Mul"] == sum(v.signs is not None for v in VARIANTS)  # the scale is folded into H_R
    # The factors [R, R] and [L, L], never [n, n]: at most 64 x 64 here, against 1536 x 1536.
    expected = {(f.right, f.right) for f in splits if f.right > 1} | {(f.left, f.left) for f in splits if f.left > 1}
    shapes = _float_matrices(model)
    assert set(shapes) == expected, (shapes, expected)
    assert max(math.prod(s) for s in shapes) == 64 * 64
    assert all(max(f.right, f.left) <= max(f.power, f.m) for f in splits)  # at most P x P or m x m


def _ort_optimized(path, tmp_path) -> onnx.ModelProto:
    """The graph ONNX Runtime runs (basic optimizations: inlining and constant folding)."""
    options = session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)


def test_qcompile_flavor_structure(exports, tmp_path):
    module, _, result = exports["qcompile"]
    model = onnx.load(str(result.path))
    nodes = [n for n in model.graph.node if n.domain == "qcompile"]
    assert [n.op_type for n in nodes] == ["Hadamard"] * len(VARIANTS)
    assert {k: v for k, v in result.ops.items() if k.startswith("qcompile.")} == {"qcompile.Hadamard": len(VARIANTS)}
    for i, node in enumerate(nodes):
        f = _split(module, i)
        assert {a.name: a.i for a in node.attribute} == {"block": f.block, "m": f.m}
    (function,) = model.functions
    assert (function.domain, function.name) == ("qcompile", "Hadamard")
    body = list(_all_nodes(onnx.GraphProto(node=function.node)))
    assert all(n.domain in ("", "ai.onnx") for n in body)  # standard ops only, If branches included
    # The inputs are qcompile's storage: Small [m, m] as stored (int8 here too), Signs [n].
    inits = {t.name: t for t in model.graph.initializer}
    smalls = [inits[n.input[1]] for n in nodes]
    assert [(list(t.dims), t.data_type) for t in smalls if t.data_type == onnx.TensorProto.INT8] == [
        ([12, 12], onnx.TensorProto.INT8)]
    # ONNX Runtime inlines the body and folds the factors and the If nodes: the graph it
    # runs has the "ort" flavor's products.
    optimized = _ort_optimized(result.path, tmp_path)
    ops = Counter(n.op_type for n in optimized.graph.node)
    assert ops["If"] == 0 and ops["Range"] == 0 and ops["Hadamard"] == 0, ops
    assert ops["MatMul"] == exports["ort"][2].ops["MatMul"], ops


def test_every_flavor_translates_the_op():
    assert TRANSLATIONS.flavors_for(HADAMARD) == FLAVORS and TRANSLATIONS.refusals(HADAMARD) == {}


@pytest.mark.parametrize("translate,flavor", [(hadamard_standard, "ort"), (hadamard_standard, "qdq"),
                                              (hadamard_domain, "qcompile")])
def test_float64_activations_are_refused(translate, flavor):
    ctx = ExportContext(flavor=flavor, opset=21)
    x = ir.Value(name="x", shape=ir.Shape([3, 64]), type=ir.TensorType(ir.DataType.DOUBLE))
    with pytest.raises(ExportError) as info:
        translate(ctx, x, None, None, 64)
    message = str(info.value)
    assert "qcompile::hadamard" in message and f"flavor {flavor!r}" in message and "DOUBLE" in message


# --------------------------------------------------------------------------- rotated models


class MLP(torch.nn.Module):
    """Widths that rotate every way: 192 (H_12 (x) H_16), 64 (H_64), 50 (blocks of 2),
    36 (H_36 alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(k, n) for k, n in ((192, 64), (64, 50), (50, 36), (36, 7)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(torch.relu(x))
        return x


def _hadamard_calls(qm) -> list[tuple[int, int]]:
    """(n, block) of every qcompile::hadamard call in the quantized graph."""
    return [(int(n.args[0].meta["val"].shape[-1]), n.args[3]) for n in qm.graph_module.graph.nodes
            if n.op == "call_function" and n.target == HADAMARD]


def test_rotated_mlp(tmp_path, seed):
    """``qcompile.quantize(recipe=Recipe(rotate="input"))`` (w8a16 weights) in every flavor:
    against the float32 reference path (EXACT_RTOL) and ``qm(...)`` (BF16_RTOL; reasons in
    tests/export/helpers.py). The rotation differs from the torch op's by float32 rounding
    only (test_parity_with_the_torch_op), well inside EXACT_RTOL."""
    torch.manual_seed(seed)
    qm = qcompile.quantize(MLP().eval(), (torch.randn(2, 3, 192),), recipe=qcompile.Recipe(rotate="input"),
                           progress=False, verify=False)
    assert sorted(_hadamard_calls(qm)) == [(36, 36), (50, 2), (64, 64), (192, 192)]
    x = torch.randn(17, 5, 192, generator=torch.Generator().manual_seed(seed + 3))
    reference = float32_reference(qm)((x,), {})
    quantized = quantized_outputs(qm, (x,), {})
    for flavor in FLAVORS:
        result = to_onnx(qm, tmp_path / f"mlp_{flavor}.onnx", flavor=flavor)
        assert result.ops.get("qcompile.Hadamard", 0) == (4 if flavor == "qcompile" else 0)
        got = inference_session(result.path).run(None, onnx_feeds(qm, (x,)))
        err, _ = worst_relative_error(got, reference, result.output_names)
        assert err < EXACT_RTOL, f"flavor {flavor}: {err:.2e} from the float32 reference (seed {seed})"
        err, _ = worst_relative_error(got, quantized, result.output_names)
        assert err < BF16_RTOL, f"flavor {flavor}: {err:.2e} from qm(...) (seed {seed})"


ZOO_RECIPE = {"preset": "w8a8", "rotate": "input"}


@pytest.fixture(scope="module")
def rotated_llama():
    """(QuantizedModel, args, kwargs, float32 reference outputs, qm(...) outputs) at the
    other inputs (seed 1), which calibration never sees."""
    entry = zoo.ARCHITECTURES["llama"]
    args, kwargs = entry.inputs(0)
    qm = qcompile.quantize(entry.build(0), args, kwargs, recipe=ZOO_RECIPE, calibration=calibration_batches(entry),
                           progress=False, verify=False)
    args, kwargs = entry.other_inputs(1)
    return qm, args, kwargs, float32_reference(qm)(args, kwargs), quantized_outputs(qm, args, kwargs)


@pytest.mark.parametrize("flavor", [
    pytest.param(f, marks=[u8s8_gemm_xfail()] if f in ("ort", "qcompile") else []) for f in FLAVORS
])
def test_rotated_llama_w8a8(rotated_llama, tmp_path, flavor):
    """The zoo's llama, w8a8 with online rotations (smoothing search folded into the
    rotations' signs), compared as test_parity.py compares activation-quantized presets
    (tolerances and reasons in tests/export/helpers.py, ACT_QUANT_REL_NORM): at least one
    sample of the batch within EXACT_RTOL of the float32 reference (an error of the export
    moves every sample), every output within ACT_QUANT_REL_NORM["int8"] in relative norm of
    the reference and of ``qm(...)`` (an int8 code flipped by float rounding moves its own
    sample)."""
    qm, args, kwargs, reference, quantized = rotated_llama
    calls = _hadamard_calls(qm)
    assert {block for _, block in calls} == {128, 192}  # H_128, and H_12 (x) H_16 for the MLP's down_proj
    signs = [getattr(qm.graph_module, n.args[2].target) for n in qm.graph_module.graph.nodes
             if n.op == "call_function" and n.target == HADAMARD]
    assert any((s.abs() != 1).any() for s in signs), "no smoothing folded into a rotation: the case lost coverage"
    result = to_onnx(qm, tmp_path / f"llama_{flavor}.onnx", flavor=flavor)
    assert result.ops.get("qcompile.Hadamard", 0) == (len(calls) if flavor == "qcompile" else 0)
    assert result.ops.get("com.microsoft.MatMulIntegerToFloat", 0) == (15 if flavor == "ort" else 0)
    outputs = inference_session(result.path).run(None, onnx_feeds(qm, args, kwargs))
    mask, names = kwargs.get("attention_mask"), result.output_names
    samples = sample_errors(outputs, reference, names, mask)
    per_sample = ", ".join(f"{err:.2e} ({where})" for err, where in samples)
    assert min(err for err, _ in samples) < EXACT_RTOL, f"{flavor}: every sample differs: {per_sample}"
    bound = ACT_QUANT_REL_NORM["int8"]
    for expected, what in ((reference, "the float32 reference"), (quantized, "qm(...)")):
        err, where = worst_relative_norm_error(outputs, expected, names, mask)
        assert err < bound, f"{flavor}: {where} differs from {what} by {err:.2e} in relative norm ({per_sample})"
