"""``qcompile quantize ... --export onnx [--flavor F]`` and ``qcompile inspect model.onnx``."""
from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.cli import EXIT_USER_ERROR, main
from qcompile.export import inference_session, onnx_feeds
from tests.export import small_models
from tests.export.helpers import EXACT_RTOL, float32_reference, worst_relative_error

MLP = "tests.export.small_models:mlp"


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def qdq_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    assert main(["quantize", MLP, "--recipe", "w4a16", "--out", str(out), "--export", "onnx", "--flavor", "qdq"]) == 0
    return out


def test_quantize_writes_model_onnx_that_runs(qdq_folder):
    out = qdq_folder
    assert sorted(p.name for p in out.iterdir()) == [
        "graph.txt", "model.onnx", "report.json", "report.txt", "weights.safetensors"
    ]
    model, args = small_models.mlp()
    qm = qcompile.quantize(model, args, recipe="w4a16", progress=False, verify=False)  # RTN: deterministic
    x = (torch.randn(6, 64),)
    outputs = inference_session(out / "model.onnx").run(None, onnx_feeds(qm, x))
    err, _ = worst_relative_error(outputs, float32_reference(qm)(x, {}), ["output"])
    assert err < EXACT_RTOL


def test_inspect_onnx_file(qdq_folder, capsys):
    rc, out, _ = _run(capsys, "inspect", qdq_folder / "model.onnx")
    assert rc == 0
    assert "ops by domain:" in out and "ai.onnx" in out and "DequantizeLinear" in out
    assert "tensor bytes by dtype" in out and "UINT4" in out and "FLOAT" in out
    assert "qcompile.flavor: qdq" in out and "['batch', 64]" in out


def test_inspect_folder_shows_the_onnx_file_too(qdq_folder, capsys):
    rc, out, _ = _run(capsys, "inspect", qdq_folder)
    assert rc == 0 and "qcompile report" in out and "DequantizeLinear" in out


def test_default_flavor_is_ort(tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, _ = _run(capsys, "quantize", MLP, "--recipe", "w8a16", "--out", out, "--export", "onnx")
    assert rc == 0 and "model.onnx (flavor ort, opset 21)" in stdout
    rc, text, _ = _run(capsys, "inspect", out / "model.onnx")
    assert "com.microsoft" in text and "MatMulNBits" in text


def test_flavor_without_export_is_refused(tmp_path, capsys):
    rc, _, err = _run(capsys, "quantize", MLP, "--out", tmp_path / "out", "--flavor", "qdq")
    assert rc == EXIT_USER_ERROR and "--export onnx" in err
    assert not (tmp_path / "out").exists()


def test_failed_export_leaves_no_output_folder(tmp_path, capsys):
    rc, _, err = _run(capsys, "quantize", "tests.export.small_models:custom_op_model", "--out", tmp_path / "out",
                      "--export", "onnx")
    assert rc == EXIT_USER_ERROR and "qcompile_test::twice" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_inspect_missing_or_broken_onnx_file(tmp_path, capsys):
    rc, _, err = _run(capsys, "inspect", tmp_path / "missing.onnx")
    assert rc == EXIT_USER_ERROR and "no such ONNX file" in err
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x00not a protobuf\xff" * 10)
    rc, _, err = _run(capsys, "inspect", broken)
    assert rc == EXIT_USER_ERROR and "not a readable ONNX model" in err


def test_w8a8_per_tensor_activations_from_the_command_line(tmp_path, capsys):
    calib = tmp_path / "calib.pt"
    gen = torch.Generator().manual_seed(2)
    torch.save([(torch.randn(4, 64, generator=gen),) for _ in range(2)], calib)
    common = ["quantize", MLP, "--recipe", "w8a8", "--calib", calib]
    rc, _, err = _run(capsys, *common, "--out", tmp_path / "no", "--w8a8-activations", "per-tensor")
    assert rc == EXIT_USER_ERROR and "add --export onnx" in err and not (tmp_path / "no").exists()
    rc, _, err = _run(capsys, *common, "--out", tmp_path / "qdq", "--export", "onnx", "--flavor", "qdq",
                      "--w8a8-activations", "per-tensor")
    assert rc == EXIT_USER_ERROR and "w8a8_activations" in err and not (tmp_path / "qdq").exists()

    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, *common, "--out", out, "--export", "onnx", "--w8a8-activations", "per-tensor")
    assert rc == 0, err
    import onnx  # noqa: PLC0415

    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    # the MLP's 2 linears: ONNX Runtime's per-tensor dynamic quantization feeding its integer matmul,
    # none of the exact per-token form's per-row QuantizeLinear
    assert ops.count("DynamicQuantizeLinear") == 2 and ops.count("MatMulIntegerToFloat") == 2, ops
    assert "QuantizeLinear" not in ops
    assert "note:" in stdout and "per-tensor" in stdout
