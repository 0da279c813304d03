"""The ``qcompile`` command line.

    qcompile demo                          the main job: quantize the real MiniLM, report
    qcompile quantize MODEL --recipe R --out DIR [--calib FILE] [--export onnx [--flavor F]]
    qcompile quantize HF_DIR --recipe R --out DIR --max-memory 2GB [--export onnx]
                                           streams stage by stage when needed
    torchrun --nproc-per-node N -m qcompile.cli quantize HF_DIR --stream ...
                                           the same, calibrating across N processes
    qcompile inspect MODEL [--recipe R]    the per-layer plan and the rewritten graph
    qcompile inspect DIR                   what `qcompile quantize` wrote
    qcompile inspect model.onnx            an ONNX file: ops by domain, tensor bytes by dtype

Exit codes: 0 success, 2 bad command line, 3 an error you can fix (named in the message),
1 an unexpected failure (with its traceback).

Warnings raised inside torch or transformers are not shown (see ``library_warnings_hidden``);
qcompile's own warnings, and those of any other package, are.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from types import FrameType

import numpy as np
import torch

from .demo import DEFAULT_RECIPES
from .errors import CalibrationError, ExportError, ModelLoadError, OutputExistsError, QcompileError
from .recipe import PRESETS

__all__ = [
    "EXIT_USER_ERROR",
    "cmd_demo",
    "cmd_quantize",
    "parse_size",
    "cmd_inspect",
    "build_parser",
    "library_warnings_hidden",
    "warning_origin",
    "main",
]

EXIT_USER_ERROR = 3


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="w8a16", help=f"preset ({', '.join(sorted(PRESETS))}); default w8a16")
    p.add_argument("--group-size", type=int, default=None, help="override the preset's group size (0 = per-channel)")
    p.add_argument("--keep-float", action="append", default=[], metavar="GLOB",
                   help="layer-name pattern to leave in floating point (repeatable)")
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="calibration data: a text file (one text per line) or a .pt list of batches")


def _recipe_from(args: argparse.Namespace):
    from .recipe import resolve_recipe

    recipe = resolve_recipe(args.recipe)
    changes = {}
    if args.group_size is not None:
        changes["group_size"] = None if args.group_size == 0 else args.group_size
    if args.keep_float:
        changes["keep_float"] = tuple(args.keep_float)
    return recipe.replace(**changes) if changes else recipe


def _quantize_loaded(args: argparse.Namespace):
    from .api import quantize
    from .model_loading import load_calibration, load_model

    recipe = _recipe_from(args)  # a bad recipe is reported before a model is loaded
    loaded = load_model(args.model)
    calibration = load_calibration(args.calib, loaded) if args.calib else None
    ex_args, ex_kwargs = loaded.example
    qm = quantize(loaded.model, ex_args, ex_kwargs, recipe=recipe, calibration=calibration)
    return loaded, qm


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_demo, resolve_recipes, run_demo

    recipes = args.recipes.split(",")
    resolve_recipes(recipes)  # an unknown preset is reported before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_demo(recipes, n_calib=args.n_calib, n_eval=args.n_eval, batch=args.batch, seq=args.seq,
                      rounds=args.rounds, check_cpu=not args.no_cpu_check, progress=not args.quiet)
    print(format_demo(result))
    if args.show_report:
        for row in result.rows:
            for report in row.reports:
                print()
                print(report)
    return 0


def _write_output(out: Path, loaded, qm, onnx_flavor: str | None = None, onnx_options: dict | None = None):
    """Write the quantized model's artifacts into ``out`` atomically (a temp folder, then rename).

    With ``onnx_flavor``, ``model.onnx`` is exported into the same folder first (with
    ``onnx_options``, keyword arguments of ``to_onnx``); returns that export's :class:`qcompile.export.OnnxExport` (None without it).
    """
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # mkdtemp makes the folder private (0700) and safetensors writes 0600 files; give the
        # result the permissions mkdir/open would (the umask's), like any other output.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        report = qm.report()
        (tmp / "report.txt").write_text(str(report) + "\n")
        (tmp / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        (tmp / "graph.txt").write_text(qm.graph_module.print_readable(print_output=False))
        tensors = {k: v.contiguous() for k, v in qm.graph_module.state_dict().items()}
        save_file(tensors, str(tmp / "weights.safetensors"), metadata={"recipe": report.recipe.name,
                                                                       "model": loaded.description})
        (tmp / "weights.safetensors").chmod(0o666 & ~umask)
        exported = None
        if onnx_flavor is not None:
            from qcompile.export import to_onnx

            exported = to_onnx(qm, tmp / "model.onnx", flavor=onnx_flavor, **(onnx_options or {}))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return exported


def cmd_quantize(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists():
        raise OutputExistsError(f"output folder {out} exists; choose another --out or remove it first")
    if not out.parent.is_dir():
        raise OutputExistsError(f"the parent folder of --out ({out.parent}) does not exist")
    if args.flavor is not None and args.export != "onnx":
        raise ExportError(f"--flavor {args.flavor} applies to the ONNX export; add --export onnx")
    if args.w8a8_activations is not None and args.export != "onnx":
        raise ExportError(f"--w8a8-activations {args.w8a8_activations} applies to the ONNX export; add --export onnx")
    streaming = _should_stream(args)
    world = _launched_world_size()
    if world > 1 and not streaming:
        raise QcompileError(
            f"launched as {world} processes (WORLD_SIZE={world}, e.g. by torchrun): only streaming quantization of "
            "a Hugging Face folder runs distributed (calibration batches shared across the processes); add --stream, "
            "or run a single process")
    if streaming:
        with _process_group(world) as group:
            return _cmd_quantize_streaming(args, out, group)
    loaded, qm = _quantize_loaded(args)
    flavor = (args.flavor or "ort") if args.export == "onnx" else None
    exported = _write_output(out, loaded, qm, onnx_flavor=flavor, onnx_options=_onnx_options(args))
    print(qm.report())
    written = "report.txt, report.json, graph.txt, weights.safetensors"
    if exported is not None:
        written += f", model.onnx (flavor {exported.flavor}, opset {exported.opset})"
    print(f"\nwrote {out}/: {written}")
    if exported is not None:
        for note in exported.notes:
            print(f"note: {note}")
    return 0


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"2GB"`` -> 2e9 bytes (``GB`` = 10⁹, ``GiB`` = 2³⁰; ``K``/``M``/``G``/``T``, case-insensitive)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 512MiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def _positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _should_stream(args: argparse.Namespace) -> bool:
    """Stream when asked (--stream), or when --max-memory is given for a Hugging Face folder
    whose safetensors weights exceed half of it (in memory, quantization holds the float
    weights plus the graph's working copies, Hessians and quantized weights)."""
    from .checkpoint import checkpoint_bytes

    folder = Path(args.model)
    if args.stream:
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"--stream needs a local Hugging Face model folder; {args.model} is not one")
        return True
    if args.max_memory is None or not (folder / "config.json").is_file():
        return False
    return checkpoint_bytes(folder) * 2 > args.max_memory


