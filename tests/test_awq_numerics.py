"""AWQ numerics: the mean-statistic scales, the weight statistic, and the range search
weighted by each group's block of Σ x xᵀ, against float64 references."""
import pytest
import torch

from qcompile.quantizers import dequantize_weight, quantize_weight_rtn
from qcompile.smoothing import MAX_EXPONENT, awq_scales, weight_group_absmean


def _asym_dequant64(groups: torch.Tensor, ratio: float) -> torch.Tensor:
    """int4 asymmetric RTN of groups [N, G, g] with the range shrunk by ratio (the float32
    rounding of quantizers._quantize_asymmetric, dequantized in float64)."""
    lo = groups.amin(-1).clamp(max=0.0) * ratio
    hi = groups.amax(-1).clamp(min=0.0) * ratio
    scales = hi / 15 - lo / 15
    zeros = torch.clamp(torch.round(-lo / scales), 0, 15)
    codes = torch.clamp(torch.round(groups / scales[..., None]) + zeros[..., None], 0, 15)
    return ((codes - zeros[..., None]) * scales[..., None]).double()


@pytest.mark.parametrize("n,k,group", [(7, 96, 32), (5, 48, 48), (3, 60, 12)])
def test_hessian_range_search_minimizes_each_groups_output_error(n, k, group):
    gen = torch.Generator().manual_seed(n * k + group)
    w = torch.randn(n, k, generator=gen)
    w[0, 1] = 9.0  # an outlier the search may clip
    mix = torch.randn(k, k, generator=gen) / k**0.5
    x = torch.randn(300, k, generator=gen) @ (torch.eye(k) + mix)  # correlated channels
    hessian = (x.double().T @ x.double())
    ratios = (1.0, 0.9, 0.8, 0.7, 0.6)
    got = dequantize_weight(quantize_weight_rtn(w, 4, group, False, clip_ratios=ratios, importance=hessian)).double()
    # reference: every ratio's exact output error of every (row, group) on the samples, float64
    groups = w.reshape(n, k // group, group)
    xg = x.double().reshape(-1, k // group, group)
    candidates = torch.stack([_asym_dequant64(groups, r) for r in ratios])  # [R, N, G, g]
    out_err = torch.einsum("tgi,rngi->rngt", xg, candidates - groups.double()).pow(2).sum(-1)  # [R, N, G]
    best = candidates.gather(0, out_err.argmin(0)[None, ..., None].expand(1, *groups.shape))[0]
    # float32 rounding of the candidates (1e-7 relative) cannot swap two ratios' errors
    # unless they tie to 1e-6: compare the chosen weights to within float32 rounding
    torch.testing.assert_close(got, best.reshape(n, k), rtol=0, atol=1e-6)
    diag = dequantize_weight(quantize_weight_rtn(w, 4, group, False, clip_ratios=ratios,
                                                 importance=torch.diagonal(hessian).float())).double()
    err = lambda v: float(((v - w.double()) @ hessian @ (v - w.double()).T).trace())  # noqa: E731
    assert err(got) <= err(diag) * (1 + 1e-9)  # the block objective is the exact one


def test_hessian_importance_must_be_finite_and_k_by_k():
    w = torch.randn(4, 32)
    with pytest.raises(ValueError, match=r"\[32, 32\]"):
        quantize_weight_rtn(w, 4, 16, False, clip_ratios=(1.0, 0.9), importance=torch.eye(16))
    bad = torch.eye(32)
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        quantize_weight_rtn(w, 4, 16, False, clip_ratios=(1.0, 0.9), importance=bad)


@pytest.mark.parametrize("alpha", [0.0, 0.35, 0.95])
def test_awq_scales_against_float64_formula(alpha):
    gen = torch.Generator().manual_seed(int(alpha * 100))
    act = torch.rand(37, generator=gen, dtype=torch.float64) * 5 + 1e-3
    wt = torch.rand(37, generator=gen, dtype=torch.float64) + 1e-3
    act[4], wt[9], act[11] = 0.0, 0.0, float("nan")  # degenerate channels
    s = awq_scales(act.float(), wt.float(), alpha)
    raw = act.float().double().pow(alpha) / wt.float().double().pow(1 - alpha)
    ok = torch.isfinite(raw) & (act > 0) & (wt > 0) & torch.isfinite(act)
    raw = torch.where(ok, raw, torch.ones_like(raw))
    ref = raw / (raw.max() * raw.min()).sqrt()
    assert s.dtype == torch.float64
    torch.testing.assert_close(s, ref, rtol=1e-12, atol=0)  # float64 log/exp vs pow: a few ulps
    assert s[4] == s[9] == s[11] and torch.isfinite(s).all()


def test_awq_scales_cap_the_spread():
    act = torch.tensor([1e-30, 1.0, 1e30])
    s = awq_scales(act, torch.ones(3), 1.0)
    assert float(s.max()) == 2.0**MAX_EXPONENT and float(s.min()) == 2.0**-MAX_EXPONENT


def test_weight_group_absmean_against_loop():
    gen = torch.Generator().manual_seed(3)
    ws = [torch.randn(5, 24, generator=gen), torch.randn(3, 24, generator=gen)]
    ws[1][2, 8:16] = 0.0  # a group of zeros counts as 0
    got = weight_group_absmean(ws, 8)
    rows = []
    for w in ws:
        for r in w.double():
            row = []
            for g in range(3):
                chunk = r[g * 8:(g + 1) * 8].abs()
                peak = chunk.max()
                row.append(chunk / peak if peak > 0 else torch.zeros(8, dtype=torch.float64))
            rows.append(torch.cat(row))
    torch.testing.assert_close(got.double(), torch.stack(rows).mean(0), rtol=1e-6, atol=0)  # float32 division
    with pytest.raises(ValueError, match="does not divide"):
        weight_group_absmean(ws, 7)
