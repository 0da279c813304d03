"""The ``qcompile`` command line: quantize, inspect, demo, and its errors.

Commands run in-process through ``qcompile.cli.main([...])`` (stdout/stderr via capsys);
the console script runs in a subprocess for its exit codes and for the demo (what reaches
stderr), and a script in a subprocess checks which warnings the CLI shows.
Exit codes: 0 success, 2 bad command line (argparse), 3 an error the user can fix,
1 an unexpected failure.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qcompile.cli import EXIT_USER_ERROR, main
from qcompile.quantizers import unpack_int4
from tests.models import factories, zoo

REPO = Path(__file__).resolve().parents[1]
LLAMA = "tests.models.factories:tiny_llama"
MLP = "tests.models.factories:tiny_mlp"


def _attr(layer: str, suffix: str) -> str:
    """The constant name lower_to_kernels gives a layer's packed weight (``a.b.weight`` -> ``a_b_weight_q4``)."""
    return re.sub(r"[^0-9a-zA-Z_]", "_", f"{layer}.weight") + suffix


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _temp_leftovers(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.*"))


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------
# qcompile quantize FACTORY --recipe w4a16


@pytest.fixture(scope="module")
def llama_w4a16(tmp_path_factory):
    """``qcompile quantize tiny_llama --recipe w4a16 --out DIR`` once for the module: (out dir, stdout)."""
    parent = tmp_path_factory.mktemp("llama")
    out = parent / "out"
    rc = main(["quantize", LLAMA, "--recipe", "w4a16", "--out", str(out)])
    assert rc == 0
    return out


def test_quantize_factory_writes_all_artifacts(llama_w4a16):
    out = llama_w4a16
    assert sorted(p.name for p in out.iterdir()) == ["graph.txt", "report.json", "report.txt", "weights.safetensors"]
    assert _temp_leftovers(out.parent, out.name) == []
    assert "qcompile report — recipe w4a16" in (out / "report.txt").read_text()
    graph = (out / "graph.txt").read_text()
    assert "torch.ops.qcompile.linear_w4a16.default" in graph
    assert "torch.ops.aten.linear.default" not in graph
    # Permissions as mkdir/open would give them (umask), not mkdtemp's private 0700.
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "weights.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_quantize_report_json_has_one_row_per_linear(llama_w4a16):
    model, _ = factories.tiny_llama()
    linears = zoo.linear_in_features(model)
    assert len(linears) == 15  # 2 layers x 7 + lm_head
    report = _load_json(llama_w4a16 / "report.json")
    assert report["recipe"] == "w4a16"
    rows = {r["layer"]: r for r in report["layers"]}
    assert len(rows) == len(report["layers"])  # one row per layer
    assert set(rows) == set(linears)
    for name, in_features in linears.items():
        row = rows[name]
        assert row["op"] == "qcompile.linear_w4a16", name
        assert row["bits"] == 4
        if in_features % 128 == 0:
            assert row["group_size"] == 128 and row["format"].startswith("int4 g128 asym"), row
        else:  # mlp.down_proj: in_features 192 falls back to per-channel, and says so
            assert row["group_size"] is None and row["format"].startswith("int4 per-channel asym"), row
            assert "not divisible by group 128" in row["note"]
        assert row["bytes"] < row["float_bytes"] / 6
        assert 0 < row["output_error"] < 0.3
    assert report["linear_bytes"]["quantized"] < report["linear_bytes"]["float"] / 6


def test_quantize_safetensors_holds_packed_uint8_weights(llama_w4a16):
    model, _ = factories.tiny_llama()
    weights = {n + ".weight": m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    with safe_open(str(llama_w4a16 / "weights.safetensors"), "pt") as f:
        assert f.metadata() == {"recipe": "w4a16", "model": LLAMA}
        keys = set(f.keys())
        packed = {k for k in keys if k.endswith("_q4")}
        assert len(packed) == 15
        for source, w in weights.items():
            layer = source.removesuffix(".weight")
            assert _attr(layer, "") not in keys, f"float weight of {layer} still saved"
            q = f.get_tensor(_attr(layer, "_q4"))
            scales = f.get_tensor(_attr(layer, "_scales"))
            zeros = f.get_tensor(_attr(layer, "_zeros"))
            n, k = w.shape
            group = 128 if k % 128 == 0 else k
            assert q.dtype == torch.uint8 and tuple(q.shape) == (n, (k + 1) // 2), layer
            assert tuple(scales.shape) == tuple(zeros.shape) == (n, k // group), layer
            # The stored codes dequantize back to the float weight (4-bit: a few % relative error).
            codes = unpack_int4(q, k).float()
            deq = (codes.view(n, -1, group) - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)
            rel = float((deq.reshape(n, k) - w).norm() / w.norm())
            assert rel < 0.15, (layer, rel)


def test_inspect_outdir_prints_saved_report(llama_w4a16, capsys):
    rc, out, err = _run(capsys, "inspect", llama_w4a16)
    assert rc == 0
    assert out == (llama_w4a16 / "report.txt").read_text()


# --------------------------------------------------------------------------------------
# qcompile quantize HF_DIR --calib texts.txt


def test_quantize_hf_folder_with_text_calibration(tmp_path, capsys):
    model_dir = factories.write_tiny_bert_folder(tmp_path / "bert")
    texts = tmp_path / "texts.txt"
    lines = factories.example_texts() * 2  # 10 texts: 2 batches of 8 + 2
    texts.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    out = tmp_path / "out"
    rc, stdout, _ = _run(capsys, "quantize", model_dir, "--recipe", "w8a16", "--calib", texts, "--out", out)
    assert rc == 0
    assert f"wrote {out}/" in stdout
    report = _load_json(out / "report.json")
    rows = report["layers"]
    assert len(rows) == 13  # 2 layers x 6 linears + pooler
    assert {r["op"] for r in rows} == {"qcompile.linear_w8a16"}
    assert {r["format"] for r in rows} == {"int8 per-channel sym"}
    # The out-error column was measured on the calibration file's batches, not the example.
    assert "out err = relative output error of each layer on the 2 calibration batch(es)" in (out / "report.txt").read_text()
    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        assert f.metadata()["recipe"] == "w8a16"
        q = f.get_tensor(_attr("encoder.layer.0.intermediate.dense", "_q8"))
        assert q.dtype == torch.int8 and tuple(q.shape) == (128, 64)
    assert _temp_leftovers(tmp_path, "out") == []


# --------------------------------------------------------------------------------------
# Recipe flags


def test_group_size_0_is_per_channel_and_keep_float_keeps_lm_head(tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, _ = _run(capsys, "quantize", LLAMA, "--recipe", "w4a16", "--group-size", "0",
                         "--keep-float", "lm_head", "--out", out)
    assert rc == 0
    rows = {r["layer"]: r for r in _load_json(out / "report.json")["layers"]}
    assert len(rows) == 15
    lm_head = rows.pop("lm_head")
    assert lm_head["format"] == "float" and "keep_float" in lm_head["note"] and "op" not in lm_head
    for name, row in rows.items():
        assert row["group_size"] is None and row["format"].startswith("int4 per-channel"), name
        assert row["op"] == "qcompile.linear_w4a16"
    assert re.search(r"^lm_head\s+512x128\s+float\b", stdout, re.M)
    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head_weight" in keys and "lm_head_weight_q4" not in keys
        assert f.get_tensor("lm_head_weight").dtype == torch.float32
        assert tuple(f.get_tensor(_attr("model.layers.0.mlp.up_proj", "_scales")).shape) == (192, 1)


# --------------------------------------------------------------------------------------
# qcompile inspect MODEL


def test_inspect_model_prints_table_and_op_counts(capsys):
    rc, out, _ = _run(capsys, "inspect", LLAMA, "--recipe", "w4a16")
    assert rc == 0
    assert "qcompile report — recipe w4a16 (w4a16)" in out
    assert re.search(r"^model\.layers\.1\.mlp\.down_proj\s+128x192\s+int4 per-channel", out, re.M)
    assert "ops in the rewritten graph:" in out
    counts = dict(re.findall(r"^  (\S+)\s+(\d+)$", out, re.M))
    assert counts["qcompile.linear_w4a16"] == "15"
    assert "aten.linear" not in counts
    assert "def forward" not in out  # the graph only with --graph


# --------------------------------------------------------------------------------------
# Errors a user can fix: exit code 3, a message naming the problem, nothing written


def _user_error(capsys, *argv) -> str:
    rc, out, err = _run(capsys, *argv)
    assert rc == EXIT_USER_ERROR, (rc, out, err)
    # (torch.export may print the graph it traced before qcompile's message: look for the line)
    assert re.search(rf"^qcompile {argv[0]}: error: ", err, re.M), err
    assert "Traceback" not in err
    return err


def test_error_output_folder_exists(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _user_error(capsys, "quantize", MLP, "--out", out)
    assert f"output folder {out} exists" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_error_parent_folder_missing(tmp_path, capsys):
    out = tmp_path / "missing" / "out"
    err = _user_error(capsys, "quantize", MLP, "--out", out)
    assert "parent folder" in err and str(tmp_path / "missing") in err and "does not exist" in err
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    "model_spec, extra, words",
    [
        pytest.param(MLP, ["--recipe", "w3a16"], ["unknown recipe 'w3a16'", "w4a16", "w8a16"], id="unknown-recipe"),
        pytest.param(MLP, ["--recipe", "w4a16", "--group-size", "3"], ["group_size=3", "even"], id="odd-4bit-group"),
        pytest.param("not_a_model_spec", [], ["'not_a_model_spec'", "neither a local Hugging Face model folder",
                                              "package.module:factory"], id="neither-folder-nor-factory"),
        pytest.param("no_such_package.models:build", [], ["cannot import module 'no_such_package.models'"],
                     id="factory-module-missing"),
        pytest.param("tests.models.factories:no_such_factory", [], ["has no callable 'no_such_factory'"],
                     id="factory-missing"),
        pytest.param("tests.models.factories:bare_model", [], ["returned a model without example inputs",
                                                               "(model, example)"], id="factory-bare-model"),
        pytest.param("tests.models.factories:not_a_model", [], ["must return (model, example)", "got tuple"],
                     id="factory-not-a-model"),
        pytest.param("tests.models.factories:data_dependent", [], ["torch.export could not capture", "torch.compile"],
                     id="capture-fails"),
    ],
)
def test_error_bad_model_or_recipe(tmp_path, capsys, model_spec, extra, words):
    out = tmp_path / "out"
    err = _user_error(capsys, "quantize", model_spec, *extra, "--out", out)
    for w in words:
        assert w in err, (w, err)
    assert not out.exists() and _temp_leftovers(tmp_path, "out") == []


def test_error_folder_without_config_json(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    err = _user_error(capsys, "quantize", folder, "--out", tmp_path / "out")
    assert f"{folder} is a folder without config.json" in err
    err = _user_error(capsys, "inspect", folder)
    assert "without config.json" in err


def test_error_calibration_files(tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "calib.pt"
    err = _user_error(capsys, "quantize", MLP, "--calib", missing, "--out", out)
    assert f"calibration file {missing} does not exist" in err

    not_a_list = tmp_path / "dict.pt"
    torch.save({"x": torch.randn(4, 64)}, not_a_list)
    err = _user_error(capsys, "quantize", MLP, "--calib", not_a_list, "--out", out)
    assert f"{not_a_list} must hold a list of batches, got dict" in err

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a torch file")
    err = _user_error(capsys, "quantize", MLP, "--calib", corrupt, "--out", out)
    assert f"cannot read calibration file {corrupt}" in err

    texts = tmp_path / "texts.txt"
    texts.write_text("some text\n")
    err = _user_error(capsys, "quantize", MLP, "--calib", texts, "--out", out)
    assert "is a text file but" in err and "has no tokenizer" in err

    wrong_keys = tmp_path / "wrong.pt"
    torch.save([(torch.randn(3, 64),), {"x": torch.randn(3, 64)}], wrong_keys)
    err = _user_error(capsys, "quantize", MLP, "--calib", wrong_keys, "--out", out)
    assert "calibration batch 1 does not match the example inputs" in err
    assert not out.exists() and _temp_leftovers(tmp_path, "out") == []


@pytest.mark.parametrize(
    "argv",
    [
        ["frobnicate"],
        [],
        ["quantize", MLP],  # --out missing
        ["quantize", "--out", "x"],  # MODEL missing
        ["inspect"],
        ["quantize", MLP, "--out", "x", "--group-size", "four"],
        ["demo", "--n-calib", "many"],
    ],
    ids=["unknown-subcommand", "no-subcommand", "no-out", "no-model", "inspect-no-model", "group-size-not-int",
         "demo-bad-int"],
)
def test_bad_command_line_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: qcompile" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# No partial output on failure


def test_no_partial_output_when_writing_fails(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def failing_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # half-written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        main(["quantize", MLP, "--out", str(out)])
    assert not out.exists()
    assert _temp_leftovers(tmp_path, "out") == []
    assert sorted(tmp_path.iterdir()) == []


def test_no_partial_output_when_quantization_fails(tmp_path, capsys, monkeypatch):
    import qcompile.api
    from qcompile.errors import VerificationError

    def failing_quantize(*args, **kwargs):
        raise VerificationError("pass 'quantize_weights' failed verification: injected")

    monkeypatch.setattr(qcompile.api, "quantize", failing_quantize)
    out = tmp_path / "out"
    err = _user_error(capsys, "quantize", MLP, "--out", out)
    assert "pass 'quantize_weights' failed verification" in err
    assert sorted(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------
# The console script


def test_console_script_exit_codes(tmp_path):
    script = Path(sys.executable).with_name("qcompile")
    if not script.exists():
        script = shutil.which("qcompile")
    if script is None:
        pytest.skip("the qcompile console script is not installed")

    def run(*argv: str) -> subprocess.CompletedProcess:
        # cwd = the repository: the factory module is found from the working directory,
        # as with ``python -m`` (a console script's sys.path holds its own folder only).
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return subprocess.run([str(script), *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    out = tmp_path / "out"
    ok = run("quantize", MLP, "--out", str(out))
    assert ok.returncode == 0, ok.stderr
    assert "fc1" in ok.stdout and (out / "weights.safetensors").is_file()

    # The same folder again: exit 3 with the message and no traceback. (Exit 2 for a bad
    # command line is argparse's SystemExit, checked in-process above.)
    exists = run("quantize", MLP, "--recipe", "w4a16", "--out", str(out))
    assert exists.returncode == 3
    assert exists.stderr.strip() == f"qcompile quantize: error: output folder {out} exists; choose another --out or remove it first"


# --------------------------------------------------------------------------------------
# qcompile demo (the main job) at its smallest settings, and what the CLI shows on stderr


def _console_script() -> Path:
    script = Path(sys.executable).with_name("qcompile")
    if not script.exists():
        found = shutil.which("qcompile")
        if found is None:
            pytest.skip("the qcompile console script is not installed")
        script = Path(found)
    return script


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONWARNINGS")}


def _demo_rows(out: str) -> tuple[list[str], dict[str, list[float]], dict[str, str]]:
    """(the lines, {row name: [cos mean, cos min, size MiB, linears MiB, ms, speed, setup s]},
    {row name: how it was made}) of ``qcompile demo``'s output."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[head].split() == ["model", "cos", "mean", "cos", "min", "size", "MiB", "linears", "MiB",
                                   "ms/batch", "speed", "setup", "s"]
    rows, i = {}, head + 1
    while lines[i]:
        cells = lines[i].split()
        assert len(cells) == 9 and cells[7].endswith("x"), lines[i]
        rows[" ".join(cells[:2])] = [float(c) for c in cells[2:7]] + [float(cells[7][:-1]), float(cells[8])]
        i += 1
    hows = {}
    for line in lines[i + 1:]:
        if line.startswith("("):
            break
        name, _, how = line.partition("  ")
        hows[name.strip()] = how.strip()
    return lines, rows, hows


def test_demo_smallest(tmp_path):
    """The real demo through the console script: every candidate's row with finite figures,
    speeds against the Inductor fp32 row of the same run, progress on stderr and no warning
    from torch or transformers there. w4a16 (round to nearest) stands in for the default
    w4a16-gptq, whose GPTQ takes a minute on these machines; w8a8 runs only where this CPU has a
    fast int8 matmul, else the output says it was skipped and why."""
    run = subprocess.run(
        [str(_console_script()), "demo", "--n-calib", "4", "--n-eval", "8", "--batch", "4", "--seq", "16",
         "--rounds", "1", "--recipes", "w8a8,w4a16"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    lines, rows, hows = _demo_rows(run.stdout)
    assert lines[0].startswith("all-MiniLM-L6-v2 (real weights)")
    assert "calibration: 4 texts; evaluation: 8 other texts" in lines[1]
    assert "one batch of 4 x 16 tokens" in lines[2] and "median of 1 interleaved rounds" in lines[2]
    skipped = any(line.startswith("note: skipped w8a8: on this CPU") for line in lines)
    assert list(rows) == ["Inductor fp32", "Inductor bf16"] + ([] if skipped else ["qcompile w8a8"]) \
        + ["qcompile w4a16"]
    for name, (cos_mean, cos_min, size, linears, ms, speed, setup) in rows.items():
        assert all(math.isfinite(v) for v in rows[name]), (name, rows[name])
        assert 0.9 < cos_min <= cos_mean <= 1.0 + 1e-6, name
        assert ms > 0 and speed > 0 and setup > 0 and 0 < linears < size, name
    fp32 = rows["Inductor fp32"]
    assert fp32[:2] == [1.0, 1.0] and fp32[5] == 1.0  # the eager fp32 reference, compiled: same embeddings
    for name, row in rows.items():  # speed = Inductor fp32 ms / this row's ms, both of this run
        assert row[5] == pytest.approx(fp32[4] / row[4], rel=0.02, abs=0.01), name
    assert rows["Inductor bf16"][2] == pytest.approx(fp32[2] / 2, rel=0.01)
    if not skipped:
        assert rows["qcompile w8a8"][1] > 0.99  # int8 weights and activations stay close to fp32
        assert rows["qcompile w8a8"][3] < fp32[3] / 3.5
    assert rows["qcompile w4a16"][3] < fp32[3] / 6
    assert hows["Inductor fp32"] == "torch.compile(model)"
    assert hows["qcompile w4a16"].startswith(
        'torch.compile(model, backend="qcompile", options={"recipe": "w4a16", "calibration": batches})')
    # stderr: the demo's status lines and progress bars only
    assert "[demo] loading all-MiniLM-L6-v2" in run.stderr
    assert f"[demo] timing {len(rows)} candidates" in run.stderr
    shown = [line for line in run.stderr.splitlines() if re.search(r"\w+Warning: ", line)]
    assert [line for line in shown if "GPTQWarning" not in line and "/qcompile/" not in line] == [], shown


def test_demo_unknown_recipe_is_named_before_loading(capsys):
    err = _user_error(capsys, "demo", "--recipes", "w8a8,w5a5")
    assert err.startswith("qcompile demo: error: unknown recipe 'w5a5'; presets: ")
    assert "w4a16-gptq" in err
    err = _user_error(capsys, "demo", "--recipes", "w8a8,,w4a16")
    assert "one or more preset names" in err


@pytest.mark.parametrize("argv", [["--n-eval", "0"], ["--batch", "-1"], ["--rounds", "x"]])
def test_demo_bad_numbers_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])
    assert exc.value.code == 2
    assert "usage: qcompile demo" in capsys.readouterr().err


# A stand-in for code of another package: ``in_module(name, source)`` runs ``source`` with
# ``__name__ == name``, which is what decides where a warning originates.
_WARNING_SCRIPT = r"""
import copy, sys, warnings
import torch
import qcompile.demo
from qcompile.cli import main
from qcompile.demo import CandidateResult, DemoResult
from qcompile.gptq import gptq_quantize


def in_module(name, source):
    namespace = {"__name__": name}
    exec(compile(source, f"<{name}>", "exec"), namespace)
    return namespace


TORCH = in_module("torch._qcompile_test", '''
import copy, warnings, typing_extensions

@typing_extensions.deprecated("torch-internal: Spec is deprecated", category=FutureWarning)
class Spec:
    pass

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    SPEC = Spec()

def copy_spec():
    return copy.deepcopy([SPEC])
''')
TRANSFORMERS = in_module("transformers._qcompile_test", '''
import warnings

def deprecated_helper():
    warnings.warn("transformers-internal: deprecated_helper is deprecated", FutureWarning, stacklevel=2)
''')


def warn_all():
    torch.nn.functional.softmax(torch.zeros(2, 3))  # torch warns with stacklevel=2: attributed to this line
    TORCH["copy_spec"]()
    TRANSFORMERS["deprecated_helper"]()
    h = torch.eye(8, dtype=torch.float64)
    h[0, 1] = h[1, 0] = 1.05  # not positive definite: GPTQ raises the dampening, with a GPTQWarning
    gptq_quantize(torch.randn(4, 8), h, 8)
    warnings.warn("the user's own warning", UserWarning)


def fake_run_demo(recipes, **kwargs):
    warn_all()
    row = CandidateResult("Inductor fp32", "torch.compile(model)", 1.0, 1.0, 100, 40, 5.0, 1.0, 2.0)
    return DemoResult([row], 1, 1, 1, 2, 2, 1, 1, 3.0)


if sys.argv[1] == "bare":
    warn_all()
else:
    qcompile.demo.run_demo = fake_run_demo
    sys.exit(main(["demo"]))
"""


def test_cli_hides_torch_and_transformers_warnings_only(tmp_path):
    """Through the CLI, warnings originating in torch or transformers do not reach stderr (also when
    ``stacklevel`` or ``@deprecated`` attribute them elsewhere); qcompile's own and others' do."""
    script = tmp_path / "warn_through_cli.py"
    script.write_text(_WARNING_SCRIPT)

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), mode], cwd=tmp_path, env=_clean_env(),
                              capture_output=True, text=True, timeout=300)

    library = ["Implicit dimension choice for softmax", "torch-internal: Spec is deprecated",
               "transformers-internal: deprecated_helper is deprecated"]
    ours = ["GPTQWarning: GPTQ: the dampened Hessian (8x8) was not positive definite", "the user's own warning"]
    bare = run("bare")
    assert bare.returncode == 0, bare.stderr
    for text in library + ours:  # without the CLI every one of them is shown
        assert text in bare.stderr, (text, bare.stderr)
    cli = run("cli")
    assert cli.returncode == 0, cli.stderr
    assert "Inductor fp32" in cli.stdout
    for text in ours:
        assert text in cli.stderr, (text, cli.stderr)
    for text in library:
        assert text not in cli.stderr, (text, cli.stderr)
