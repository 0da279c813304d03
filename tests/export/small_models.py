"""Small models for the option, bad-input and CLI tests of qcompile.export (fast to export).

Also usable as ``qcompile quantize tests.export.small_models:<factory>``.

* :func:`mlp` — two linears (64 -> 128 -> 32), one positional input;
* :func:`odd_group_mlp` — in_features 80 quantized in groups of 40 by the tests: no
  MatMulNBits block size divides 40;
* :func:`tuple_model` — a Python float argument and a tuple output that repeats a tensor;
* :func:`vector_model` — called on a 1-D vector;
* :func:`custom_op_model` — calls ``qcompile_test::twice``, an op no flavor translates.
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
