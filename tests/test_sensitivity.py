"""Sensitivity analyses (qcompile.sensitivity, qcompile.hessian_trace) and the cost model.

References are written here independently of the graph machinery: exact Hessian traces by
``torch.func.hessian`` of the loss written in plain torch over the ``nn.Module`` (float64),
layer output errors from the module's own input, end-to-end losses from a deep copy of the
module with one weight replaced. Inputs are fresh random draws; shapes are odd.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import sympy
import torch
import torch.nn.functional as F

from qcompile.capture import capture
from qcompile.cost_model import DEVICE_PROFILES, linear_costs
from qcompile.graph_utils import layer_name, quantizable_linears
from qcompile.hessian_trace import LossHessian, detect_loss, hutchinson_traces
from qcompile.passes.canonicalize import canonicalize
from qcompile.pipeline import PassContext, run_passes
from qcompile.quantizers import quantize_weight_rtn
from qcompile.recipe import Recipe
from qcompile.sensitivity import layer_sensitivity
from qcompile.weight_formats import candidate_formats, fake_quantize, fake_quantize_activation, weight_bytes


def _gen() -> torch.Generator:
    gen = torch.Generator()
    gen.seed()
    return gen


class _MLP(torch.nn.Module):
    """x [B, T, 7] -> [B, T, 5] through two linears (odd sizes)."""

    def __init__(self, gen):
        super().__init__()
        self.fc1 = torch.nn.Linear(7, 9)
        self.fc2 = torch.nn.Linear(9, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.7)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class _TinyLM(torch.nn.Module):
    """ids [B, T] -> logits [B, T, 11]."""

    def __init__(self, gen):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.fc = torch.nn.Linear(6, 8)
        self.head = torch.nn.Linear(8, 11, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.emb(ids))))


def _canonical(model, example):
    cap = capture(model, (example,), {})
    flat = cap.flatten_inputs((example,), {})
    gm = run_passes(cap.graph_module, [canonicalize], PassContext(Recipe(), flat, verify=False, progress=False))
    return gm, flat


def _exact_trace(model, module_name: str, loss_of_model) -> float:
    """tr(∂²L/∂W²) of ``module_name``'s weight, by the full Hessian (float64)."""
    module = dict(model.named_modules())[module_name]
    w0 = module.weight.detach().clone()

    def f(w):
        params = {k: v for k, v in model.named_parameters()}
        params[f"{module_name}.weight"] = w
        return loss_of_model(lambda *a: torch.func.functional_call(model, params, a))

    h = torch.func.hessian(f)(w0)
    return float(h.reshape(w0.numel(), w0.numel()).diagonal().sum())


