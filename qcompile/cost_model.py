"""Cost model of the quantizable linears: FLOPs, bytes, BOPs and roofline latency.

Each linear ``y = x Wᵀ`` with ``x [..., K]`` and ``W [N, K]`` runs ``M = Π(leading dims of
x)`` tokens. ``M`` is a sympy expression in the graph's symbolic sizes (captured with
``Dim.AUTO``): the first input's first two dimensions are named ``batch`` and ``seq``,
other symbols keep their names. Per weight format ``c`` (:mod:`qcompile.weight_formats`):

* ``flops = 2·M·N·K``;
* ``bytes = weight_bytes(c) + act_bytes·M·(K + N)`` (weights once, input read and output
  written in 16-bit activations, or in the model's float width when kept float);
* ``bops = M·N·K · bits_w(c) · bits_a(c)`` (bit operations, HAWQ-V3's measure; weight-only
  formats keep 16-bit activations, the others 8 or 4; float layers use the float width
  for both);
* roofline ``latency = max(flops / peak, bytes / bandwidth)`` for a :class:`DeviceProfile`
  (the peak of 16-bit compute, which the weight-only kernels use; of INT8 compute for
  formats with quantized activations — INT4 activations run as INT8 dots, as the
  ``linear_w4a4`` kernels do; of float32 for a float32 layer kept float). Activations are
  read and written in 16 bits in every quantized format: the per-token quantization reads
  the float input inside the kernel.

Expressions are evaluated at concrete sizes (:meth:`LinearCost.evaluate`; by default the
sizes of the example inputs the graph was captured with).
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx

from .graph_utils import layer_name, linear_weight
from .weight_formats import WeightFormat, weight_bytes

__all__ = ["DeviceProfile", "DEVICE_PROFILES", "LinearCost", "linear_costs", "size_symbols"]


@dataclass(frozen=True)
class DeviceProfile:
    """Peak rates of a device for the roofline: FLOP/s of 16-bit and 32-bit float matmul,
    OP/s of INT8 matmul, and memory bandwidth in bytes/s."""

    name: str
    peak_flops_16: float
    peak_flops_32: float
    peak_ops_8: float
    bandwidth: float
    source: str


DEVICE_PROFILES: dict[str, DeviceProfile] = {
    # measured on the 2-core CPU dev machine (torch 2.13, 2 threads): a bf16 matmul
    # 1024x2048x2048 runs at ~400 GFLOP/s and float32 at ~190 GFLOP/s; the weight-only
    # kernels stream weights at ~9 GB/s (FINDINGS.md: M=8, K=N=4096 int4 1.0 ms, int8 1.9 ms,
    # bf16 3.4 ms), below the ~33 GB/s of a plain copy; torch._int_mm at the same
    # 1024x2048x2048 runs 1.3x faster than the bf16 matmul (measured in one run, 2 threads)
    "cpu": DeviceProfile("cpu", 4.0e11, 1.9e11, 5.2e11, 9.0e9,
                         "2-core CPU dev machine: bf16/fp32/int8 matmul and weight-only kernel streaming rate"),
    # NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16, 495 TFLOP/s tf32, 1979 TOP/s dense
    # INT8, 3.35 TB/s HBM3
    "h100": DeviceProfile("h100", 9.89e14, 4.95e14, 1.979e15, 3.35e12, "NVIDIA H100 SXM datasheet (dense)"),
}


def size_symbols(gm: fx.GraphModule) -> dict[sympy.Symbol, tuple[sympy.Symbol, int]]:
    """Graph size symbol -> (readable symbol, value at the captured example): the first
    input's dimensions 0 and 1 are ``batch`` and ``seq``."""
    out: dict[sympy.Symbol, tuple[sympy.Symbol, int]] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
    readable = {0: "batch", 1: "seq"}
    for p_index, node in enumerate(placeholders):
        for dim, size in enumerate(node.meta["val"].shape):
            if not isinstance(size, torch.SymInt):
                continue
            expr = size.node.expr
            if not isinstance(expr, sympy.Symbol) or expr in out:
                continue
            hint = size.node.hint  # the value at the captured example
            name = readable[dim] if p_index == 0 and dim in readable else str(expr)
            out[expr] = (sympy.Symbol(name, positive=True, integer=True), int(hint) if hint is not None else None)
    return out


def _tokens_expr(x: fx.Node, symbols) -> sympy.Expr:
    val = x.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise ValueError(f"node {x.name!r} has no shape metadata for the cost model")
    expr = sympy.Integer(1)
    for size in val.shape[:-1]:
        if isinstance(size, torch.SymInt):
            expr *= size.node.expr.xreplace({k: v[0] for k, v in symbols.items()})
        else:
            expr *= int(size)
    return expr


@dataclass(frozen=True)
class LinearCost:
    """Costs of one linear; ``tokens`` is a sympy expression (see the module docstring)."""

    layer: str
    out_features: int
    in_features: int
    float_bits: int
    tokens: sympy.Expr

    def flops(self) -> sympy.Expr:
        return 2 * self.tokens * self.out_features * self.in_features

    def act_bits(self, fmt: WeightFormat) -> int:
        """Bits of the activations the matmul computes with."""
        return self.float_bits if fmt.is_float else fmt.act_bits

    def weight_bytes(self, fmt: WeightFormat) -> int:
        return weight_bytes(fmt, self.out_features, self.in_features, self.float_bits // 8)

    def bytes(self, fmt: WeightFormat) -> sympy.Expr:
        act = self.float_bits // 8 if fmt.is_float else 2  # float input read, float output written
        return self.weight_bytes(fmt) + act * self.tokens * (self.in_features + self.out_features)

    def bops(self, fmt: WeightFormat) -> sympy.Expr:
        return self.tokens * self.out_features * self.in_features * fmt.bits(self.float_bits) * self.act_bits(fmt)

    def latency(self, fmt: WeightFormat, device: DeviceProfile) -> sympy.Expr:
        """Roofline seconds."""
        bits = self.act_bits(fmt)
        peak = device.peak_flops_32 if bits > 16 else device.peak_flops_16 if bits == 16 else device.peak_ops_8
        return sympy.Max(self.flops() / peak, self.bytes(fmt) / device.bandwidth)

    def evaluate(self, expr: sympy.Expr, sizes: dict[str, int]) -> float:
        """``expr`` at concrete sizes (readable symbol name -> value)."""
        subs = {s: sizes[s.name] for s in expr.free_symbols}
        missing = [s.name for s in expr.free_symbols if sizes.get(s.name) is None]
        if missing:
            raise ValueError(f"layer {self.layer}: no value for size(s) {missing}")
        return float(expr.xreplace(subs))


def linear_costs(gm: fx.GraphModule, nodes: list[fx.Node]) -> tuple[list[LinearCost], dict[str, int]]:
    """The cost of each linear in ``nodes`` and the example sizes (readable name -> value)."""
    symbols = size_symbols(gm)
    costs = []
    for node in nodes:
        w = linear_weight(gm, node)
        n, k = w.shape
        costs.append(LinearCost(layer_name(node), n, k, w.element_size() * 8, _tokens_expr(node.args[0], symbols)))
    return costs, {sym.name: hint for sym, hint in symbols.values()}
