"""GPTQ weight rounding: pure tensor numerics, with no knowledge of graphs or modules.

GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"; the algorithm of AutoGPTQ) rounds a linear's weight
``W [N, K]`` one input column at a time and, after each column, spreads that column's
rounding error over the columns not rounded yet so that the layer's *output* error on the
calibration inputs stays small. The objective is the proxy loss

    L(Ŵ) = tr((Ŵ − W) H (Ŵ − W)ᵀ) = Σ_tokens ‖(Ŵ − W) x‖²,   H = Σ x xᵀ (float64, [K, K]),

which is what :func:`proxy_loss` computes. The compensation is the Optimal Brain Surgeon
update with the inverse Hessian, taken from the upper Cholesky factor ``U`` of
``(H + λ I)⁻¹``: after rounding column ``q`` with error ``e = (w_q − ŵ_q) / U_qq``, every
later column ``j`` moves by ``−e · U_qj``. Updates beyond the current block of
``block_size`` columns are applied lazily, once per block, as one matrix product.

Conventions here:

* Numerics: the Hessian, its dampening, inverse and Cholesky factors, the column loop and
  the proxy losses are computed in float64 (the sizes of one linear make this cheap on a
  CPU, and it keeps rounding decisions independent of accumulated float32 error, which a
  float64 reference can check code for code). Grids (scales, zero points) are float32,
  exactly as stored; the codes are rounded from the float64 working weights.
* Dead input channels (``H_ii == 0``: the channel is always 0 in calibration) get
  ``H_ii = 1`` and a zero weight column, as GPTQ does: their weights never touch the
  output, they are rounded to exactly 0, and no error is pushed into them. A singular
  Hessian yields finite results.
* Dampening ``λ = damp · mean(diag H)``; if the Cholesky factorization still fails, ``λ``
  is raised tenfold (up to :data:`MAX_DAMP_RAISES` times) and a :class:`GPTQWarning` says
  so; :attr:`GPTQResult.damp` holds the dampening used.
* Groups: the storage (:class:`qcompile.quantizers.QuantizedWeight`) needs groups of
  contiguous input channels. With ``act_order`` (columns rounded in order of decreasing
  ``H_ii``) a group's columns are visited out of order, so by default every group's grid
  is fixed from the (dead-column-zeroed) weight before the loop ("static groups",
  optionally range searched with ``clip_ratios``, weighted by ``diag H``). Without
  ``act_order`` the default is standard GPTQ: a group's grid is chosen when the loop
  reaches its first column, from the weights as updated by the compensation so far.
  ``act_order`` with ``static_groups=False`` combines both: groups are visited in order of
  decreasing ``Σ H_ii``, the columns of each group together in order of decreasing
  ``H_ii``, and each group's grid is chosen when the loop reaches it.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from scipy.linalg import lapack as scipy_lapack

from .quantizers import (
    QuantizedWeight,
    WeightGrid,
    grid_storage_bits,
    quantized_weight_from_codes,
    round_to_grid,
    row_blocks,
    weight_grid,
)

__all__ = [
    "GPTQResult", "GPTQWarning", "gptq_quantize", "proxy_loss", "rtn_proxy_loss", "rtn_dequantized",
    "MAX_DAMP_RAISES",
]

MAX_DAMP_RAISES = 8


class GPTQWarning(UserWarning):
    """GPTQ had to raise the Hessian dampening to factorize it."""


@dataclass(frozen=True, eq=False)
class GPTQResult:
    """What :func:`gptq_quantize` made.

    Attributes:
        qweight: the rounded weight, in the same storage as RTN's.
        loss: the proxy loss ``tr(ΔW H ΔWᵀ)`` of ``qweight`` against the original weight
            with the undampened Hessian (float64, as a Python float).
        damp: the relative dampening finally used.
        damp_requested: the relative dampening asked for; ``damp`` is larger when the
            factorization needed more (a :class:`GPTQWarning` was issued).
        dead_channels: input channels with ``H_ii == 0`` (their weights were zeroed).
    """

    qweight: QuantizedWeight
    loss: float
    damp: float
    damp_requested: float
    dead_channels: int

    @property
    def damp_raised(self) -> bool:
        return self.damp != self.damp_requested


def proxy_loss(w: torch.Tensor, w_hat: torch.Tensor | None, hessian: torch.Tensor) -> float:
    """``tr((ŵ − w) H (ŵ − w)ᵀ)`` in float64: the summed squared output error over the
    calibration tokens whose ``Σ x xᵀ`` is ``hessian``. ``w_hat=None`` is the zero weight
    (``tr(W H Wᵀ)``, the output's energy). Computed a block of rows at a time (float64
    temporaries of :data:`qcompile.quantizers.ROW_BLOCK_ELEMENTS` elements, not ``[N, K]``)."""
    return _rows_proxy_loss(w, (lambda rows: None) if w_hat is None else (lambda rows: w_hat[rows]), hessian)


def rtn_proxy_loss(w: torch.Tensor, grid: WeightGrid, hessian: torch.Tensor) -> float:
    """:func:`proxy_loss` of :func:`rtn_dequantized` ``(w, grid)``, a block of rows at a time."""
    return _rows_proxy_loss(w, lambda rows: rtn_dequantized(w[rows], _grid_rows(grid, rows)), hessian)


def rtn_dequantized(w: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    """``w`` rounded to the nearest point of ``grid`` and dequantized, float64 ``[N, K]``: what
    :func:`qcompile.quantizers.quantize_weight_rtn` stores when ``grid`` is its grid (rounded
    in float32 like it)."""
    expand = lambda t: t.repeat_interleave(grid.group_size, dim=1)  # noqa: E731
    codes = round_to_grid(w.detach().to(torch.float32), expand(grid.scales), expand(grid.zero_points),
                          grid.code_min, grid.code_max)
    return _dequantize64(codes, grid)


def _rows_proxy_loss(w: torch.Tensor, w_hat_rows: Callable[[slice], torch.Tensor | None],
                     hessian: torch.Tensor) -> float:
    h = hessian.detach().to(torch.float64)
    total = 0.0
    for rows in row_blocks(*w.shape):
        w_hat = w_hat_rows(rows)
        delta = -w[rows].detach().to(torch.float64) if w_hat is None else (
            w_hat.detach().to(torch.float64) - w[rows].detach().to(torch.float64))
        total += float(((delta @ h) * delta).sum())
    return total


def _grid_rows(grid: WeightGrid, rows: slice) -> WeightGrid:
    """The grid of rows ``rows`` of its weight."""
    return dataclasses.replace(grid, scales=grid.scales[rows], zeros=None if grid.zeros is None else grid.zeros[rows])


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
    clip_ratios: tuple[float, ...] | None = None,
    clip_weighted: bool = True,
    static_groups: bool | None = None,
    grid: WeightGrid | None = None,
) -> GPTQResult:
    """Round ``w [N, K]`` with GPTQ against ``hessian = Σ x xᵀ [K, K]``.

    Args:
        w: floating-point weight ``[out_features, in_features]``.
        hessian: ``[K, K]`` symmetric positive semi-definite (finite; any float dtype,
            used as float64). Its scale does not matter (dampening is relative).
        bits: the grid: 8, 4 or 3 (3-bit grids are stored as 4-bit codes 0..7, like
            ``quantize_weight_rtn(..., bits=4, grid_bits=3)``).
        group_size: input channels per grid; must divide K; None = per output channel.
        symmetric: symmetric or asymmetric grids (as :func:`quantize_weight_rtn`).
        damp: dampening as a fraction of ``mean(diag H)``, > 0.
        act_order: round columns in order of decreasing ``H_ii`` (with dynamic group grids:
            groups in order of decreasing ``Σ H_ii``, columns within each group by ``H_ii``).
        block_size: columns per lazy batch update (speed only).
        clip_ratios: range search for the grids (as in :func:`quantize_weight_rtn`), its
            error weighted per input channel by ``H_ii``; applies to static grids and to
            the grids chosen as the loop reaches each group.
        clip_weighted: weigh the range search's error per input channel by ``H_ii`` (the
            output error under a diagonal approximation of H); False = plain weight error.
        static_groups: choose every group's grid before the loop; False: each group's grid
            when the loop reaches the group, from its weights as compensated so far. None =
            static exactly when ``act_order``.
        grid: static grids chosen by the caller (e.g. the grid its RTN already searched,
            :func:`qcompile.quantizers.weight_grid` of the same weight and arguments), used
            as they are instead of choosing them here (``clip_ratios`` is then unused);
            implies static groups.

    Returns a :class:`GPTQResult` (``.qweight`` is the :class:`QuantizedWeight`).
    Raises ValueError for a Hessian of the wrong shape or with non-finite values, and for
    the arguments :func:`quantize_weight_rtn` rejects.
    """
    storage = grid_storage_bits(bits)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"weight must be a 2-D [out_features, in_features] tensor, got {getattr(w, 'shape', w)!r}")
    n, k = w.shape
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}] for a weight of shape {tuple(w.shape)}, "
                         f"got {tuple(getattr(hessian, 'shape', ()))}")
    if not hessian.is_floating_point() or not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian must be a finite floating-point tensor")
    if bool((torch.diagonal(hessian) < 0).any()):
        raise ValueError("hessian has negative diagonal entries: it is not Σ x xᵀ (positive semi-definite)")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp > 0:
        raise ValueError(f"damp must be a positive number, got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    group = k if group_size is None else group_size
    static = act_order if static_groups is None else bool(static_groups)
    if grid is not None:
        _check_grid(grid, n, k, storage, bits, group, symmetric)
        if static_groups is False:
            raise ValueError("a given grid is static: it cannot be combined with static_groups=False")
        static = True

    h_orig = hessian.detach().to(torch.float64)
    diag = torch.diagonal(h_orig).clone()  # H with dead channels' H_ii = 1 (set in h below)
    dead = diag == 0
    diag[dead] = 1.0
    importance = torch.diagonal(h_orig).float() if clip_ratios and clip_weighted else None
    perm = _visit_order(diag, group, act_order, static)
    u, used_damp = _inverse_cholesky(lambda: _permuted_hessian(h_orig, perm, dead[perm]), float(damp))
    col_group = torch.div(perm, group, rounding_mode="floor").tolist()  # the group of each visited column
    unpermute = torch.argsort(perm)

    def grid_of(cols: torch.Tensor, imp: torch.Tensor | None, size: int | None) -> WeightGrid:
        return weight_grid(cols, storage, size, symmetric, grid_bits=bits, clip_ratios=clip_ratios, importance=imp)

    codes = torch.empty((n, k), dtype=torch.int8)  # every grid's codes fit in int8 (stored code space)
    scales, zeros = [], []
    for rows in row_blocks(n, k):
        weight = w[rows].detach().to(torch.float64, copy=True)
        weight[:, dead] = 0.0
        # the rows' grids [rows, G] (filled as the loop goes for dynamic groups)
        block_grid = grid_of(weight, importance, group_size) if grid is None else _grid_rows(grid, rows)
        code_range = (block_grid.code_min, block_grid.code_max)
        block_scales, block_zeros = block_grid.scales.clone(), block_grid.zero_points.clone()
        block_codes = _round_columns(weight[:, perm], u, col_group, block_scales, block_zeros, code_range,
                                     block_size, None if static else group,
                                     lambda cols, visited: grid_of(cols, None if importance is None
                                                                   else importance[perm[visited]], None))
        del weight
        codes[rows] = block_codes[:, unpermute].to(torch.int8)
        scales.append(block_scales)
        zeros.append(block_zeros)

    final = WeightGrid(scales=torch.cat(scales), zeros=None if block_grid.zeros is None else torch.cat(zeros),
                       code_min=code_range[0], code_max=code_range[1], bits=storage, grid_bits=bits, group_size=group,
                       in_features=k, symmetric=symmetric)
    qweight = quantized_weight_from_codes(codes, final)
    loss = _rows_proxy_loss(w, lambda rows: _dequantize64(codes[rows], _grid_rows(final, rows)), h_orig)
    return GPTQResult(qweight=qweight, loss=loss, damp=used_damp, damp_requested=float(damp),
                      dead_channels=int(dead.sum()))


def _round_columns(
    weight: torch.Tensor,
    u: torch.Tensor,
    col_group: list[int],
    scales: torch.Tensor,
    zeros: torch.Tensor,
    code_range: tuple[int, int],
    block_size: int,
    dynamic_group: int | None,
    fresh_grid: Callable[[torch.Tensor, slice], WeightGrid],
) -> torch.Tensor:
    """GPTQ's column loop over rows of the weight in visiting order (float64, updated in
    place): the codes ``[rows, K]`` (float64, visiting order). With ``dynamic_group`` each
    group's grid is chosen by ``fresh_grid(columns, visited slice)`` when the loop reaches
    it and written into ``scales`` / ``zeros`` (``[rows, G]``)."""
    k = weight.shape[1]
    codes = torch.zeros_like(weight)
    for start, end in _blocks(k, block_size, dynamic_group):
        w1 = weight[:, start:end].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[start:end, start:end]
        for i in range(end - start):
            col = start + i
            g = col_group[col]
            if dynamic_group is not None and col % dynamic_group == 0:
                # standard GPTQ: the group's grid from its weights as compensated so far (the
                # group's columns are contiguous in the visiting order and start a block, and
                # every earlier block has been applied in full)
                visited = slice(col, col + dynamic_group)
                fresh = fresh_grid(weight[:, visited], visited)
                scales[:, g] = fresh.scales[:, 0]
                zeros[:, g] = fresh.zero_points[:, 0]
            column = w1[:, i]
            s, z = scales[:, g], zeros[:, g]
            q = round_to_grid(column, s, z, *code_range)
            codes[:, col] = q
            err = (column - (q - z.double()) * s.double()) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = err
        weight[:, end:] -= err1 @ u[start:end, end:]
    return codes


def _check_grid(grid: WeightGrid, n: int, k: int, storage: int, bits: int, group: int, symmetric: bool) -> None:
    expected = (n, k, storage, bits, group, symmetric)
    got = (grid.out_features, grid.in_features, grid.bits, grid.grid_bits, grid.group_size, grid.symmetric)
    if got != expected:
        names = "(out_features, in_features, bits, grid_bits, group_size, symmetric)"
        raise ValueError(f"the given grid {names} = {got} does not fit this call's {expected}")


def _dequantize64(codes: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    """``(code − zero) · scale`` in float64 (exact: small integers times float32 values)."""
    expand = lambda t: t.to(torch.float64).repeat_interleave(grid.group_size, dim=1)  # noqa: E731
    return (codes.to(torch.float64) - expand(grid.zero_points)) * expand(grid.scales)


def _visit_order(diag: torch.Tensor, group: int, act_order: bool, static: bool) -> torch.Tensor:
    """The order columns are rounded in (a permutation of 0..K-1).

    Column order without ``act_order``; decreasing ``H_ii`` with it. With groups chosen as
    the loop goes (not static), a group's columns must be visited together, so activation
    order is applied twice: groups by decreasing ``Σ H_ii``, and columns within a group by
    decreasing ``H_ii``.
    """
    k = diag.numel()
    if not act_order:
        return torch.arange(k)
    if static or group >= k:
        return torch.argsort(diag, descending=True, stable=True)
    per_group = diag.reshape(k // group, group)
    groups = torch.argsort(per_group.sum(dim=1), descending=True, stable=True)
    within = torch.argsort(per_group, dim=1, descending=True, stable=True)
    return (groups.unsqueeze(1) * group + within[groups]).reshape(-1)


def _blocks(k: int, block_size: int, group: int | None) -> list[tuple[int, int]]:
    """Column ranges of the lazy updates; with dynamic groups every group starts a block."""
    cuts = set(range(0, k, block_size)) | (set(range(0, k, group)) if group else set())
    edges = sorted(cuts) + [k]
    return list(zip(edges[:-1], edges[1:]))


def _permuted_hessian(h: torch.Tensor, perm: torch.Tensor, dead: torch.Tensor, rows: int = 512) -> torch.Tensor:
    """``h[perm][:, perm]`` with the diagonal of the ``dead`` (permuted) channels set to 1,
    gathered a block of rows at a time (no second ``[K, K]`` temporary)."""
    out = torch.empty_like(h)
    for start in range(0, h.shape[0], rows):
        out[start:start + rows] = h[perm[start:start + rows]][:, perm]
    torch.diagonal(out)[dead] = 1.0
    return out


def _inverse_cholesky(make_h: Callable[[], torch.Tensor], damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + λ I)⁻¹`` (float64, ``(H + λI)⁻¹ = Uᵀ U``) and the
    relative dampening used.

    ``make_h()`` returns a fresh copy of ``H`` (it is overwritten, and made again if the
    dampening must be raised). No inverse is formed and no second ``[K, K]`` matrix is
    allocated (K = 5632 float64: 254 MB each): with ``J`` the order-reversing permutation,
    factor ``J (H + λI) J = M Mᵀ`` (``M`` lower) in place; then ``H + λI = R Rᵀ`` with
    ``R = J M J`` upper, so ``(H + λI)⁻¹ = R⁻ᵀ R⁻¹`` and ``U = R⁻¹ = J M⁻¹ J``: one in-place
    triangular inverse (LAPACK ``trtri``) and a reversal of the matrix's storage. Half the
    arithmetic of inverting and factorizing again, and one matrix of memory instead of three.
    """
    damped = make_h()
    k = damped.shape[0]
    mean_diag = float(torch.diagonal(damped).mean())
    reverse = torch.arange(k - 1, -1, -1)
    tried = damp
    for attempt in range(MAX_DAMP_RAISES + 1):
        if damped is None:
            damped = make_h()
        damped.diagonal().add_(tried * mean_diag)
        u = _reversed_inverse_factor(damped, reverse)
        damped = None
        if u is not None:
            if attempt:
                warnings.warn(
                    f"GPTQ: the dampened Hessian ({k}x{k}) was not positive definite with "
                    f"damp={damp:g}; used damp={tried:g} (x mean diag H = {mean_diag:.3g})",
                    GPTQWarning, stacklevel=3,
                )
            return u, tried
        tried *= 10.0
    raise ValueError(
        f"GPTQ: the Hessian ({k}x{k}) stays non positive definite with dampening up to "
        f"{tried / 10:g} x mean diag H = {mean_diag:.3g}; is it Σ x xᵀ of real inputs?"
    )


