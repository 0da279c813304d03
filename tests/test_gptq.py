"""GPTQ (qcompile.gptq), 3-bit grids, and the quantize_weights pass with method="gptq".

The GPTQ numerics are checked code for code against a naive reference written here in
float64 (one column at a time, the inverse Hessian of the not-yet-rounded columns
updated explicitly after each column, no Cholesky, no blocks). Inputs are fresh random
correlated activations each run; shapes are odd (N = 17, K = 96).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import qcompile
from qcompile.errors import CalibrationError
import qcompile.quantizers as quantizers
from qcompile.gptq import GPTQWarning, gptq_quantize, proxy_loss, rtn_dequantized, rtn_proxy_loss
from qcompile.graph_utils import QWEIGHT_META
from qcompile.quantizers import (
    dequantize_weight,
    quantize_weight_rtn,
    round_to_grid,
    unpack_int4,
    weight_grid,
)
from qcompile.testing import count_ops, relative_error
from tests.models import zoo

N, K = 17, 96


def _gen() -> torch.Generator:
    gen = torch.Generator()
    gen.seed()
    return gen


def _correlated_hessian(gen: torch.Generator, k: int = K, tokens: int = 400) -> torch.Tensor:
    """Σ x xᵀ of activations with correlated channels and uneven channel magnitudes."""
    mix = torch.randn(k, k, generator=gen, dtype=torch.float64) / k**0.5 + torch.eye(k, dtype=torch.float64)
    gains = torch.rand(k, generator=gen, dtype=torch.float64) * 3 + 0.1
    x = torch.randn(tokens, k, generator=gen, dtype=torch.float64) @ mix * gains
    return x.T @ x


def _codes(qw) -> torch.Tensor:
    return (qw.qweight.to(torch.int64) if qw.bits == 8 else unpack_int4(qw.qweight, qw.in_features).to(torch.int64))


def _storage(bits: int) -> int:
    return 4 if bits == 3 else bits


def _reference_gptq(w, hessian, bits, group_size, symmetric, *, damp=0.01, act_order=True, static_groups=None):
    """Naive GPTQ in float64: visit columns one at a time; after rounding column q, move every
    not-yet-rounded column j by -(w_q - ŵ_q) · Hinv[q, j] / Hinv[q, q] and remove q from the
    inverse Hessian, Hinv ← Hinv − Hinv[:, q] Hinv[q, :] / Hinv[q, q] (Optimal Brain Surgeon)."""
    k = w.shape[1]
    group = k if group_size is None else group_size
    static = act_order if static_groups is None else static_groups
    h = hessian.clone().to(torch.float64)
    wk = w.clone().to(torch.float64)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    wk[:, dead] = 0.0
    grid = weight_grid(wk, _storage(bits), group_size, symmetric, grid_bits=bits)
    scales, zeros = grid.scales.clone(), grid.zero_points.clone()
    d = torch.diagonal(h)
    if not act_order:
        order = list(range(k))
    elif static or group == k:
        order = torch.argsort(d, descending=True, stable=True).tolist()
    else:  # groups by decreasing Σ H_ii, within a group by decreasing H_ii
        sums = [float(d[g * group:(g + 1) * group].sum()) for g in range(k // group)]
        groups = sorted(range(k // group), key=lambda g: -sums[g])  # sorted() is stable
        order = [g * group + int(j) for g in groups
                 for j in torch.argsort(d[g * group:(g + 1) * group], descending=True, stable=True)]
    hinv = torch.linalg.inv(h + damp * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64))
    codes = torch.zeros_like(wk)
    left = set(range(k))
    for q in order:
        g = q // group
        if not static and not any(j // group == g for j in range(k) if j not in left):  # the group's first visit
            fresh = weight_grid(wk[:, g * group:(g + 1) * group], _storage(bits), None, symmetric, grid_bits=bits)
            scales[:, g], zeros[:, g] = fresh.scales[:, 0], fresh.zero_points[:, 0]
        codes[:, q] = round_to_grid(wk[:, q], scales[:, g], zeros[:, g], grid.code_min, grid.code_max)
        err = wk[:, q] - (codes[:, q] - zeros[:, g].double()) * scales[:, g].double()
        left.discard(q)
        rest = sorted(left)
        wk[:, rest] -= torch.outer(err / hinv[q, q], hinv[q, rest])
        hinv = hinv - torch.outer(hinv[:, q], hinv[q, :]) / hinv[q, q]
    return codes.to(torch.int64), scales


# Both sides round float64 values onto the same float32 grid; the Cholesky form and the
# explicit inverse agree to ~1e-12 relative, so a code can differ only where a working
# weight lies within ~1e-12 steps of a rounding boundary: never in practice. Exact codes.
@pytest.mark.parametrize(
    "bits, group_size, symmetric, act_order, static_groups",
    [
        (4, 32, False, True, None),
        (4, 32, True, False, None),  # standard GPTQ: grids chosen as the loop reaches each group
        (4, 32, False, False, True),
        (4, 32, True, True, False),  # act order within groups visited by Σ H_ii, grids as reached
        (3, 32, False, True, None),
        (3, 48, True, False, None),
        (8, None, True, True, None),
        (8, None, False, False, None),
    ],
)
def test_codes_match_a_naive_float64_reference(bits, group_size, symmetric, act_order, static_groups):
    gen = _gen()
    h = _correlated_hessian(gen)
    w = torch.randn(N, K, generator=gen)
    # block 40 does not divide K, nor align with the groups: blocks cut at group starts
    got = gptq_quantize(w, h, bits, group_size, symmetric, act_order=act_order, block_size=40,
                        static_groups=static_groups)
    codes, scales = _reference_gptq(w, h, bits, group_size, symmetric, act_order=act_order,
                                    static_groups=static_groups)
    assert got.qweight.bits == _storage(bits) and got.qweight.symmetric == symmetric
    assert torch.equal(got.qweight.scales, scales)
    assert torch.equal(_codes(got.qweight), codes)


def test_block_size_changes_nothing_but_speed():
    gen = _gen()
    h = _correlated_hessian(gen)
    w = torch.randn(N, K, generator=gen)
    runs = [gptq_quantize(w, h, 4, 32, False, block_size=b) for b in (1, 7, 32, 128)]
    for r in runs[1:]:  # float64 sums in another order: same codes (see the reference test)
        assert torch.equal(r.qweight.qweight, runs[0].qweight.qweight)
        assert r.loss == pytest.approx(runs[0].loss, rel=1e-9)


@pytest.mark.parametrize(
    "bits, group_size, symmetric",
    [(4, 32, False), (4, 32, True), (3, 32, False), (3, 32, True), (8, None, True), (4, None, False)],
)
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_proxy_loss_beats_rtn_on_correlated_inputs(bits, group_size, symmetric, act_order):
    gen = _gen()
    h = _correlated_hessian(gen)
    w = torch.randn(N, K, generator=gen)
    got = gptq_quantize(w, h, bits, group_size, symmetric, act_order=act_order)
    rtn = quantize_weight_rtn(w, _storage(bits), group_size, symmetric, grid_bits=bits)
    rtn_loss = proxy_loss(w, dequantize_weight(rtn, torch.float64), h)
    # the reported loss is the loss of what is stored (float64 both; summation order differs)
    assert got.loss == pytest.approx(proxy_loss(w, dequantize_weight(got.qweight, torch.float64), h), rel=1e-9)
    # GPTQ is greedy, not optimal, so no theorem; on correlated inputs it measures 0.3-0.6x
    # RTN's loss here (act order lower), so 0.9 leaves a wide margin for the random draw
    assert got.loss < 0.9 * rtn_loss, (got.loss, rtn_loss)
    assert got.damp == 0.01 and not got.damp_raised and got.dead_channels == 0


@pytest.mark.parametrize(
    "bits, group_size, symmetric, act_order, static_groups, ratios",
    [
        (4, 32, False, True, None, (1.0, 0.9, 0.8)),  # static searched grids
        (3, 32, True, False, None, None),  # dynamic grids, chosen as the loop goes
        (4, 32, False, True, False, (1.0, 0.85)),  # act order, dynamic searched grids
        (8, None, True, True, None, None),  # symmetric 8-bit: no stored zero points
        (8, None, False, False, None, None),
    ],
)
def test_blocks_of_rows_give_the_same_result_as_one_block(monkeypatch, bits, group_size, symmetric, act_order,
                                                         static_groups, ratios):
    """Large weights (an LM head) are rounded a block of rows at a time to bound memory:
    rows are independent in GPTQ, so the codes and grids must not change at all."""
    gen = _gen()
    h = _correlated_hessian(gen)
    n = 41  # blocks of 6 rows: 6 full blocks and a 5-row one
    w = torch.randn(n, K, generator=gen)
    h[7] = 0.0
    h[:, 7] = 0.0  # a dead channel
    args = dict(act_order=act_order, static_groups=static_groups, clip_ratios=ratios, block_size=40)
    whole = gptq_quantize(w, h, bits, group_size, symmetric, **args)
    grid = weight_grid(w, _storage(bits), group_size, symmetric, clip_ratios=ratios, grid_bits=bits)
    monkeypatch.setattr(quantizers, "ROW_BLOCK_ELEMENTS", 6 * K + 5)
    assert len(quantizers.row_blocks(n, K)) == 7
    blocked = gptq_quantize(w, h, bits, group_size, symmetric, **args)
    assert torch.equal(blocked.qweight.qweight, whole.qweight.qweight)
    assert torch.equal(blocked.qweight.scales, whole.qweight.scales)
    assert (blocked.qweight.zeros is None) == (whole.qweight.zeros is None) == (bits == 8 and symmetric)
    if whole.qweight.zeros is not None:
        assert torch.equal(blocked.qweight.zeros, whole.qweight.zeros)
    # the loss sums per-block float64 partial sums: another summation order only
    assert blocked.loss == pytest.approx(whole.loss, rel=1e-12)
    # the blocked range search and the blocked losses of the callers agree the same way
    blocked_grid = weight_grid(w, _storage(bits), group_size, symmetric, clip_ratios=ratios, grid_bits=bits)
    assert torch.equal(blocked_grid.scales, grid.scales)
    assert torch.equal(blocked_grid.zero_points, grid.zero_points)
    # the same float64 products summed per block of rows, then added: ~1e-15 apart; 1e-12
    # still fails if a block were skipped or counted twice
    w_hat = rtn_dequantized(w, grid)
    full = float((((w_hat - w.double()) @ h) * (w_hat - w.double())).sum())
    assert rtn_proxy_loss(w, grid, h) == pytest.approx(full, rel=1e-12)
    assert proxy_loss(w, None, h) == pytest.approx(float(((w.double() @ h) * w.double()).sum()), rel=1e-12)


def test_with_range_search_gptq_still_beats_the_searched_rtn():
    gen = _gen()
    h = _correlated_hessian(gen)
    w = torch.randn(N, K, generator=gen)
    w[3, 5] = 12.0  # an outlier the range search may clip
    ratios = (1.0, 0.9, 0.8, 0.7)
    got = gptq_quantize(w, h, 4, 32, False, clip_ratios=ratios)
    rtn = quantize_weight_rtn(w, 4, 32, False, clip_ratios=ratios, importance=torch.diagonal(h).float())
    assert got.loss < 0.9 * proxy_loss(w, dequantize_weight(rtn, torch.float64), h)
    # with act order the grids are the searched RTN grids of the original weight
    assert torch.equal(got.qweight.scales, rtn.scales) and torch.equal(got.qweight.zeros, rtn.zeros)
    # ... so a caller can hand GPTQ the grid its RTN searched, with the same result
    grid = weight_grid(w, 4, 32, False, clip_ratios=ratios, importance=torch.diagonal(h).float())
    given = gptq_quantize(w, h, 4, 32, False, grid=grid)
    assert torch.equal(given.qweight.qweight, got.qweight.qweight) and given.loss == got.loss
    # and the RTN baseline on that grid is exactly what quantize_weight_rtn stores
    assert torch.equal(rtn_dequantized(w, grid), dequantize_weight(rtn, torch.float64))
    with pytest.raises(ValueError, match="does not fit"):
        gptq_quantize(w, h, 3, 32, False, grid=grid)


@pytest.mark.parametrize("act_order", [True, False])
def test_dead_channels_and_singular_hessian_give_finite_zero_columns(act_order):
    gen = _gen()
    x = torch.randn(30, K, generator=gen, dtype=torch.float64)  # 30 tokens < K: rank-deficient
    dead = [0, 7, 50, 95]
    x[:, dead] = 0.0
    h = x.T @ x
    w = torch.randn(N, K, generator=gen)
    got = gptq_quantize(w, h, 4, 32, False, act_order=act_order)
    deq = dequantize_weight(got.qweight, torch.float64)
    assert bool(torch.isfinite(deq).all()) and bool(torch.isfinite(got.qweight.scales).all())
    assert bool((deq[:, dead] == 0).all())
    assert got.dead_channels == len(dead) and torch.isfinite(torch.tensor(got.loss))
    # an all-zero Hessian (no signal at all): every column dead, every weight 0
    none = gptq_quantize(w, torch.zeros(K, K, dtype=torch.float64), 3, 32, True, act_order=act_order)
    assert none.dead_channels == K and bool((dequantize_weight(none.qweight) == 0).all()) and none.loss == 0.0


def test_indefinite_hessian_raises_dampening_with_a_warning():
    # eigenvalues 4 and -2: damp 0.01, 0.1 and 1 (x mean diag = 1) leave it indefinite, 10 does not
    h = torch.tensor([[1.0, 3.0], [3.0, 1.0]], dtype=torch.float64)
    w = torch.tensor([[0.3, -0.7], [1.0, 0.2]])
    with pytest.warns(GPTQWarning, match="damp=10"):
        got = gptq_quantize(w, h, 8, None, True)
    assert got.damp_raised and got.damp == pytest.approx(10.0) and got.damp_requested == 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gptq_quantize(w, torch.eye(2, dtype=torch.float64), 8, None, True)  # no warning when none is needed


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hessian=torch.eye(5)), r"hessian must be \[96, 96\]"),
        (dict(hessian=torch.full((K, K), float("nan"))), "finite"),
        (dict(hessian=-torch.eye(K)), "negative diagonal"),
        (dict(bits=5), "bits"),
        (dict(group_size=40), "does not divide"),
        (dict(damp=0.0), "damp"),
        (dict(block_size=0), "block_size"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    args = dict(w=torch.randn(N, K), hessian=torch.eye(K), bits=4, group_size=32, symmetric=False)
    with pytest.raises(ValueError, match=match):
        gptq_quantize(**{**args, **kwargs})


# ---------------------------------------------------------------------------- 3-bit RTN grids

@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_three_bit_grids_in_the_four_bit_container(symmetric):
    gen = _gen()
    w = torch.randn(N, K, generator=gen, dtype=torch.float64)
    qw = quantize_weight_rtn(w, 4, 32, symmetric, grid_bits=3)
    codes = _codes(qw)
    assert qw.bits == 4 and qw.symmetric == symmetric
    if symmetric:  # absmax / 3, codes 1..7 around zero point 4, exactly like 4-bit's 1..15 around 8
        assert bool((qw.zeros == 4).all()) and codes.min() >= 1 and codes.max() <= 7
        absmax = w.abs().reshape(N, 3, 32).amax(-1)
        torch.testing.assert_close(qw.scales, (absmax / 3).float(), rtol=2**-23, atol=0)
    else:  # 7 steps between min(w, 0) and max(w, 0)
        assert codes.min() >= 0 and codes.max() <= 7 and qw.zeros.min() >= 0 and qw.zeros.max() <= 7
        groups = w.reshape(N, 3, 32)
        span = groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)
        torch.testing.assert_close(qw.scales, (span / 7).float(), rtol=2**-22, atol=0)
    # RTN: within half a step (plus float32 rounding of w / scale; see test_quantizers)
    err = (dequantize_weight(qw, torch.float64) - w).abs()
    assert bool((err <= qw.scales.double().repeat_interleave(32, 1) * (0.5 + 2**-14)).all())
    # 3-bit is coarser than 4-bit on the same weight
    four = quantize_weight_rtn(w, 4, 32, symmetric)
    assert (dequantize_weight(four, torch.float64) - w).norm() < err.norm()


def test_three_bit_grid_needs_the_four_bit_container():
    with pytest.raises(ValueError, match="grid_bits"):
        quantize_weight_rtn(torch.randn(4, 8), 8, None, True, grid_bits=3)


# ---------------------------------------------------------------------------- the pass, end to end

class _Mlp(torch.nn.Module):
    """LayerNorm -> Linear(96, 160) -> GELU -> Linear(160, 34): small, odd out-features."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(96)
        self.up = torch.nn.Linear(96, 160)
        self.down = torch.nn.Linear(160, 34)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


