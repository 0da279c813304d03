"""The per-layer report of a quantized model: what each layer became and what it cost."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .pipeline import PassRecord
from .recipe import Recipe

__all__ = ["format_bytes", "Report"]


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _rotation_cell(row: dict[str, Any]) -> str:
    """Short form of a layer's rotations: its input (online / residual stream), its output."""
    text = row.get("rotation", "")
    parts = ["online input" if text.startswith("online") else "residual stream" if text else "-"]
    if "rotation_out" in row:
        parts.append("writes residual stream")
    return ", ".join(parts)


def _omega_cell(row: dict[str, Any]) -> str:
    """``w3 1.2e-03  w4* 3.0e-04 ...``: the sensitivity of each candidate, the chosen one starred."""
    chosen = str(row.get("precision", "")).split(" ")[0]
    return "  ".join(f"{name}{'*' if name == chosen else ''} {value:.2e}"
                     for name, value in row.get("omega", {}).items()) or "-"


@dataclass
class Report:
    recipe: Recipe
    layers: list[dict[str, Any]]
    passes: list[PassRecord] = field(default_factory=list)
    error_inputs: str = "example inputs"
    notes: list[str] = field(default_factory=list)  # model-level findings of the passes
    precision: dict[str, Any] | None = None  # assign_precision's problem and solution (budget recipes)

    @property
    def quantized_bytes(self) -> int:
        return sum(int(r.get("bytes", r.get("float_bytes", 0))) for r in self.layers)

    @property
    def float_bytes(self) -> int:
        return sum(int(r.get("float_bytes", 0)) for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.name,
            "layers": [{k: v for k, v in r.items() if k != "node"} for r in self.layers],
            "passes": [vars(p) for p in self.passes],
            "notes": list(self.notes),
            "linear_bytes": {"float": self.float_bytes, "quantized": self.quantized_bytes},
        }

    def table(self) -> str:
        smoothing = any("smoothing" in r for r in self.layers)
        rotation = any("rotation" in r or "rotation_out" in r for r in self.layers)
        precision = any("omega" in r for r in self.layers)  # a budget's per-layer choice
        head = ("layer", "shape", "format", "bits", "bytes", "out err") + (("smoothing",) if smoothing else ()) \
            + (("rotation",) if rotation else ()) + (("Ω per candidate (chosen*)",) if precision else ()) + ("note",)
        rows = [
            (
                r["layer"],
                f"{r['shape'][0]}x{r['shape'][1]}",
                r.get("format", "float"),
                str(r.get("bits", "")),
                format_bytes(r.get("bytes", r.get("float_bytes", 0))),
                f"{r['output_error']:.2e}" if "output_error" in r else "-",
                *((r.get("smoothing", "-"),) if smoothing else ()),
                *((_rotation_cell(r),) if rotation else ()),
                *((_omega_cell(r),) if precision else ()),
                r.get("note", ""),
            )
            for r in self.layers
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out = [f"qcompile report — recipe {self.recipe.name} ({self.recipe.weight_format})", line(head)]
        out.append("  ".join("-" * w for w in widths))
        out += [line(r) for r in rows]
        if self.float_bytes:
            out.append(
                f"linear weights: {format_bytes(self.float_bytes)} float -> {format_bytes(self.quantized_bytes)} "
                f"({self.float_bytes / max(self.quantized_bytes, 1):.2f}x smaller); "
                f"out err = relative output error of each layer on the {self.error_inputs}"
            )
        out += [f"note: {n}" for n in self.notes]
        if self.passes:
            out.append("passes: " + ", ".join(_pass_text(p) for p in self.passes))
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _pass_text(p: Any) -> str:
    """One pass of the log: its time, op counts, and what its check cost."""
    check = ""
    if p.verified != "none":
        peak = f", peak {format_bytes(p.verify_peak_bytes)} resident" if p.verify_peak_bytes else ""
        check = f", check {p.verify_seconds * 1000:.0f} ms{peak}"
    return f"{p.name} {p.seconds * 1000:.0f} ms ({p.nodes_before}->{p.nodes_after} ops, verified {p.verified}{check})"
