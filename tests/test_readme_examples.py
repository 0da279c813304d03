"""Every Python example in README.md runs as written, in a fresh interpreter.

The ```python blocks run in order in one new process (a later block may use what an earlier
one made, as a reader would run them), in an empty working directory outside the repository,
so they see only the installed package. The shell blocks are the Quickstart's two commands
(run by CI itself) and the command-line synopsis with its placeholders (tests/test_cli.py).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    return [m.group(1) for m in _BLOCK.finditer(text)]


def test_readme_has_the_documented_examples():
    blocks = python_blocks(README.read_text())
    joined = "\n".join(blocks)
    # the entry points DESIGN.md names as the public surface
    for call in ("qcompile.quantize(", 'backend="qcompile"', "qcompile.export.to_onnx(", ".report()"):
        assert call in joined, call


def test_readme_python_examples_run(tmp_path):
    blocks = python_blocks(README.read_text())
    script = tmp_path / "readme_examples.py"
    script.write_text("\n\n".join(f"# --- README example {i + 1}\n{b}" for i, b in enumerate(blocks)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_XDIST_WORKER")}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"README examples failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert "linear weights:" in done.stdout  # qm.report() printed its summary
    assert (tmp_path / "model.onnx").is_file()  # the ONNX example wrote its file