@pytest.fixture(scope="module")
def bert():
    model, (_, kwargs), (_, kwargs2) = zoo.build("bert")
    calib = [kwargs2, zoo.ARCHITECTURES["bert"].inputs(seed=5)[1]]
    with torch.no_grad():
        ref = model(**kwargs).last_hidden_state
    return model, kwargs, calib, ref


def _linear_rows(qm):
    return [r for r in qm.report().layers if "float_bytes" in r]


def test_w4a16_gptq_preset_end_to_end(bert):
    model, kwargs, calib, ref = bert
    qm = qcompile.quantize(model, kwargs=kwargs, recipe="w4a16-gptq", calibration=calib, progress=False)
    counts = count_ops(qm)
    assert counts["qcompile.linear_w4a16"] == 13 and counts.get("aten.linear", 0) == 0  # 2 x 6 + pooler
    rows = _linear_rows(qm)
    assert len(rows) == 13
    for r in rows:
        assert r["format"] == "int4 g128 asym clip-search(output) gptq act-order", r
        # the proxy loss GPTQ minimizes, against what the w4a16 preset's RTN gives
        assert 0 <= r["gptq_loss"] < r["rtn_loss"], r
    # measured ~0.008 (RTN, the w4a16 preset: ~0.03) on this random-weight 2-layer BERT
    assert relative_error(ref, qm(**kwargs).last_hidden_state) < 0.02


