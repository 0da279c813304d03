"""Activation quantization and 8-bit weights for W8A8 / FP8 linears: pure tensor numerics.

Nothing here knows about graphs, modules or custom ops; the ops in
``qcompile.kernels.quantize_per_token`` and ``qcompile.kernels.linear_w8a8`` call these
functions as their references.

Activations ``x [..., K]`` are quantized symmetrically, one scale per token (per row of
the flattened ``[M, K]`` matrix), after an optional division by a per-channel smoothing
vector ``s [K]`` ("online smoothing": ``x / s`` is quantized, and the weight it meets was
multiplied by ``s`` along K, as in SmoothQuant, so the product is unchanged):

* ``format="int", bits=8``: codes ``int8`` in [-127, 127], ``scale = absmax / 127``;
* ``format="int", bits=4``: codes in [-7, 7], stored as ``int8``, ``scale = absmax / 7``;
* ``format="fp8"`` (``bits`` must be 8): codes ``float8_e4m3fn``, ``scale = absmax / 448``
  (448 is the largest finite e4m3fn value).

``x ≈ codes * scale`` with ``scales`` float32 ``[..., 1]``. Integer codes are
``clamp(round(x / scale), -qmax, qmax)`` (round half to even, as ``torch.round``); fp8
codes are ``clamp(x / scale, -448, 448)`` rounded to e4m3fn by the cast (the clamp makes
the cast saturate the same way on every torch version). All arithmetic is float32.

Every row whose scale would fall below the smallest normal float32 (an all-zero row, or
denormal dust) gets scale 1.0, so its codes are 0 and nothing divides by zero; the same
guard as :mod:`qcompile.quantizers`. A static per-tensor scale (from calibration) gets the
same guard. Non-finite inputs are not checked (that would need a pass over the values on
every call): a row holding NaN or Inf gets a NaN or Inf scale and meaningless codes.

Weights for these linears are quantized per output channel (one scale per row of
``W [N, K]``): :func:`quantize_weight_per_channel_int8` (codes in [-127, 127], via
:func:`qcompile.quantizers.quantize_weight_rtn`) and :func:`quantize_weight_fp8`
(e4m3fn codes, ``scale = row absmax / 448``). Their scales are float32 ``[N]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from qcompile.quantizers import _as_float32_matrix, quantize_weight_rtn

__all__ = [
    "ActQuantWeight",
    "ACT_FORMATS",
    "INT_ACT_BITS",
    "FP8_DTYPE",
    "FP8_MAX",
    "INT8_QMAX",
    "act_qmax",
    "check_act_format",
    "codes_dtype",
    "divide_by_constant",
    "usable_scale",
    "smooth_activation",
    "quantize_activation_per_token",
    "quantize_activation_static",
    "dequantize_activation",
    "quantize_weight_per_channel_int8",
    "quantize_weight_fp8",
    "dequantize_weight_per_channel",
]

ACT_FORMATS = ("int", "fp8")
INT_ACT_BITS = (8, 4)
_INT_QMAX = {8: 127, 4: 7}
INT8_QMAX = _INT_QMAX[8]
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
# Same guard as qcompile.quantizers: a scale below the smallest normal float32 is replaced by 1.
_MIN_SCALE = torch.finfo(torch.float32).tiny


def check_act_format(bits: int, format: str) -> None:
    """Raise ValueError unless (bits, format) is ("int", 8), ("int", 4) or ("fp8", 8)."""
    if not isinstance(format, str) or format not in ACT_FORMATS:
        raise ValueError(f"format must be one of {ACT_FORMATS}, got {format!r}")
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"bits must be an int, got {bits!r}")
    if format == "int" and bits not in INT_ACT_BITS:
        raise ValueError(f'format="int" supports bits in {INT_ACT_BITS}, got bits={bits}')
    if format == "fp8" and bits != 8:
        raise ValueError(f'format="fp8" (e4m3fn) needs bits=8, got bits={bits}')


def act_qmax(bits: int, format: str) -> float:
    """The largest code magnitude: 127 (int8), 7 (int4) or 448 (fp8 e4m3fn)."""
    check_act_format(bits, format)
    return FP8_MAX if format == "fp8" else float(_INT_QMAX[bits])


def codes_dtype(format: str) -> torch.dtype:
    """The dtype codes are stored in: int8 for ``"int"`` (both 8 and 4 bits), e4m3fn for fp8."""
    return FP8_DTYPE if format == "fp8" else torch.int8


def smooth_activation(x: torch.Tensor, smooth: Optional[torch.Tensor]) -> torch.Tensor:
    """``x / smooth`` along the last dimension, in float32 (a float32 copy of x if no smooth)."""
    xs = x.to(torch.float32)
    if smooth is not None:
        xs = xs / smooth.to(torch.float32)
    return xs


def divide_by_constant(t: torch.Tensor, c: float) -> torch.Tensor:
    """``t / c``, correctly rounded on every device.

    The constant is passed as a 0-d tensor on t's device: CUDA turns a division by a Python
    (CPU) scalar into a multiplication by its reciprocal, which differs from ``t / c`` in
    the last bit for about half of all values (seen with torch 2.11 on an H100), and so
    would make the CUDA codes differ from the CPU ones.
    """
    return t / torch.full((), c, dtype=t.dtype, device=t.device)


def usable_scale(scale: torch.Tensor) -> torch.Tensor:
    """Replace scales below the smallest normal float32 (and zeros) by 1.0."""
    return torch.where(scale < _MIN_SCALE, torch.ones_like(scale), scale)


def _round_to_codes(scaled: torch.Tensor, bits: int, format: str) -> torch.Tensor:
    qmax = act_qmax(bits, format)
    if format == "fp8":
        return torch.clamp(scaled, -qmax, qmax).to(FP8_DTYPE)
    return torch.clamp(torch.round(scaled), -qmax, qmax).to(torch.int8)


def quantize_activation_per_token(
    x: torch.Tensor,
    smooth: Optional[torch.Tensor] = None,
    bits: int = 8,
    format: str = "int",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token quantization of ``x [..., K]`` (optionally ``x / smooth``).

    Returns ``(codes [..., K], scales [..., 1] float32)`` with ``x / smooth ≈ codes * scales``
    (see the module docstring for the formats). Each element of an integer format is
    reproduced to within half its row's scale; fp8 to within 2**-4 of its magnitude (3
    mantissa bits) or, below 2**-6 * scale (e4m3fn subnormals), within 2**-10 * scale.
    Shapes are not validated here; the op ``qcompile::quantize_per_token`` does that.
    """
    check_act_format(bits, format)
    xs = smooth_activation(x, smooth)
    absmax = xs.abs().amax(dim=-1, keepdim=True)
    scales = usable_scale(divide_by_constant(absmax, act_qmax(bits, format)))
    return _round_to_codes(xs / scales, bits, format), scales