@pytest.mark.parametrize("kind", ["kl", "mse", "lm"])
def test_hessian_vector_products_match_the_full_hessian(kind):
    """Every product H v over both weights jointly, against the full float64 Hessian."""
    gen = _gen()
    if kind == "lm":
        model = _TinyLM(gen).double().eval()
        x = torch.randint(0, 11, (2, 9), generator=gen)
        names = ("fc", "head")
    else:
        model = _MLP(gen).double().eval()
        x = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
        names = ("fc1", "fc2")
    gm, flat = _canonical(model, x)
    with torch.no_grad():
        ref = model(x)

    def loss_of(*weights):
        params = dict(model.named_parameters())
        params.update({f"{n}.weight": w for n, w in zip(names, weights)})
        out = torch.func.functional_call(model, params, (x,))
        if kind == "lm":
            return F.cross_entropy(out[:, :-1].reshape(-1, 11), x[:, 1:].reshape(-1))
        if kind == "mse":
            return (out - ref).pow(2).mean()
        p = F.log_softmax(ref, -1)
        return (p.exp() * (p - F.log_softmax(out, -1))).sum(-1).mean()

    w0 = [getattr(model, n).weight.detach().clone() for n in names]
    blocks = torch.func.hessian(loss_of, argnums=tuple(range(len(names))))(*w0)
    hessian = LossHessian(gm, quantizable_linears(gm), kind)
    by_layer = {layer_name(node): target for node, target in hessian.targets.items()}
    vectors = {by_layer[n]: torch.randn(w.shape, generator=gen, dtype=torch.float64) for n, w in zip(names, w0)}
    hv = hessian.hvp(flat, vectors)
    for i, name in enumerate(names):
        expected = sum((blocks[i][j].reshape(w0[i].numel(), w0[j].numel()) @ vectors[by_layer[names[j]]].reshape(-1))
                       for j in range(len(names)))
        got = hv[by_layer[name]].reshape(-1)
        # float64 on both sides, different summation orders: 1e-9 of the product's norm
        assert float((got - expected).norm()) <= 1e-9 * float(expected.norm()), name


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_hutchinson_trace_matches_exact_trace(loss):
    gen = _gen()
    model = _MLP(gen).double().eval()
    x = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
    gm, flat = _canonical(model, x)
    with torch.no_grad():
        ref = model(x)

    def loss_of_model(run):
        out = run(x)
        if loss == "mse":
            return (out - ref).pow(2).mean()
        p = F.log_softmax(ref, -1)
        return (p.exp() * (p - F.log_softmax(out, -1))).sum(-1).mean()

    samples = 400
    est = hutchinson_traces(gm, [flat], quantizable_linears(gm), samples=samples, loss=loss, seed=1, progress=False)
    assert est.loss == loss and est.samples == samples
    for name in ("fc1", "fc2"):
        exact = _exact_trace(model, name, loss_of_model)
        se = est.std_errors[name]
        assert exact > 0 and 0 < se < 0.5 * exact
        # the estimate's variance is ∝ 1/samples: it lies within 4 standard errors of the exact
        # trace (a Gaussian tail of 6e-5); 1e-9 covers float64 rounding when se is tiny
        assert abs(est.traces[name] - exact) <= 4 * se + 1e-9 * exact, (name, est.traces[name], exact, se)


def test_hutchinson_lm_loss_detected_and_matches_exact_trace():
    gen = _gen()
    model = _TinyLM(gen).double().eval()
    ids = torch.randint(0, 11, (2, 9), generator=gen)
    gm, flat = _canonical(model, ids)
    assert detect_loss(gm, flat) == "lm"

    def loss_of_model(run):
        logits = run(ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))

    est = hutchinson_traces(gm, [flat], quantizable_linears(gm), samples=200, loss="auto", seed=2, progress=False)
    assert est.loss == "lm"
    for name in ("fc", "head"):
        exact = _exact_trace(model, name, loss_of_model)
        # within 4 standard errors (variance ∝ 1/samples); 1e-9 relative for float64 rounding
        assert abs(est.traces[name] - exact) <= 4 * est.std_errors[name] + 1e-9 * abs(exact), name


