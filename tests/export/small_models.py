"""Small models for the option, bad-input and CLI tests of qcompile.export (fast to export).

Also usable as ``qcompile quantize tests.export.small_models:<factory>``.

* :func:`mlp` — two linears (64 -> 128 -> 32), one positional input;
* :func:`odd_group_mlp` — in_features 80 quantized in groups of 40 by the tests: no
  MatMulNBits block size divides 40;
* :func:`tuple_model` — a Python float argument and a tuple output that repeats a tensor;
* :func:`vector_model` — called on a 1-D vector;
* :func:`custom_op_model` — calls ``qcompile_test::twice``, an op no flavor translates;
* :class:`ActQuantModel` — calls the activation-quantized ops (w8a8, fp8, quantize_per_token).
"""
from __future__ import annotations

import torch


def _seeded(module_cls, *args):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return module_cls(*args).eval()


class MLP(torch.nn.Module):
    def __init__(self, k: int = 64, hidden: int = 128, out: int = 32) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(k, hidden)
        self.fc2 = torch.nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    return _seeded(MLP), (torch.randn(4, 64, generator=torch.Generator().manual_seed(1)),)


def odd_group_mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    return _seeded(MLP, 80, 80, 48), (torch.randn(4, 80, generator=torch.Generator().manual_seed(1)),)


class TupleModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 32)

    def forward(self, x: torch.Tensor, scale: float = 2.0):
        h = self.fc(x)
        return h, h * scale, h


def tuple_model() -> tuple[torch.nn.Module, tuple]:
    return _seeded(TupleModel), (torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)), 3.0)


def vector_model() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    return _seeded(MLP), (torch.randn(64, generator=torch.Generator().manual_seed(1)),)


@torch.library.custom_op("qcompile_test::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@twice.register_fake
def _twice_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class CustomOpModel(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.ops.qcompile_test.twice(torch.relu(self.fc1(x))))


def custom_op_model() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    return _seeded(CustomOpModel), (torch.randn(4, 64, generator=torch.Generator().manual_seed(1)),)


class ActQuantModel(torch.nn.Module):
    """Calls the activation-quantized ops directly (int8 / e4m3fn weight buffers), every
    variant once: w8a8 dynamic with and without smoothing and bias, w8a8 static (a 0-d and
    a ``[1]`` act_scale), fp8 with and without smoothing and bias (``fp8_linear=False``
    leaves them out), and ``quantize_per_token`` int8 / int4 / fp8 (``fp8_codes=False``
    leaves the fp8 one out). Weights are random from ``seed``; in_features ``k`` and
    out_features ``n``. :meth:`output_names` lists what ``forward`` returns."""

    OUTPUTS = ("w8a8", "w8a8_smooth_bias", "w8a8_static_bias", "w8a8_static_smooth", "fp8", "fp8_smooth_bias",
               "codes8", "scales8", "codes4", "scales4", "codes_fp8", "scales_fp8")

    def __init__(self, k: int, n: int, seed: int, fp8_linear: bool = True, fp8_codes: bool = True,
                 act_scale: float = 2.5 / 127) -> None:
        super().__init__()
        from qcompile.act_quant import quantize_weight_fp8, quantize_weight_per_channel_int8

        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(n, k, generator=gen) / k**0.5
        q, ws = quantize_weight_per_channel_int8(w)
        f, fs = quantize_weight_fp8(w)
        self.fp8_linear = fp8_linear
        self.fp8_codes = fp8_codes
        self.register_buffer("qweight", q)
        self.register_buffer("wscales", ws)
        self.register_buffer("fweight", f)
        self.register_buffer("fscales", fs)
        self.register_buffer("bias", torch.randn(n, generator=gen))
        self.register_buffer("smooth", torch.rand(k, generator=gen) * 1.5 + 0.5)
        self.register_buffer("act_scale", torch.tensor(act_scale))
        self.register_buffer("act_scale_1", torch.tensor([act_scale * 0.8]))

    def forward(self, x: torch.Tensor):
        ops = torch.ops.qcompile
        out = [
            ops.linear_w8a8(x, self.qweight, self.wscales, None, None, None),
            ops.linear_w8a8(x, self.qweight, self.wscales, self.bias, self.smooth, None),
            ops.linear_w8a8(x, self.qweight, self.wscales, self.bias, None, self.act_scale),
            ops.linear_w8a8(x, self.qweight, self.wscales, None, self.smooth, self.act_scale_1),
        ]
        if self.fp8_linear:
            out += [ops.linear_fp8(x, self.fweight, self.fscales, None, None),
                    ops.linear_fp8(x, self.fweight, self.fscales, self.bias, self.smooth)]
        out += [*ops.quantize_per_token(x, self.smooth, 8, "int"), *ops.quantize_per_token(x, None, 4, "int")]
        if self.fp8_codes:
            out += ops.quantize_per_token(x, None, 8, "fp8")
        return tuple(out)

    def output_names(self) -> list[str]:
        skip = ({"fp8", "fp8_smooth_bias"} if not self.fp8_linear else set()) | (
            {"codes_fp8", "scales_fp8"} if not self.fp8_codes else set())
        return [name for name in self.OUTPUTS if name not in skip]