def quantize_activation_static(
    x: torch.Tensor,
    act_scale: torch.Tensor,
    smooth: Optional[torch.Tensor] = None,
    bits: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static symmetric per-tensor integer quantization with a calibrated ``act_scale``.

    ``act_scale`` (0-d or ``[1]``) is the scale of ``x / smooth``, typically
    ``absmax over calibration / 127``; values beyond its range saturate at ±qmax. Returns
    ``(codes int8 [..., K], scale float32 [1, 1])``, the scale after the zero guard.
    """
    check_act_format(bits, "int")
    scale = usable_scale(act_scale.to(torch.float32).reshape(1, 1))
    xs = smooth_activation(x, smooth)
    return _round_to_codes(xs / scale, bits, "int"), scale


def dequantize_activation(
    codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``codes * scales`` in float32 (float64 if ``dtype`` is float64: then exact), as ``dtype``."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return (codes.to(compute) * scales.to(compute)).to(dtype)


def quantize_weight_per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 weights for ``qcompile::linear_w8a8``.

    ``w [N, K]`` -> ``(codes int8 [N, K] in [-127, 127], scales float32 [N])``, scale =
    row absmax / 127 (1.0 for an all-zero row). This is
    ``quantize_weight_rtn(w, 8, None, True)`` with its ``[N, 1]`` scales flattened.
    """
    qw = quantize_weight_rtn(w, 8, None, True)
    return qw.qweight, qw.scales.reshape(-1)


def quantize_weight_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel fp8 (e4m3fn) weights for ``qcompile::linear_fp8``.

    ``w [N, K]`` -> ``(codes float8_e4m3fn [N, K], scales float32 [N])`` with scale = row
    absmax / 448 (1.0 for an all-zero row), codes = ``w / scale`` rounded to e4m3fn.
    Raises TypeError for a non-floating weight and ValueError for a non-2-D, empty or
    non-finite one.
    """
    w32 = _as_float32_matrix(w)
    scales = usable_scale(divide_by_constant(w32.abs().amax(dim=1), FP8_MAX))
    codes = torch.clamp(w32 / scales.unsqueeze(1), -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scales


def dequantize_weight_per_channel(
    codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``codes [N, K] * scales [N, None]`` in float32 (float64 if ``dtype`` is float64), as ``dtype``."""
    return dequantize_activation(codes, scales.reshape(-1, 1), dtype)


@dataclass
class ActQuantWeight:
    """A linear's weights for an activation-quantized op, and its activation format.

    ``format`` ``"int8"``: ``qweight`` int8 ``[N, K]`` (symmetric, codes in [-127, 127]),
    for ``qcompile::linear_w8a8``; ``act_scale`` is the static per-tensor activation
    scale (float32 0-d) or None for dynamic per-token scales. ``"fp8"``: ``qweight``
    float8_e4m3fn ``[N, K]`` for ``qcompile::linear_fp8``. ``wscales`` float32 ``[N]``.
    """

    qweight: torch.Tensor
    wscales: torch.Tensor
    format: str
    act_scale: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        expected = {"int8": torch.int8, "fp8": FP8_DTYPE}
        if self.format not in expected:
            raise ValueError(f"format must be 'int8' or 'fp8', got {self.format!r}")
        if self.qweight.dtype != expected[self.format] or self.qweight.dim() != 2:
            raise ValueError(f"{self.format} weights must be {expected[self.format]} [N, K], got "
                             f"{self.qweight.dtype} {tuple(self.qweight.shape)}")
        if tuple(self.wscales.shape) != (self.qweight.shape[0],) or self.wscales.dtype != torch.float32:
            raise ValueError(f"wscales must be float32 [{self.qweight.shape[0]}], got "
                             f"{self.wscales.dtype} {tuple(self.wscales.shape)}")
        if self.act_scale is not None and self.format != "int8":
            raise ValueError("a static activation scale applies to int8 activations only")

    @property
    def nbytes(self) -> int:
        extra = 4 if self.act_scale is not None else 0
        return self.qweight.numel() * self.qweight.element_size() + self.wscales.numel() * 4 + extra

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight_per_channel(self.qweight, self.wscales, dtype)

    def fake_quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the op's activation quantization makes of ``x`` (already smoothed), float32."""
        if self.format == "fp8":
            return dequantize_activation(*quantize_activation_per_token(x, None, 8, "fp8"))
        if self.act_scale is not None:
            return dequantize_activation(*quantize_activation_static(x, self.act_scale))
        return dequantize_activation(*quantize_activation_per_token(x, None, 8, "int"))
