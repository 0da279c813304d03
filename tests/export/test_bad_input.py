"""What ``to_onnx`` refuses, and that it leaves nothing behind when it does."""
from __future__ import annotations

import onnx
import pytest
import torch

import qcompile
import qcompile.export.writer as writer
from qcompile.errors import ExportError, QcompileError
from qcompile.export import TRANSLATIONS, TranslationTable, inference_session, onnx_feeds, to_onnx
from qcompile.export import ort_contrib
from tests.export import small_models


@pytest.fixture(scope="module")
def mlp_w8():
    model, args = small_models.mlp()
    return qcompile.quantize(model, args, recipe="w8a16", progress=False, verify=False)


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_op_without_any_translation_is_named(tmp_path):
    model, args = small_models.custom_op_model()
    qm = qcompile.quantize(model, args, recipe="w8a16", progress=False, verify=False)
    for flavor in ("ort", "qdq", "qcompile"):
        with pytest.raises(ExportError) as info:
            to_onnx(qm, tmp_path / "m.onnx", flavor=flavor)
        message = str(info.value)
        assert "qcompile_test::twice" in message and f"flavor {flavor!r}" in message
        assert "flavors that support it: none" in message
        assert "qcompile::linear_w8a16" in message  # what is translated, for orientation
    assert _listing(tmp_path) == []


def test_op_without_a_translation_for_this_flavor_names_the_flavors_that_have_one(tmp_path, mlp_w8):
    op = torch.ops.qcompile.linear_w8a16.default
    table = TranslationTable()
    table.add(op, ort=ort_contrib.weight_only_linear("qcompile::linear_w8a16", 8))
    with pytest.raises(ExportError) as info:
        to_onnx(mlp_w8, tmp_path / "m.onnx", flavor="qdq", translations=table)
    message = str(info.value)
    assert "qcompile::linear_w8a16" in message and "flavor 'qdq'" in message
    assert "flavors that support it: ort" in message and "export with flavor='ort'" in message
    assert "linear_w8a16_default" in message  # the node
    assert _listing(tmp_path) == []
    # The same table exports the flavor it has.
    assert to_onnx(mlp_w8, tmp_path / "m.onnx", flavor="ort", translations=table).ops["com.microsoft.MatMulNBits"] == 2


def test_the_shipped_table_translates_every_qcompile_op_in_every_flavor():
    """... or declares, with its reason, the flavor that cannot (linear_fp8 in "qdq")."""
    for op in TRANSLATIONS.ops():
        refused = TRANSLATIONS.refusals(op)
        assert all(refused.values()), op
        assert sorted((*TRANSLATIONS.flavors_for(op), *refused)) == sorted(("ort", "qdq", "qcompile")), op
    assert TRANSLATIONS.refusals(torch.ops.qcompile.linear_fp8.default).keys() == {"qdq"}
    ops = torch.ops.qcompile
    assert set(TRANSLATIONS.ops()) >= {ops.linear_w8a16.default, ops.linear_w4a16.default, ops.linear_w8a8.default,
                                       ops.linear_fp8.default, ops.quantize_per_token.default}


def test_table_rejects_unknown_flavors_and_packets():
    table = TranslationTable()
    with pytest.raises(ValueError, match="unknown flavor"):
        table.add(torch.ops.qcompile.linear_w8a16.default, tensorrt=lambda *a: None)
    with pytest.raises(TypeError, match="OpOverload"):
        table.add(torch.ops.qcompile.linear_w8a16, ort=lambda *a: None)


def test_missing_folder(tmp_path, mlp_w8):
    target = tmp_path / "no" / "such" / "model.onnx"
    with pytest.raises(ExportError, match=r"folder .*no/such does not exist"):
        to_onnx(mlp_w8, target)
    assert not (tmp_path / "no").exists()


def test_path_is_a_folder(tmp_path, mlp_w8):
    with pytest.raises(ExportError, match="is a folder"):
        to_onnx(mlp_w8, tmp_path)


def test_over_2gb_without_external_data(tmp_path, mlp_w8, monkeypatch):
    """The size check is mocked (a real 2 GB model would take minutes): 3 GiB of tensors."""
    monkeypatch.setattr(writer, "model_nbytes", lambda model: 3 * 2**30)
    with pytest.raises(ExportError) as info:
        to_onnx(mlp_w8, tmp_path / "big.onnx", external_data=False)
    assert "3.00 GiB" in str(info.value) and "external_data=True" in str(info.value)
    assert _listing(tmp_path) == []


def test_over_2gb_gets_external_data_automatically(tmp_path, mlp_w8, monkeypatch):
    monkeypatch.setattr(writer, "model_nbytes", lambda model: 3 * 2**30)
    result = to_onnx(mlp_w8, tmp_path / "big.onnx")
    assert result.external_data == tmp_path / "big.onnx.data"
    assert _listing(tmp_path) == ["big.onnx", "big.onnx.data"]
    x = (torch.randn(3, 64),)
    assert inference_session(result.path).run(None, onnx_feeds(mlp_w8, x))[0].shape == (3, 32)


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path, mlp_w8, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous model")

    def reject(*args, **kwargs):
        raise onnx.checker.ValidationError("simulated checker failure")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    with pytest.raises(ExportError, match="simulated checker failure"):
        to_onnx(mlp_w8, target, external_data=True)
    assert _listing(tmp_path) == ["model.onnx"]
    assert target.read_bytes() == b"previous model"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"flavor": "tensorrt"}, "unknown ONNX flavor 'tensorrt'; flavors: ort, qdq, qcompile"),
        ({"opset": 17}, "opset must be an integer >= 18"),
        ({"accuracy_level": 5}, "accuracy_level must be None or one of"),
        ({"flavor": "qdq", "accuracy_level": 4}, "only the 'ort' flavor"),
        ({"external_data": "yes"}, "external_data must be None, True or False"),
    ],
)
def test_bad_options(tmp_path, mlp_w8, kwargs, match):
    with pytest.raises(ExportError, match=match):
        to_onnx(mlp_w8, tmp_path / "m.onnx", **kwargs)
    assert _listing(tmp_path) == []


def test_not_a_quantized_model(tmp_path):
    model, _ = small_models.mlp()
    with pytest.raises(ExportError, match="expects a qcompile.QuantizedModel"):
        to_onnx(model, tmp_path / "m.onnx")


def test_qdq_4bit_needs_opset_21(tmp_path):
    model, args = small_models.mlp()
    qm = qcompile.quantize(model, args, recipe="w4a16", progress=False, verify=False)
    with pytest.raises(ExportError, match=r"qcompile::linear_w4a16 .*needs opset >= 21.*opset 18"):
        to_onnx(qm, tmp_path / "m.onnx", flavor="qdq", opset=18)
    assert _listing(tmp_path) == []


def test_export_error_is_a_qcompile_error():
    assert issubclass(ExportError, QcompileError)