def _reversed_inverse_factor(a: torch.Tensor, reverse: torch.Tensor) -> torch.Tensor | None:
    """``U = J M⁻¹ J`` for the symmetric ``a = H + λI`` (overwritten), or None when ``a`` is not
    positive definite (see :func:`_inverse_cholesky`)."""
    if a.device.type != "cpu":  # no in-place LAPACK from here: the same algebra with copies
        m, info = torch.linalg.cholesky_ex(a[reverse][:, reverse])
        if int(info) != 0:
            return None
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        return torch.linalg.solve_triangular(m, eye, upper=False).flip(0, 1)
    # J a J, reversed in place: a C-contiguous matrix flipped along both axes is its storage
    # reversed
    _reverse_storage(a)
    # a.mT is column-major, as LAPACK wants, and equals a (symmetric): factorized in place
    column_major = a.mT
    info = torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(column_major, out=(column_major, info))
    if int(info) != 0:
        return None
    m = column_major.numpy()  # M (lower), a view of the same memory, Fortran order
    m_inv, info = scipy_lapack.dtrtri(m, lower=1, overwrite_c=1)
    if info != 0 or m_inv.ctypes.data != m.ctypes.data:  # neither can happen for a Cholesky factor
        raise RuntimeError(f"GPTQ: LAPACK dtrtri failed in place on the Cholesky factor (info {info})")
    # the row-major storage of `a` now holds (M⁻¹)ᵀ; reversed it holds (J M⁻¹ J)ᵀ = Uᵀ
    _reverse_storage(a)
    return a.mT


def _reverse_storage(a: torch.Tensor, chunk: int = 1 << 20) -> None:
    """Reverse the elements of the contiguous ``a`` in place, ``chunk`` elements at a time
    (for a matrix: flip both axes)."""
    flat = a.view(-1).numpy()
    n = flat.size
    for start in range(0, n // 2, chunk):
        size = min(chunk, n // 2 - start)
        left = flat[start:start + size].copy()
        flat[start:start + size] = flat[n - start - size:n - start][::-1]
        flat[n - start - size:n - start] = left[::-1]