def test_gptq_three_bit_and_int8_activation_paths():
    gen = _gen()
    model = _Mlp().eval()
    mix = torch.randn(96, 96, generator=gen) / 10 + torch.eye(96)
    calib = [(torch.randn(8, 64, 96, generator=gen) @ mix,) for _ in range(2)]  # 1024 tokens > K
    x = torch.randn(3, 7, 96, generator=gen) @ mix
    with torch.no_grad():
        ref = model(x)
    int3 = {"preset": "w4a16-gptq", "weight_bits": 3, "group_size": 32, "clip_ratios": ()}
    w3 = qcompile.quantize(model, (x,), calibration=calib, progress=False, recipe=int3)
    assert count_ops(w3)["qcompile.linear_w4a16"] == 2
    for r in _linear_rows(w3):
        assert r["format"] == "int3 g32 asym gptq act-order" and r["bits"] == 3, r
        assert r["gptq_loss"] < r["rtn_loss"], r
    for node in w3.graph_module.graph.nodes:  # 3-bit codes in the 4-bit container
        if QWEIGHT_META in node.meta:
            assert node.meta[QWEIGHT_META].bits == 4 and int(_codes(node.meta[QWEIGHT_META]).max()) <= 7
    # on held-out inputs of the calibration's distribution: measured ~0.14 against RTN's ~0.19
    rtn3 = qcompile.quantize(model, (x,), calibration=calib, progress=False, recipe={**int3, "method": "rtn"})
    assert relative_error(ref, w3(x)) < 0.9 * relative_error(ref, rtn3(x))
    w8a8 = qcompile.quantize(model, (x,), calibration=calib, progress=False,
                             recipe={"preset": "w8a8", "smooth": "off", "method": "gptq"})
    assert count_ops(w8a8)["qcompile.linear_w8a8"] == 2
    for r in _linear_rows(w8a8):
        assert r["format"] == "int8 w per-channel gptq act-order, a per-token" and r["gptq_loss"] < r["rtn_loss"]
    # int8 per-token activations dominate: measured ~0.012 (RTN weights: ~0.013)
    assert relative_error(ref, w8a8(x)) < 0.03


