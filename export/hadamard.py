"""ONNX translations of ``qcompile::hadamard`` (:mod:`qcompile.kernels.hadamard`): a
block-diagonal normalized Hadamard transform along the last dimension, written with
standard ops and without the ``n x n`` matrix.

    hadamard(Tensor x, Tensor? small, Tensor? signs, int block) -> Tensor
    = (x * signs) @ blockdiag(H_small (x) H_P, ...) / sqrt(block),  block = m * P, P = 2**k

The form (:class:`Factoring`). Each block of ``x * signs`` is viewed as an ``[L, R]``
matrix X, with ``R = min(P, RIGHT_FACTOR)`` (a power of two) and ``L = block / R``. The
block's matrix factors as ``M_L (x) H_R`` with ``M_L = H_small (x) H_{P/R}`` (``[L, L]``;
Sylvester matrices are Kronecker products of smaller ones), and ``x_block @ (M_L (x) H_R)``
is ``M_L^T X H_R``: two ``MatMul``s, one on each axis of the ``[rows * n / block, L, R]``
view of the signed activations, with ``1 / sqrt(block)`` folded into ``H_R``:

    Cast(x) -> Mul(signs) -> Reshape [-1, L, R] -> MatMul(., H_R / sqrt(block))
            -> MatMul(M_L^T, .) -> Reshape(Shape(x)) -> CastLike(x)

Initializers: ``H_R / sqrt(block)`` (``[R, R]``, R <= 64) and ``M_L^T`` (``[L, L]``, +-1),
never ``[n, n]``. Degenerate cases drop a product: ``L = 1`` (a power-of-two block of at
most 64) is one ``MatMul`` on ``[-1, R]``; ``R = 1`` (``block = m``) is one ``MatMul`` by
``M_L / sqrt(block)`` on ``[-1, L]``; ``block = 1`` (odd n) is the sign multiply alone.
The left product is ``MatMul`` of the 2-D ``M_L^T`` by the 3-D activations (numpy
broadcasting: a batched GEMM).

Why R <= 64: measured with ``benchmarks/onnx_hadamard.py --rows 4096`` (ONNX Runtime 1.31.1,
CPU provider, 2 intra-op threads, spinning off, AMD EPYC with AVX512, 2 cores; float32,
+-1 signs; median ms of interleaved rounds; 384 and 1536 on a quiet machine, 4096 with
0.9 cores of other load, so compare within a row)::

    n (rotation)            dense n x n   R x L, broadcast left product           exported (R = min(P, 64))
    384  (H_12 (x) H_32)       13.8 ms    32x12: 3.4   16x24: 2.5   8x48: 3.8      2.7  (0.19x)
    1536 (H_12 (x) H_128)     107.6 ms    128x12: 19.5  64x24: 17.0  32x48: 13.0   13.2  (0.12x)
    4096 (H_4096)              1916 ms    256x16: 145  64x64: 100  32x128: 94      102  (0.05x)

A balanced split (L about R) is fastest, and R = min(P, 64) stays within 10% of the best
split measured (within the noise of these shared cores); 64 is also the CPU path's largest
Sylvester factor (:data:`qcompile.kernels.hadamard.CPU_FACTOR`). The left product as
``Transpose`` + ``MatMul`` + ``Transpose`` took 1.3-1.8x longer at these splits (it wins
only for very unbalanced ones, L >= 24 R here). The three flavors run the same graph (the
"qcompile" body folds into it): equal times. The torch op's CPU path at these shapes:
8.3, 40 and 559 ms.

Numerics: computed in float32 (x, small and signs cast), returned in x's dtype, as the
torch op. The products are exact (+-1 entries; the scale rounded once to float32), the
sums run in another order than the torch op's, so results differ from it by float32
rounding: within ``(R + L + 3) u S`` of the exact value, ``u = 2**-24``, S = sum over the
block of ``|x_i * signs_i| / sqrt(block)`` (tested).

Flavors:

* ``"ort"`` and ``"qdq"``: the standard ops above (:func:`hadamard_standard`); ``small``
  must be a constant of the model (its Kronecker product with ``H_{P/R}`` is an
  initializer), ``signs`` may be any value.
* ``"qcompile"``: one ``qcompile.Hadamard(X, Small, Signs) -> Y`` node, attributes
  ``block`` and ``m`` (the order of Small), reading qcompile's storage unchanged
  (:func:`hadamard_domain`). Function bodies cannot branch on an omitted input, so an
  absent ``small`` is written as ``[[1]]`` (m = 1) and absent signs as ones ``[n]`` (an
  initializer; ``ConstantOfShape`` when n is not static). The
  body computes the same ops: ``H_R`` and ``M_L`` are built in the graph from the
  attributes and Small (Sylvester entries ``(-1)**popcount(i & j)``, a Kronecker product
  by ``Unsqueeze`` + ``Mul``) and the degenerate cases are ``If`` nodes on conditions
  computed from the attributes; ONNX Runtime constant-folds all of it when it inlines the
  function, so it runs the very graph of the "ort" flavor.

x must be float32, float16 or bfloat16, as for the other translated ops (float16 is tested
in ONNX Runtime; bfloat16 is written the same way, Cast + CastLike). float64, which the
torch op accepts for qcompile's own equivalence checks, is refused with an ExportError
naming the op, the flavor and the type.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import TensorProto, helper
from onnx.defs import OpSchema

from qcompile.errors import ExportError
from qcompile.hadamard import hadamard_matrix

from .activation_quant import float32, in_input_dtype, is_float32
from .context import ExportContext
from .contrib_schemas import op_schema
from .node_builder import FunctionNodes, NodeBuilder, ScriptNodes
from .qcompile_domain import QCOMPILE_DOMAIN, QCOMPILE_DOMAIN_VERSION, qcompile_opset, register_domain_ops

__all__ = [
    "OP_NAME",
    "RIGHT_FACTOR",
    "Factoring",
    "factoring",
    "right_matrix",
    "left_matrix",
    "hadamard_nodes",
    "hadamard_standard",
    "hadamard_domain",
    "HADAMARD_DOMAIN_OP",
]

OP_NAME = "qcompile::hadamard"
# The largest Sylvester factor applied on the last axis (see the module docstring).
RIGHT_FACTOR = 64
# Bits of the indices of H_{P/R} that the "qcompile" body's Sylvester construction reads:
# P / R < 2**16 (an [L, L] left factor with L >= 2**16 would hold 16 GiB).
_SYLVESTER_BITS = 16
_FLOATS = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")
_X_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


@dataclass(frozen=True)
class Factoring:
    """How one block of order ``block = m * power`` is applied: ``M_L (x) H_right`` with
    ``M_L = H_small (x) H_{power / right}`` of order ``left``."""

    block: int
    m: int
    power: int
    right: int
    left: int

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.block)


def factoring(block: int, m: int) -> Factoring:
    """The split of a block (``block = m * 2**k``): ``right = min(2**k, RIGHT_FACTOR)``."""
    power, rest = divmod(block, m)
    if rest or power < 1 or power & (power - 1):
        raise ExportError(f"{OP_NAME}: block = {block} must be m * 2**k for the order m = {m} of small")
    right = min(power, RIGHT_FACTOR)
    return Factoring(block=block, m=m, power=power, right=right, left=block // right)


def right_matrix(f: Factoring) -> np.ndarray:
    """``H_right / sqrt(block)``, float32 ``[R, R]`` (the scale rounded once; entries +-it)."""
    return (hadamard_matrix(f.right, torch.float64).numpy() * f.scale).astype(np.float32)


def left_matrix(f: Factoring, small: Optional[np.ndarray]) -> np.ndarray:
    """``M_L = H_small (x) H_{power / right}``, float32 ``[L, L]`` (``small`` None: m = 1)."""
    sylvester = hadamard_matrix(f.power // f.right, torch.float64).numpy()
    dense = sylvester if small is None else np.kron(small.astype(np.float64), sylvester)
    return dense.astype(np.float32)


def hadamard_nodes(b: NodeBuilder, x, signs, f: Factoring, right, left, *, x_float32: bool = False,
                   signs_float32: bool = False):
    """The standard-op sequence of the module docstring. ``right``: ``H_R / sqrt(block)``
    (used when R > 1); ``left``: ``M_L^T`` when R > 1, ``M_L / sqrt(block)`` when R = 1
    (used when L > 1)."""
    y = float32(b, x, x_float32)
    if signs is not None:
        y = b("Mul", y, float32(b, signs, signs_float32))
    if f.block > 1:
        if f.right == 1:  # block = m: one product by the whole (scaled) block matrix
            y = b("MatMul", b("Reshape", y, b.constant(np.array([-1, f.left], np.int64))), left)
        elif f.left == 1:  # a power-of-two block of at most RIGHT_FACTOR
            y = b("MatMul", b("Reshape", y, b.constant(np.array([-1, f.right], np.int64))), right)
        else:
            view = b("Reshape", y, b.constant(np.array([-1, f.left, f.right], np.int64)))
            y = b("MatMul", left, b("MatMul", view, right))
        y = b("Reshape", y, b("Shape", x))
    elif signs is None:  # the identity: still a node of its own (an op's output is not its input)
        y = b("Identity", y)
    return in_input_dtype(b, y, x, x_float32)


# --------------------------------------------------------------------------- reading a call


@dataclass(frozen=True)
class HadamardCall:
    """One call of the op, as a translation sees it."""

    x: Any
    small: Any  # ONNX value or None
    signs: Any  # ONNX value or None
    block: int
    m: int
    n: Optional[int]  # None when x's last dimension is not static


def _last_dim(value) -> Optional[int]:
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) == 0:
        return None
    last = shape[-1]
    return last if isinstance(last, int) else None


def _read_call(ctx: ExportContext, x, small, signs, block) -> HadamardCall:
    dtype = getattr(x, "dtype", None)
    if dtype is not None and dtype not in _X_TYPES:
        raise ExportError(
            f"{OP_NAME}: flavor {ctx.flavor!r} exports float32, float16 and bfloat16 activations, got x of type "
            f"{dtype} (float64 is for qcompile's own equivalence checks; quantize the model in float32)"
        )
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ExportError(f"{OP_NAME}: block must be a positive int, got {block!r}")
    m = 1
    if small is not None:
        shape = getattr(small, "shape", None)
        if shape is None or len(shape) != 2 or not all(isinstance(d, int) for d in shape) or shape[0] != shape[1]:
            raise ExportError(f"{OP_NAME}: small must be a square [m, m] matrix of static shape, got {shape}")
        m = int(shape[0])
    n = _last_dim(x)
    if n is not None and n % block:
        raise ExportError(f"{OP_NAME}: the last dimension of x ({n}) must be a multiple of block = {block}")
    return HadamardCall(x, small, signs, block, m, n)


def hadamard_standard(ctx: ExportContext, x, small, signs, block):
    """``qcompile::hadamard`` -> standard ops (the "ort" and "qdq" flavors)."""
    call = _read_call(ctx, x, small, signs, block)
    f = factoring(call.block, call.m)
    name = f"hadamard{f.block}"
    small_array = None
    if small is not None:
        name = ctx.source_name(small)
        small_array = ctx.constant(small, "small", OP_NAME).detach().cpu().to(torch.float64).numpy()
    right = left = None
    if f.block > 1 and f.right > 1:
        right = ctx.initializer(f"{name}.hadamard_right", right_matrix(f))
    if f.left > 1:
        dense = left_matrix(f, small_array)
        if f.right == 1:
            dense = (dense.astype(np.float64) * f.scale).astype(np.float32)
        else:
            dense = np.ascontiguousarray(dense.T)
        left = ctx.initializer(f"{name}.hadamard_left", dense)
    return hadamard_nodes(ScriptNodes(ctx.opset), x, signs, f, right, left,
                          x_float32=is_float32(x), signs_float32=is_float32(signs))


# --------------------------------------------------------------------------- the qcompile domain


def _ints(b: FunctionNodes, *values: int):
    return b.constant(np.array(values, np.int64))


def _sylvester(b: FunctionNodes, order):
    """The Sylvester matrix of a power-of-two ``order`` (an int64 ``[1]`` value), float32:
    entry ``(-1)**popcount(i & j)``, the popcount summed over :data:`_SYLVESTER_BITS` bits."""
    zero, one, two = _ints(b, 0), _ints(b, 1), _ints(b, 2)
    index = b("Range", b("Squeeze", zero), b("Squeeze", order), b("Squeeze", one))
    both = b("BitwiseAnd", b("Unsqueeze", index, one), b("Unsqueeze", index, zero))  # [o, o]
    powers = b.constant(np.array([2**i for i in range(_SYLVESTER_BITS)], np.int64))
    bits = b("Mod", b("Div", b("Unsqueeze", both, _ints(b, -1)), powers), two)  # [o, o, bits]
    parity = b("Mod", b("ReduceSum", bits, _ints(b, -1), keepdims=0), two)
    return b("Cast", b("Sub", one, b("Mul", two, parity)), to=TensorProto.FLOAT)


def _branch(b: FunctionNodes, condition, then_build, else_build, prefix: str):
    """``If(condition)`` with one float32 output, each branch built by ``fn(sub_builder)``."""
    branches = {}
    for label, build in (("then", then_build), ("else", else_build)):
        sub = FunctionNodes(prefix=f"{prefix}_{label}")
        out = build(sub)
        if not sub.nodes or out not in sub.nodes[-1].output:  # a branch must compute its output
            out = sub("Identity", out)
        branches[label] = helper.make_graph(
            sub.nodes, f"{prefix}_{label}", [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    return b("If", condition, then_branch=branches["then"], else_branch=branches["else"])


def _domain_body(b: FunctionNodes, x, small, signs):
    """The body of ``qcompile.Hadamard``: the same ops as :func:`hadamard_nodes`, the
    factoring computed from the attributes (constant-folded by ONNX Runtime)."""
    block = b("Reshape", b.attribute_constant("block"), _ints(b, 1))  # int64 [1]
    m = b("Reshape", b.attribute_constant("m"), _ints(b, 1))
    power = b("Div", block, m)
    right = b("Min", power, _ints(b, RIGHT_FACTOR))
    left = b("Div", block, right)
    p_left = b("Div", power, right)
    scale = b("Cast", b("Reciprocal", b("Sqrt", b("Cast", block, to=TensorProto.DOUBLE))), to=TensorProto.FLOAT)
    one = _ints(b, 1)
    h_right = b("Mul", _sylvester(b, right), scale)  # [R, R]
    h_left = _sylvester(b, p_left)
    small_f = b("Cast", small, to=TensorProto.FLOAT)
    kron = b("Mul", b("Unsqueeze", small_f, _ints(b, 1, 3)), b("Unsqueeze", h_left, _ints(b, 0, 2)))
    m_left = b("Reshape", kron, b("Concat", left, left, axis=0))  # H_small (x) H_{P/R}: [L, L]

    signed = b("Mul", b("Cast", x, to=TensorProto.FLOAT), b("Cast", signs, to=TensorProto.FLOAT))
    has_left = b("Squeeze", b("Greater", left, one))
    has_right = b("Squeeze", b("Greater", right, one))

    def both(s):  # M_L^T X H_R on [-1, L, R]
        view = s("Reshape", signed, s("Concat", _ints(s, -1), left, right, axis=0))
        return s("MatMul", s("Transpose", m_left, perm=[1, 0]), s("MatMul", view, h_right))

    def left_only(s):  # block = m: [-1, L] @ M_L / sqrt(block)
        view = s("Reshape", signed, s("Concat", _ints(s, -1), left, axis=0))
        return s("MatMul", view, s("Mul", m_left, scale))

    def right_only(s):  # [-1, R] @ H_R / sqrt(block); R = 1 (block 1): the signs alone
        return s("MatMul", s("Reshape", signed, s("Concat", _ints(s, -1), right, axis=0)), h_right)

    with_left = lambda s: _branch(s, has_right, both, left_only, "lr")  # noqa: E731
    without_left = lambda s: _branch(s, has_right, right_only, lambda t: signed, "r")  # noqa: E731
    y = _branch(b, has_left, with_left, without_left, "l")
    return b("CastLike", b("Reshape", y, b("Shape", x)), x)


@dataclass(frozen=True)
class HadamardDomainOp:
    """``qcompile.Hadamard``: its schema and function body (an entry of ``DOMAIN_OPS``)."""

    name: str = "Hadamard"
    doc: str = ("Y = (X * Signs) @ blockdiag(Small (x) H_P, ...) / sqrt(block) along the last axis, block = m * P "
                "with P a power of two and H_P the Sylvester matrix; computed in float32, returned in X's dtype")

    def schema(self) -> OpSchema:
        return op_schema(
            self.name,
            QCOMPILE_DOMAIN,
            QCOMPILE_DOMAIN_VERSION,
            f"qcompile.{self.name}: {self.doc} (see qcompile.export.hadamard)",
            inputs=[
                ("X", "T", "activations [..., n], n a multiple of block"),
                ("Small", "M", "the +-1 matrix H_m [m, m] ([[1]] when m = 1)"),
                ("Signs", "S", "per-channel factors [n] (ones when none)"),
            ],
            outputs=[("Y", "T", "rotated activations [..., n] in X's dtype")],
            type_constraints=[
                ("T", _FLOATS, "activations"),
                ("M", (*_FLOATS, "tensor(double)", "tensor(int8)"), "the small Hadamard matrix"),
                ("S", (*_FLOATS, "tensor(double)"), "per-channel factors"),
            ],
            attributes=[("block", "order of each diagonal block, m * 2**k"), ("m", "order of Small")],
        )

    def function(self, opset: int) -> onnx.FunctionProto:
        b = FunctionNodes()
        y = _domain_body(b, "X", "Small", "Signs")
        b.rename_output(y, "Y")
        return helper.make_function(
            QCOMPILE_DOMAIN,
            self.name,
            inputs=["X", "Small", "Signs"],
            outputs=["Y"],
            nodes=b.nodes,
            opset_imports=[helper.make_opsetid("", opset)],
            attributes=["block", "m"],
            doc_string=f"qcompile.{self.name}: {self.doc}",
        )


HADAMARD_DOMAIN_OP = HadamardDomainOp()
register_domain_ops(HADAMARD_DOMAIN_OP)


def hadamard_domain(ctx: ExportContext, x, small, signs, block):
    """``qcompile::hadamard`` -> one ``qcompile.Hadamard`` node (the "qcompile" flavor)."""
    call = _read_call(ctx, x, small, signs, block)
    factoring(call.block, call.m)  # validates block against m
    if small is None:
        small = ctx.initializer(f"hadamard{call.block}.small", np.ones((1, 1), np.float32))
    if signs is None and call.n is not None:
        signs = ctx.initializer(f"hadamard{call.n}.signs", np.ones(call.n, np.float32))
    elif signs is None:  # a dynamic last dimension: ones [n] computed from x's shape
        b = ScriptNodes(ctx.opset)
        signs = b("ConstantOfShape", b("Shape", x, start=-1), value=ir.tensor(np.ones(1, np.float32)))
    result = getattr(qcompile_opset(), HADAMARD_DOMAIN_OP.name)(x, small, signs, block=call.block, m=call.m)
    ctx.use_function(HADAMARD_DOMAIN_OP.name)
    return result
