"""Tests of qcompile.export: ONNX layouts, parity with ONNX Runtime, options, bad input, CLI."""