def test_gptq_without_calibration_fails_before_capture():
    with pytest.raises(CalibrationError, match="gptq"):
        qcompile.quantize(_Mlp().eval(), (torch.randn(2, 96),), recipe="w4a16-gptq", progress=False)


@pytest.mark.parametrize("k", [1, 2, 37, 1100])
def test_inverse_factor_matches_the_whole_matrix_computation(k):
    """The memory-saving factorization (permuted H gathered by blocks of rows; the upper factor
    of the inverse as J M⁻¹ J from the in-place factor of the reversed matrix) against the
    textbook one: H[perm][:, perm], a dampened clone, ``cholesky_inverse``, the upper factor.
    K = 1100 spans three 512-row blocks, the last one partial; K = 37 is odd (the storage
    reversal has a middle element); two dead channels."""
    from qcompile.gptq import _inverse_cholesky, _permuted_hessian

    gen = _gen()
    h = _correlated_hessian(gen, k, tokens=k + 400)
    if k > 2:
        dead_idx = torch.randperm(k, generator=gen)[:2]
        h[dead_idx, :] = 0.0
        h[:, dead_idx] = 0.0
    dead = torch.diagonal(h) == 0
    perm = torch.randperm(k, generator=gen)

    expected_h = h[perm][:, perm]
    torch.diagonal(expected_h)[dead[perm]] = 1.0
    damped = expected_h.clone()
    damped.diagonal().add_(0.01 * float(torch.diagonal(expected_h).mean()))
    expected_u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)

    assert torch.equal(_permuted_hessian(h, perm, dead[perm]), expected_h)
    u, used = _inverse_cholesky(lambda: _permuted_hessian(h, perm, dead[perm]), 0.01)
    assert used == 0.01
    assert torch.equal(u.tril(-1), torch.zeros_like(u).tril(-1)) and bool((torch.diagonal(u) > 0).all())
    # two exact factorizations of the same matrix in float64: they differ by rounding,
    # amplified by the dampened H's condition number (< 1e3 here with 1% dampening)
    assert relative_error(u, expected_u) < 1e-12
    # and the defining identity, (H + λI)⁻¹ = Uᵀ U, i.e. U (H + λI) Uᵀ = I
    # (float64 products of a factor with entries ~1/sqrt(λ): ~1e-13 off the identity measured;
    # a wrong reversal or a lower factor misses it by O(1))
    assert torch.allclose(u @ damped @ u.mT, torch.eye(k, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("recipe", ["w4a16-gptq", {"preset": "w4a8", "method": "gptq"}], ids=["w4a16-gptq", "w4a8-gptq"])
def test_hessians_by_stage_give_the_same_weights_as_one_pass(monkeypatch, recipe):
    """GPTQ's Hessians are gathered stage by stage (one stage's held at a time) on the float
    graph; the statistics, so the rounded weights, are exactly those of one pass over the
    whole graph."""
    import qcompile.passes.quantize_weights as quantize_weights

    model, (_, kwargs), (_, kwargs2) = zoo.build("llama")
    calib = [kwargs2, zoo.ARCHITECTURES["llama"].inputs(seed=7)[1]]
    stages = []
    real = quantize_weights._run_by_stage

    def spy(gm, ctx, found):
        stages.append(len(found))
        return real(gm, ctx, found)

    def run():
        qm = qcompile.quantize(model, (), kwargs, recipe=recipe, calibration=calib, progress=False, verify=False)
        return dict(qm.graph_module.named_buffers()), [r.get("gptq_loss") for r in qm.report().layers]

    monkeypatch.setattr(quantize_weights, "_run_by_stage", spy)
    staged, staged_loss = run()
    assert stages and stages[0] > 1  # a 2-layer decoder is cut into stages
    monkeypatch.setattr(quantize_weights, "find_stages", lambda gm: [None])  # one stage: the whole-graph pass
    whole, whole_loss = run()
    assert len(stages) == 1  # the second run did not go by stage
    assert staged.keys() == whole.keys()
    assert all(torch.equal(staged[k], whole[k]) for k in staged)
    assert staged_loss == whole_loss and sum(x is not None for x in staged_loss) >= 14
