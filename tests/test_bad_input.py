"""Bad input to the Python API: each mistake raises a qcompile error that names it.

Every test asserts the exact exception type (a class from ``qcompile.errors``, never an
exception from deep inside torch as the primary type) and the key words of its message.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import qcompile
from qcompile.errors import CalibrationError, CaptureError, InputMismatchError, QcompileError, RecipeError


def _raises(exc_type: type[QcompileError], fn, *words: str) -> QcompileError:
    """Run ``fn``; assert it raises exactly ``exc_type`` with every one of ``words`` in the message."""
    with pytest.raises(Exception) as info:
        fn()
    exc = info.value
    assert type(exc) is exc_type, f"expected {exc_type.__name__}, got {type(exc).__module__}.{type(exc).__name__}: {exc}"
    assert type(exc).__module__ == "qcompile.errors"
    msg = str(exc)
    for w in words:
        assert w in msg, f"{w!r} not in the message:\n{msg}"
    return exc


class Linear2(torch.nn.Module):
    """Two linears, called with one positional tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(32, 64)
        self.fc2 = torch.nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Keyword(torch.nn.Module):
    """Keyword inputs as a tokenizer gives them, plus non-tensor inputs export specializes on."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0,
                flag: bool = False) -> torch.Tensor:
        y = self.fc(x) * scale
        if mask is not None:
            y = y * mask
        return y + 1 if flag else y


class DataDependentBranch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.sum() > 0:  # Python control flow on a tensor's value
            return y * 2
        return -y


class ItemShape(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int((x > 0).sum().item())  # an output shape that depends on the data
        return self.fc(x).new_zeros(n, 2)


def _kw(batch: int = 2) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch, 32), "mask": (torch.rand(batch, 32) > 0.1).float()}


@pytest.fixture(scope="module")
def kw_model():
    torch.manual_seed(0)
    return Keyword().eval()


@pytest.fixture(scope="module")
def kw_quantized(kw_model):
    """Keyword model captured with x, mask and scale=2.0 (a specialized float)."""
    return qcompile.quantize(kw_model, (), {**_kw(), "scale": 2.0}, progress=False)


@pytest.fixture(scope="module")
def pos_quantized():
    torch.manual_seed(1)
    model = Linear2().eval()
    return model, qcompile.quantize(model, (torch.randn(3, 32),), progress=False)


# --------------------------------------------------------------------------------------
# Capture


@pytest.mark.parametrize("model_cls", [DataDependentBranch, ItemShape], ids=["if-on-tensor", "item-driven-shape"])
def test_uncapturable_model_raises_capture_error_pointing_to_torch_compile(model_cls):
    model = model_cls().train()
    exc = _raises(CaptureError, lambda: qcompile.quantize(model, (torch.randn(4, 32),), progress=False),
                  f"torch.export could not capture {model_cls.__name__}", "data-dependent", "torch.compile",
                  'backend="qcompile"')
    assert exc.__cause__ is not None  # torch's exception is chained, not swallowed
    assert model.training  # the model's mode is restored after the failure


def test_bad_recipe_is_reported_before_capture():
    # The recipe is checked first: a model that cannot be captured still gets the RecipeError.
    _raises(RecipeError, lambda: qcompile.quantize(DataDependentBranch(), (torch.randn(2, 32),), recipe="w3a16"),
            "unknown recipe 'w3a16'")


# --------------------------------------------------------------------------------------
# Recipes


@pytest.mark.parametrize(
    "recipe, words",
    [
        ("w3a16", ["unknown recipe 'w3a16'",
                   "presets: auto, fp8, w4a16, w4a16-awq, w4a16-gptq, w4a4, w4a8, w8a16, w8a8, w8a8-static"]),
        ({"preset": "int4"}, ["unknown recipe 'int4'"]),
        ({"weight_bits": 5}, ["weight_bits", "(3, 4, 8)", "got 5"]),
        ({"preset": "w4a16", "group_size": 0}, ["group_size", ">= 2", "got 0"]),
        ({"group_size": "x"}, ["group_size", "got 'x'"]),
        ({"group_size": 64.0}, ["group_size", "got 64.0"]),
        ({"preset": "w4a16", "group_size": 33}, ["even", "group_size=33"]),
        ({"activation_bits": 2}, ["activation_bits", "(16, 8, 4)", "got 2"]),
        ({"preset": "w8a16", "activation_bits": 8, "group_size": 128},
         ["8-bit activations with 8-bit weights need symmetric per-channel weights", "group_size=128"]),
        ({"activation_bits": 4}, ["4-bit activations need 4-bit (or 3-bit) weights", "weight_bits=8"]),
        ({"preset": "w4a8", "activation_scale": "static"}, ["dynamic per-token integer activations", "'static'"]),
        ({"rotate": "everywhere"}, ["rotate must be one of", "'everywhere'", "residual"]),
        ({"rotation_seed": -1}, ["rotation_seed", "non-negative", "-1"]),
        ({"activation_format": "fp8"}, ["apply to quantized activations", "activation_bits=16"]),
        ({"preset": "fp8", "activation_scale": "static"}, ["fp8 activations are scaled per token"]),
        ({"smooth": "yes"}, ["smooth must be one of", "'yes'"]),
        ({"preset": "w8a8", "smooth_alpha": 1.5}, ["smooth_alpha", "[0, 1]", "1.5"]),
        ({"preset": "w8a8", "smooth": "search", "smooth_alphas": [0.5, 2]}, ["smooth_alphas", "[0, 1]"]),
        ({"clip_objective": "loss"}, ["clip_objective", "'loss'"]),
        ({"preset": "w4a16", "groupsize": 64}, ["unknown recipe field(s) ['groupsize']", "group_size"]),
        ({"clip_ratios": [1.5]}, ["clip_ratios", "(0, 1]", "1.5"]),
        ({"clip_ratios": [0.9, 0.0]}, ["clip_ratios", "(0, 1]"]),
        ({"clip_ratios": "0.9"}, ["clip_ratios", "'0.9'"]),
        ({"method": "sgd"}, ["method", "'sgd'"]),
        ({"keep_float": "lm_head"}, ["keep_float", "tuple of glob patterns"]),
        (42, ["a recipe is a preset name, a qcompile.Recipe or a dict, got int"]),
    ],
    ids=lambda v: re.sub(r"\W+", "-", str(v)).strip("-")[:40],
)
def test_bad_recipe_raises_recipe_error(pos_quantized, recipe, words):
    model, _ = pos_quantized
    _raises(RecipeError, lambda: qcompile.quantize(model, (torch.randn(2, 32),), recipe=recipe, progress=False),
            *words)


def test_recipe_dataclass_validates_at_construction():
    _raises(RecipeError, lambda: qcompile.Recipe(weight_bits=5), "weight_bits")
    _raises(RecipeError, lambda: qcompile.Recipe(group_size=1), "group_size")
    _raises(RecipeError, lambda: qcompile.PRESETS["w4a16"].replace(symmetric="yes"), "symmetric")
    _raises(RecipeError, lambda: qcompile.PRESETS["w8a16"].replace(bits=4), "unknown recipe field(s) ['bits']")


# --------------------------------------------------------------------------------------
# Calibration


@pytest.mark.parametrize(
    "make_calibration, words",
    [
        (lambda: [_kw(), {"x": torch.randn(2, 32)}], ["calibration batch 1 does not match the example inputs",
                                                      "structure differs"]),
        (lambda: [{**_kw(), "extra": torch.randn(2, 32)}], ["calibration batch 0 does not match", "structure differs"]),
        (lambda: [_kw(), tuple(_kw().values())], ["calibration batch 1 does not match", "positional vs keyword"]),
        (lambda: [{"x": torch.randn(2, 3, 32), "mask": torch.ones(2, 3, 32)}],
         ["calibration batch 0 does not match", "['x'] has 3 dimensions", "captured with 2"]),
        (lambda: _kw(), ["not a single dict", "wrap a single batch in a list"]),
        (lambda: torch.randn(2, 32), ["not a single Tensor", "wrap a single batch in a list"]),
        (lambda: [], ["calibration is empty"]),
        (lambda: iter([]), ["calibration is empty"]),
        (lambda: ["some text"], ["a calibration entry must be a tuple", "got str"]),
    ],
    ids=["missing-key", "extra-key", "positional-vs-keyword", "wrong-rank", "single-dict", "single-tensor",
         "empty-list", "empty-iterator", "text-entry"],
)
def test_mismatched_calibration_raises_calibration_error(kw_model, make_calibration, words):
    _raises(CalibrationError,
            lambda: qcompile.quantize(kw_model, (), _kw(), calibration=make_calibration(), progress=False), *words)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", ["x", "mask"])
def test_non_finite_calibration_names_batch_and_input(kw_model, bad_value, key):
    batches = [_kw(), _kw(3), _kw(4)]
    batches[2][key][1, 5] = bad_value
    batches[2][key][3, 0] = bad_value
    _raises(CalibrationError,
            lambda: qcompile.quantize(kw_model, (), _kw(), calibration=batches, progress=False),
            f"calibration batch 2, input [1]['{key}']", "2 NaN/Inf value(s)")


def test_non_iterable_calibration_raises_calibration_error(kw_model):
    _raises(CalibrationError, lambda: qcompile.quantize(kw_model, (), _kw(), calibration=5, progress=False),
            "calibration")


def test_calibration_with_wrong_feature_size_raises_calibration_error(kw_model):
    _raises(CalibrationError,
            lambda: qcompile.quantize(kw_model, (), _kw(), calibration=[{"x": torch.randn(2, 16),
                                                                         "mask": torch.ones(2, 16)}],
                                      progress=False),
            "calibration batch 0", "dimension 1 is 16")


# --------------------------------------------------------------------------------------
# Calling the quantized model


def test_quantized_model_accepts_matching_inputs(kw_model, kw_quantized, pos_quantized):
    inputs = {**_kw(5), "scale": 2.0}
    with torch.no_grad():
        ref, got = kw_model(**inputs), kw_quantized(**inputs)
    assert got.shape == ref.shape and float((got - ref).norm() / ref.norm()) < 0.05
    model, qm = pos_quantized
    x = torch.randn(7, 32)
    assert qm(x).shape == model(x).shape


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda qm: qm(*_kw().values(), scale=2.0), ["structure differs", "positional vs keyword"]),
        (lambda qm: qm(x=torch.randn(2, 32), scale=2.0), ["structure differs", "same keys"]),
        (lambda qm: qm(**_kw(), scale=2.0, flag=False), ["structure differs"]),
        (lambda qm: qm(**_kw()), ["structure differs"]),
        (lambda qm: qm(**_kw(), scale=3.0), ["input [1]['scale'] was 2.0 at capture and is 3.0 now",
                                              "specializes non-tensor inputs", "capture again"]),
        (lambda qm: qm(x=torch.randn(2, 32), mask=None, scale=2.0), ["input [1]['mask'] must be a tensor",
                                                                     "got NoneType"]),
        (lambda qm: qm(x=np.zeros((2, 32), np.float32), mask=torch.ones(2, 32), scale=2.0),
         ["input [1]['x'] must be a tensor", "got ndarray"]),
        (lambda qm: qm(x=torch.randn(2, 4, 32), mask=torch.ones(2, 4, 32), scale=2.0),
         ["input [1]['x'] has 3 dimensions", "captured with 2"]),
    ],
    ids=["positional-vs-keyword", "missing-key", "extra-key", "specialized-missing", "specialized-value",
         "none-for-tensor", "numpy-for-tensor", "wrong-rank"],
)
def test_quantized_model_rejects_mismatched_inputs(kw_quantized, call, words):
    _raises(InputMismatchError, lambda: call(kw_quantized), *words)


def test_positional_model_rejects_keyword_and_extra_args(pos_quantized):
    _, qm = pos_quantized
    _raises(InputMismatchError, lambda: qm(x=torch.randn(2, 32)), "structure differs")
    _raises(InputMismatchError, lambda: qm(torch.randn(2, 32), torch.randn(2, 32)), "structure differs")
    _raises(InputMismatchError, lambda: qm(1.5), "input [0][0] must be a tensor, got float")


def test_specialized_bool_input(kw_model):
    qm = qcompile.quantize(kw_model, (), {**_kw(), "flag": True}, progress=False)
    _raises(InputMismatchError, lambda: qm(**_kw(), flag=False), "input [1]['flag'] was True at capture and is False now")


def test_quantized_model_rejects_wrong_feature_size(pos_quantized):
    # x was (3, 32): dim 1 is static (the linear needs 32); the call is refused up front,
    # naming the input, rather than failing inside a kernel.
    _, qm = pos_quantized
    _raises(InputMismatchError, lambda: qm(torch.randn(3, 16)), "input [0][0] dimension 1 is 16")


def test_tensor_where_specialized_bool_was(kw_model):
    qm = qcompile.quantize(kw_model, (), {**_kw(), "flag": True}, progress=False)
    # The captured graph always adds 1 (flag=True was baked in); with flag=tensor(False) the
    # model would not, so the quantized model refuses rather than return y + 1.
    _raises(InputMismatchError, lambda: qm(**_kw(), flag=torch.tensor(False)), "['flag']")


# --------------------------------------------------------------------------------------
# torch.compile backend options


@pytest.mark.parametrize(
    "options, words",
    [
        ({"recipe": "w4a16", "bogus": 1}, ["unknown qcompile backend option(s) ['bogus']", "known:"]),
        ({"inner": "tvm"}, ["option inner must be one of", "'tvm'"]),
        ({"recipe": "w3a16"}, ["unknown recipe 'w3a16'"]),
        ({"recipe": {"preset": "w4a16", "group_size": 0}}, ["group_size", "got 0"]),
    ],
    ids=["unknown-option", "bad-inner", "unknown-recipe", "bad-recipe-dict"],
)
def test_bad_backend_options_raise_recipe_error(options, words):
    from torch._dynamo.exc import BackendCompilerFailed

    torch.manual_seed(2)
    compiled = torch.compile(Linear2().eval(), backend="qcompile", options=options)
    with pytest.raises(BackendCompilerFailed) as info:  # torch wraps every backend exception
        compiled(torch.randn(2, 32))
    inner = getattr(info.value, "inner_exception", None) or info.value.__cause__ or info.value.__context__
    assert type(inner) is RecipeError, repr(inner)
    for w in words:
        assert w in str(inner), (w, str(inner))
        assert w in str(info.value)  # and torch's message carries it
    assert "RecipeError" in str(info.value)