class _Encoder(torch.nn.Module):
    """x [B, T, 7] -> layer-normed hidden states [B, T, 9] (an embedding model's output)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(7, 9)
        self.norm = torch.nn.LayerNorm(9)

    def forward(self, x):
        return self.norm(torch.relu(self.fc(x)))


def test_detect_loss_is_kl_for_head_outputs_and_mse_for_hidden_states():
    gen = _gen()
    gm, flat = _canonical(_MLP(gen).eval(), torch.randn(2, 3, 7, generator=gen))
    assert detect_loss(gm, flat) == "kl"  # the output is a linear's: logits of a head
    gm, flat = _canonical(_Encoder().eval(), torch.randn(2, 3, 7, generator=gen))
    assert detect_loss(gm, flat) == "mse"  # the output is a norm's: hidden states


def test_local_sensitivity_is_mean_output_error_per_token():
    gen = _gen()
    model = _MLP(gen).double().eval()
    batches = [torch.randn(2, 5, 7, generator=gen, dtype=torch.float64) for _ in range(3)]
    gm, flat = _canonical(model, batches[0])
    flats = [[b] for b in batches]
    formats = candidate_formats(("w3", "w4", "w8", "float"), None, False)
    table = layer_sensitivity(gm, flats, quantizable_linears(gm), formats, method="local", progress=False)
    assert table.layers == ["fc1", "fc2"] and table.shapes == [(9, 7), (5, 9)]
    x = torch.cat([b.reshape(-1, 7) for b in batches])
    for j, fmt in enumerate(formats):
        dw = fake_quantize(model.fc1.weight, fmt).double() - model.fc1.weight.detach()
        expected = float((x @ dw.T).pow(2).sum(-1).mean())
        # float64 statistics; the rounded weight is float32 (as stored): 1e-9 relative
        assert table.omega[0, j] == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert (table.omega[:, 3] == 0).all()
    assert (table.omega[:, 0] > table.omega[:, 1]).all() and (table.omega[:, 1] > table.omega[:, 2]).all()


@pytest.mark.parametrize("names", [("w3", "w8"), ("w4a4", "w8a8")])
def test_end_to_end_sensitivity_is_measured_loss_increase(names):
    """Ω e2e is the loss increase with one layer quantized: its weight rounded and, for a
    candidate that quantizes activations, its input quantized per token too."""
    gen = _gen()
    model = _MLP(gen).double().eval()
    batches = [torch.randn(3, 4, 7, generator=gen, dtype=torch.float64) for _ in range(2)]
    gm, _ = _canonical(model, batches[0])
    formats = candidate_formats(names, None, True)
    table = layer_sensitivity(gm, [[b] for b in batches], quantizable_linears(gm), formats, method="e2e",
                              loss="mse", progress=False)
    for i, name in enumerate(("fc1", "fc2")):
        for j, fmt in enumerate(formats):
            twin = copy.deepcopy(model)
            module = getattr(twin, name)
            module.weight.data = fake_quantize(module.weight, fmt).double()
            if fmt.quantizes_activations:
                module.register_forward_pre_hook(lambda _m, a, f=fmt: (fake_quantize_activation(a[0], f).double(),))
            with torch.no_grad():
                expected = np.mean([float((twin(b) - model(b)).pow(2).mean()) for b in batches])
            # float64 throughout: agreement to rounding
            assert table.omega[i, j] == pytest.approx(expected, rel=1e-9)


def _hessian_table(names, symmetric):
    """A fresh float64 MLP, its input, the formats ``names`` and their Hessian Ω (8 HVPs, MSE)."""
    gen = _gen()
    model = _MLP(gen).double().eval()
    x = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
    gm, flat = _canonical(model, x)
    formats = candidate_formats(names, None, symmetric)
    table = layer_sensitivity(gm, [flat], quantizable_linears(gm), formats, method="hessian", samples=8,
                              loss="mse", progress=False)
    return model, x, formats, table


def test_hessian_sensitivity_uses_trace_per_weight_times_rounding_energy():
    model, _, formats, table = _hessian_table(("w4", "float"), False)
    assert table.traces is not None and table.traces.samples == 8
    for i, name in enumerate(("fc1", "fc2")):
        w = getattr(model, name).weight
        energy = float((fake_quantize(w, formats[0]).double() - w.detach()).pow(2).sum())
        expected = max(table.traces.traces[name], 0.0) / w.numel() * energy
        assert table.omega[i, 0] == pytest.approx(expected, rel=1e-12)
        assert table.omega[i, 1] == 0


@pytest.mark.parametrize("shape,group", [((13, 96), 32), ((7, 50), 32), ((5, 64), None)])
def test_weight_bytes_match_stored_quantized_weights(shape, group):
    w = torch.randn(*shape, generator=_gen())
    for fmt in candidate_formats(("w3", "w4", "w8"), group, False):
        g = None if fmt.grid_bits == 8 or group is None or shape[1] % group else group
        q = quantize_weight_rtn(w, fmt.storage_bits, g, fmt.grid_bits == 8, grid_bits=fmt.grid_bits)
        assert weight_bytes(fmt, *shape, 4) == q.nbytes, fmt
    assert weight_bytes(candidate_formats(("float",), None, True)[0], *shape, 2) == shape[0] * shape[1] * 2


def test_cost_model_is_symbolic_in_batch_and_sequence(canonical_zoo):
    gm, example, _ = canonical_zoo("llama")
    nodes = quantizable_linears(gm)
    costs, sizes = linear_costs(gm, nodes)
    assert sizes["batch"] == 2 and sizes["seq"] == 16  # the zoo's example is 2 x 16 tokens
    batch, seq = sympy.Symbol("batch", positive=True, integer=True), sympy.Symbol("seq", positive=True, integer=True)
    w4 = candidate_formats(("w4",), 32, False)[0]
    cpu = DEVICE_PROFILES["cpu"]
    for cost, node in zip(costs, nodes):
        assert cost.layer == layer_name(node)
        n, k = cost.out_features, cost.in_features
        assert sympy.simplify(cost.flops() - 2 * batch * seq * n * k) == 0
        assert cost.evaluate(cost.bops(w4), {"batch": 3, "seq": 11}) == 3 * 11 * n * k * 4 * 16
        tokens = 5 * 7
        expected_bytes = weight_bytes(w4, n, k, 4) + 2 * tokens * (n + k)
        expected = max(2 * tokens * n * k / cpu.peak_flops_16, expected_bytes / cpu.bandwidth)
        assert cost.evaluate(cost.latency(w4, cpu), {"batch": 5, "seq": 7}) == pytest.approx(expected, rel=1e-12)


def test_activation_candidates_add_the_exact_activation_output_error():
    """Local Ω of a candidate that quantizes the input is the layer's whole output error per
    token, ``‖Q_a(x) Ŵᵀ − x Wᵀ‖²``, computed here directly from the module's inputs."""
    gen = _gen()
    model = _MLP(gen).double().eval()
    batches = [torch.randn(3, 5, 7, generator=gen, dtype=torch.float64) * 2 for _ in range(3)]
    gm, _ = _canonical(model, batches[0])
    formats = candidate_formats(("w4", "w4a8", "w4a4", "w8a8", "float"), None, False)
    table = layer_sensitivity(gm, [[b] for b in batches], quantizable_linears(gm), formats, method="local",
                              progress=False)
    x1 = torch.cat([b.reshape(-1, 7) for b in batches])
    x2 = torch.tanh(model.fc1(x1))
    for i, (name, x) in enumerate((("fc1", x1), ("fc2", x2))):
        w = getattr(model, name).weight.detach()
        for j, fmt in enumerate(formats[:4]):
            w_hat = fake_quantize(w, fmt).double()
            x_hat = fake_quantize_activation(x, fmt).double() if fmt.quantizes_activations else x
            expected = float((x_hat @ w_hat.T - x @ w.T).pow(2).sum(-1).mean())
            # float64 statistics of float32-rounded codes: 1e-9 relative
            assert table.omega[i, j] == pytest.approx(expected, rel=1e-9)
    # same weight grid: 4-bit inputs add far more error than 8-bit ones (whose error can even
    # cancel a little of the weight's: the cross term has either sign)
    assert (table.omega[:, 2] > table.omega[:, 1]).all() and (table.omega[:, 2] > table.omega[:, 0]).all()


def test_hessian_sensitivity_scales_the_activation_error_by_the_output_curvature():
    model, x, formats, table = _hessian_table(("w8", "w8a8"), True)
    x1 = x.reshape(-1, 7)
    for i, (name, inp) in enumerate((("fc1", x1), ("fc2", torch.tanh(model.fc1(x1))))):
        w = getattr(model, name).weight.detach()
        w_hat = fake_quantize(w, formats[0]).double()
        trace = max(table.traces.traces[name], 0.0)
        weight_part = trace / w.numel() * float((w_hat - w).pow(2).sum())
        x_hat = fake_quantize_activation(inp, formats[1]).double()
        act_part = float((x_hat @ w_hat.T - inp @ w_hat.T).pow(2).sum(-1).mean()) \
            + 2 * float(((inp @ (w_hat - w).T) * ((x_hat - inp) @ w_hat.T)).sum(-1).mean())
        gain = trace / (w.shape[0] * float(inp.pow(2).sum(-1).mean()))  # tr(H_W) / (N tr(E[x xᵀ]))
        assert table.omega[i, 0] == pytest.approx(weight_part, rel=1e-12)
        assert table.omega[i, 1] == pytest.approx(max(weight_part + gain * act_part, 0.0), rel=1e-9)