def _stream_inputs(args: argparse.Namespace, recipe):
    """Example and calibration batches for a model folder that is never loaded whole."""
    import transformers

    from .data import stdlib_docstrings
    from .model_loading import LoadedModel, load_calibration

    folder = Path(args.model)
    tokenizer = None
    if any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        example = dict(tokenizer(stdlib_docstrings()[:2], padding=True, truncation=True, max_length=64,
                                 return_tensors="pt"))
    else:
        config = transformers.AutoConfig.from_pretrained(str(folder))
        example = {"input_ids": torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))}
    if args.calib:
        loaded = LoadedModel(torch.nn.Module(), ((), example), tokenizer, description=str(folder))
        return example, load_calibration(args.calib, loaded)
    if recipe.needs_calibration:
        raise CalibrationError(f"recipe {recipe.name!r} needs calibration data ({recipe.needs_calibration}); "
                               "pass --calib FILE")
    return example, [example]


def _launched_world_size() -> int:
    """The number of processes this one was launched among (``WORLD_SIZE``, set by torchrun; 1 without)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError as exc:
        raise QcompileError(f"environment variable WORLD_SIZE={text!r} is not a number of processes") from exc


@contextlib.contextmanager
def _process_group(world: int):
    """The default ``torch.distributed`` process group when launched as ``world`` > 1
    processes (torchrun's ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), else
    None; destroyed on exit. Backend gloo: streaming quantization computes on the CPU (weights
    memory-mapped from the shards), so the statistics it reduces are CPU tensors."""
    if world <= 1:
        yield None
        return
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method="env://")
    except ValueError as exc:  # a missing variable: launched by hand rather than by torchrun
        raise QcompileError(f"WORLD_SIZE={world} but torch.distributed cannot start ({exc}); launch with "
                            "torchrun --nproc-per-node N, which sets RANK, WORLD_SIZE, MASTER_ADDR and "
                            "MASTER_PORT") from exc
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _onnx_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of ``to_onnx`` from the command line (beyond the flavor)."""
    return {} if args.w8a8_activations is None else {"w8a8_activations": args.w8a8_activations}


def _export_streamed(flavor: str, exported: list, options: dict):
    """``before_publish`` of a streaming run: load the finished quantized model and write
    ``model.onnx`` into the folder before it becomes the output (so atomically with it)."""

    def export(work: Path) -> None:
        from qcompile.export import to_onnx

        from .streamed_model import load_streamed

        exported.append(to_onnx(load_streamed(work, progress=True), work / "model.onnx", flavor=flavor, **options))

    return export


def _cmd_quantize_streaming(args: argparse.Namespace, out: Path, group=None) -> int:
    """Stream ``args.model`` into ``out`` (only rank 0 of ``group`` prints and writes)."""
    from .checkpoint import checkpoint_bytes
    from .distributed import rank_and_world
    from .streaming import quantize_checkpoint

    rank, world = rank_and_world(group)
    recipe = _recipe_from(args)
    example, calibration = _stream_inputs(args, recipe)
    flavor = (args.flavor or "ort") if args.export == "onnx" else None
    exported: list = []
    if rank == 0:
        budget = f" (--max-memory {args.max_memory / 1e9:.2f} GB)" if args.max_memory else ""
        across = f", calibrating across {world} processes" if world > 1 else ""
        print(f"streaming {args.model}: {checkpoint_bytes(args.model) / 1e9:.2f} GB of weights{budget}, "
              f"stage by stage{across}")
    result = quantize_checkpoint(args.model, out, recipe=recipe, calibration=calibration, example=example,
                                 group=group, progress=rank == 0,
                                 before_publish=_export_streamed(flavor, exported, _onnx_options(args)) if flavor else None)
    if rank != 0:
        return 0
    print((out / "report.txt").read_text(), end="")
    total = sum(result.stage_seconds.values())
    print(f"\n{result.stages} stages ({result.resumed} resumed) in {total:.1f} s; peak resident memory "
          f"{result.peak_rss / 2**30:.2f} GiB")
    written = "manifest.json, stage-*.safetensors, config.json, example.safetensors, report.txt, report.json"
    for onnx in exported:
        written += f", model.onnx (flavor {onnx.flavor}, opset {onnx.opset})"
        if onnx.external_data is not None:
            written += f", {onnx.external_data.name}"
    print(f"wrote {out}/: {written}")
    for onnx in exported:
        for note in onnx.notes:
            print(f"note: {note}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .testing import count_ops

    target = Path(args.model)
    if target.suffix == ".onnx":
        return _inspect_onnx(target)
    if target.is_dir() and (target / "report.txt").exists():
        print((target / "report.txt").read_text(), end="")
        if (target / "model.onnx").is_file():
            print()
            _inspect_onnx(target / "model.onnx")
        return 0
    _, qm = _quantize_loaded(args)
    print(qm.report())
    print("\nops in the rewritten graph:")
    for op, n in count_ops(qm.graph_module).items():
        print(f"  {op:<40} {n}")
    if args.graph:
        print()
        print(qm.graph_module.print_readable(print_output=False))
    if args.pareto or args.pareto_png:
        _print_pareto(qm.report(), args.pareto or 11, args.pareto_png)
    return 0


def _print_pareto(report, points: int, png: str | None) -> None:
    """The budget sweep of a budget recipe: least Σ Ω per limit of its (first) budget."""
    from .pareto import pareto_frontier, plot_frontier

    frontier = pareto_frontier(report.precision, points)
    print(f"\nPareto frontier (Σ Ω, sensitivity {frontier.method}, against {frontier.unit}):")
    print(f"  {frontier.budget + ' limit':>16} {frontier.budget + ' used':>16} {'Σ Ω':>12}")
    for value, objective, used in frontier.points:
        cells = ("infeasible", "") if objective is None else (f"{used:.6g}", f"{objective:.4e}")
        print(f"  {value:>16.6g} {cells[0]:>16} {cells[1]:>12}")
    print(f"  recipe's choice: {frontier.budget} {frontier.chosen[0]:.6g}, Σ Ω {frontier.chosen[1]:.4e}")
    if png:
        print(f"wrote {plot_frontier(frontier, png)}")


def _inspect_onnx(path: Path) -> int:
    from .errors import ModelLoadError
    from .export import format_summary, summarize_onnx

    if not path.is_file():
        raise ModelLoadError(f"{path}: no such ONNX file")
    try:
        summary = summarize_onnx(path)
    except Exception as exc:  # re-raised: a file onnx cannot parse is the user's to fix
        raise ModelLoadError(f"{path} is not a readable ONNX model: {type(exc).__name__}: {exc}") from exc
    print(format_summary(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcompile", description="Graph-level quantization compiler for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="quantize the real all-MiniLM-L6-v2; print fidelity, size and speed against Inductor fp32/bf16",
        description="Compile the bundled all-MiniLM-L6-v2 with Inductor in fp32 and bf16 (the baselines) and with "
                    "the qcompile backend for each recipe; print each one's embedding cosine to fp32 on held-out "
                    "texts, its size, and its latency measured interleaved in the same run.")
    demo.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                      help=f"comma-separated presets, each compiled with the qcompile backend (default "
                           f"{','.join(DEFAULT_RECIPES)}; presets: {', '.join(sorted(PRESETS))})")
    demo.add_argument("--n-calib", type=_positive_int, default=32, help="calibration texts (default 32)")
    demo.add_argument("--n-eval", type=_positive_int, default=64, help="held-out evaluation texts (default 64)")
    demo.add_argument("--batch", type=_positive_int, default=16,
                      help="texts per batch, for calibration, evaluation and timing (default 16)")
    demo.add_argument("--seq", type=_positive_int, default=64,
                      help="tokens per text: each is padded or truncated to exactly this many (default 64)")
    demo.add_argument("--rounds", "--repeat", type=_positive_int, default=5, dest="rounds",
                      help="interleaved timing rounds; latency is the median (default 5)")
    demo.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    demo.add_argument("--show-report", action="store_true", help="also print each qcompile candidate's per-layer report")
    demo.add_argument("--no-cpu-check", action="store_true",
                      help="run recipes with int8 activations (w8a8, w8a8-static) even where this CPU's int8 matmul "
                           "is slower than float32 (without AVX-512 VNNI or AMX); by default they are skipped there. "
                           "Also drops the note on slow bfloat16 matmuls")
    demo.add_argument("--quiet", action="store_true", help="no progress lines or bars on stderr")
    demo.set_defaults(fn=cmd_demo)

    quant = sub.add_parser("quantize", help="quantize MODEL and write the result to --out")
    quant.add_argument("model", help="a local Hugging Face model folder, or package.module:factory")
    _add_recipe_args(quant)
    quant.add_argument("--out", required=True, help="output folder (must not exist)")
    quant.add_argument("--export", choices=["onnx"], default=None,
                       help="also write DIR/model.onnx (runs in stock ONNX Runtime; weights in DIR/model.onnx.data "
                            "when over 2 GB). When streaming, the export loads the quantized model into memory "
                            "(its quantized weights plus the float embeddings and norms)")
    quant.add_argument("--flavor", choices=["ort", "qdq", "qcompile"], default=None,
                       help="ONNX flavor with --export onnx: ort (MatMulNBits, default), qdq (standard "
                            "DequantizeLinear + MatMul), qcompile (qcompile-domain ops with function bodies)")
    quant.add_argument("--w8a8-activations", choices=["per-token", "per-tensor"], default=None,
                       help="with --export onnx --flavor ort, how W8A8 linears quantize their input in ONNX Runtime: "
                            "per-token (default: exactly the torch op) or per-tensor (ONNX Runtime's "
                            "DynamicQuantizeMatMul: faster, not the torch op's numerics; see BENCHMARKS.md)")
    quant.add_argument("--max-memory", type=parse_size, default=None, metavar="SIZE",
                       help="memory budget (e.g. 2GB): a Hugging Face folder whose weights exceed half of it is "
                            "quantized stage by stage, streaming weights from its safetensors shards")
    quant.add_argument("--stream", action="store_true",
                       help="always quantize a Hugging Face folder stage by stage (resumes an interrupted run "
                            "into the same --out). Under torchrun --nproc-per-node N the calibration batches are "
                            "shared across the N processes (gloo) and rank 0 writes")
    quant.set_defaults(fn=cmd_quantize)

    insp = sub.add_parser("inspect", help="print the per-layer plan and the rewritten graph's ops")
    insp.add_argument("model", help="a model (as for quantize), a folder written by `qcompile quantize`, "
                                    "or an .onnx file")
    _add_recipe_args(insp)
    insp.add_argument("--graph", action="store_true", help="also print the rewritten graph")
    insp.add_argument("--pareto", type=int, default=0, metavar="N",
                      help="with a budget recipe: print the Pareto frontier (least Σ Ω at N limits of the "
                           "recipe's budget, from the cheapest assignment to the dearest)")
    insp.add_argument("--pareto-png", metavar="PATH",
                      help="also plot the frontier (11 points unless --pareto N) to a PNG file (needs matplotlib)")
    insp.set_defaults(fn=cmd_inspect)
    return parser


#: Packages whose warnings the command line does not show. They are about how these libraries
#: work inside (deprecations between their own modules, tracing and compilation internals),
#: which a user of ``qcompile`` cannot act on.
HIDDEN_WARNING_PACKAGES = ("torch", "transformers")
# Modules that raise a warning on behalf of their caller, as the standard library's frames do
# (``warnings.deprecated`` from Python 3.13, ``copy``/``copyreg``): ``typing_extensions.deprecated``.
_ON_BEHALF = frozenset({"typing_extensions"})


def _top_package(frame: FrameType) -> str:
    return str(frame.f_globals.get("__name__", "")).partition(".")[0]


def warning_origin(frame: FrameType | None) -> str:
    """The top-level package a warning originates in, from the frame that called ``warnings.warn``
    (or the C function that warned) outwards: the innermost frame that is neither in the standard
    library nor in a module that warns on behalf of its caller; "" if every frame is.

    Not the module ``warnings`` attributes the warning to, which ``stacklevel`` sets: torch's
    ``@deprecated`` classes are attributed to ``copyreg`` when ``copy.deepcopy`` rebuilds them, a
    torch function warning with ``stacklevel=2`` to its caller, and a qcompile function called
    back by torch.fx to a torch module.
    """
    while frame is not None:
        top = _top_package(frame)
        if top and top not in sys.stdlib_module_names and top not in _ON_BEHALF:
            return top
        frame = frame.f_back
    return ""


@contextlib.contextmanager
def library_warnings_hidden(packages: tuple[str, ...] = HIDDEN_WARNING_PACKAGES):
    """Within the block, do not show warnings that originate in ``packages`` (see
    :func:`warning_origin`); show every other warning as before, through the ``showwarning``
    in place on entry. Filters (``-W``, ``PYTHONWARNINGS``, ``error``) apply as usual: only
    the display of a warning the filters let through is decided here. Restored on exit."""
    with warnings.catch_warnings():
        show = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            # our caller is warnings._showwarnmsg (or the C warning machinery, which has no frame)
            if warning_origin(sys._getframe(1)) in packages:
                return
            show(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        yield


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with library_warnings_hidden():
            return args.fn(args)
    except QcompileError as exc:
        print(f"qcompile {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
