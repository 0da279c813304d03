"""Cut a canonical graph into consecutive stages at single-tensor cut points.

Pure graph analysis (no numerics, no names): a model too large for memory is quantized
stage by stage, each stage reading only what earlier stages left it. A *cut point* is a
position in the graph's (topological) node order where exactly one *main* tensor is
live: computed before the position and read after it. Everything else live there must
be a *side value* — a value computed from the graph inputs and at most 1-D constants
alone: positions, attention masks, rotary cos/sin tables, sizes. Side values are cheap
and many layers read them, so they are carried to every stage that needs them instead
of blocking the cut. Uses by the graph's output node do not make a value live (a
decoder's returned KV cache would otherwise span every layer): a stage hands its graph
outputs over as it finishes. Constants (``get_attr``) belong to the stages that read them.

The cut points split a transformer at every residual add (attention half, MLP half).
The segments between cut points are then merged: a segment without a quantizable linear
joins its neighbour (the embedding joins the first block, the final norm the last; with
``separate_tables`` a linearless segment reading a weight matrix, such as the embedding
lookup, stays a stage of its own), and
the longest periodic run of segments with the same linear shapes is grouped by its
period, so a decoder's stages are exactly its layers. The cut points are the
articulation points of the dataflow graph (with side values and constants removed) that
also order it: ``networkx`` checks this in :func:`articulation_cut_points`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from .graph_utils import get_constant, quantizable_linears

__all__ = ["Stage", "side_values", "cut_points", "articulation_cut_points", "find_stages", "stage_module"]


@dataclass
class Stage:
    """One block of consecutive nodes of the parent graph.

    Attributes:
        index: position in the stage list.
        nodes: the parent's ``call_function`` nodes of this stage, in graph order.
        inputs: values made before this stage (graph inputs included) that it reads.
        outputs: values this stage makes that later stages read.
        graph_outputs: values this stage makes that the graph's output node reads.
        constants: the ``get_attr`` nodes this stage reads.
        linears: the quantizable linears of this stage, in graph order.
        side_inputs: the inputs that are side values (graph inputs, masks, positions).
    """

    index: int
    nodes: list[fx.Node]
    inputs: list[fx.Node] = field(default_factory=list)
    outputs: list[fx.Node] = field(default_factory=list)
    graph_outputs: list[fx.Node] = field(default_factory=list)
    constants: list[fx.Node] = field(default_factory=list)
    linears: list[fx.Node] = field(default_factory=list)
    side_inputs: list[fx.Node] = field(default_factory=list)

    @property
    def main_inputs(self) -> list[fx.Node]:
        """The inputs that are not side values (one for every stage after a cut point)."""
        return [n for n in self.inputs if n not in self.side_inputs]


def _is_large_constant(gm: fx.GraphModule, node: fx.Node) -> bool:
    tensor = get_constant(gm, node)
    return tensor is not None and tensor.dim() >= 2


def side_values(gm: fx.GraphModule) -> set[fx.Node]:
    """Values computed from graph inputs and <= 1-D constants only, or that are not tensors.

    They carry no learned matrix (positions, masks, rotary tables, sizes) and are carried
    to every stage that reads them.
    """
    heavy: set[fx.Node] = set()
    side: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if _is_large_constant(gm, node):
                heavy.add(node)
            continue
        if node.op == "output":
            continue
        if any(a in heavy for a in node.all_input_nodes):
            heavy.add(node)
        val = node.meta.get("val")
        if node not in heavy or not isinstance(val, torch.Tensor):
            side.add(node)
    return side


def _order(gm: fx.GraphModule) -> tuple[list[fx.Node], dict[fx.Node, int]]:
    """Placeholders and call_function nodes in graph order, with their positions."""
    nodes = [n for n in gm.graph.nodes if n.op in ("placeholder", "call_function")]
    return nodes, {n: i for i, n in enumerate(nodes)}


def _last_use(nodes: list[fx.Node], pos: dict[fx.Node, int]) -> dict[fx.Node, int]:
    """Position of the last reader of each value (the output node does not count)."""
    return {n: max((pos[u] for u in n.users if u in pos), default=pos[n]) for n in nodes}


def cut_points(gm: fx.GraphModule, side: set[fx.Node] | None = None) -> list[int]:
    """Positions ``i`` (into placeholders + call_function nodes, graph order) after which
    exactly one main (non-side) tensor is live; the value live there is ``nodes[j]`` for
    some ``j <= i``. Sorted; the last node's position is never a cut."""
    side = side_values(gm) if side is None else side
    nodes, pos = _order(gm)
    last = _last_use(nodes, pos)
    delta = [0] * (len(nodes) + 1)
    for n in nodes:
        if n in side or last[n] <= pos[n]:
            continue
        delta[pos[n]] += 1  # live after its own position, up to (not after) its last use
        delta[last[n]] -= 1
    cuts, live = [], 0
    for i in range(len(nodes) - 1):
        live += delta[i]
        if live == 1 and nodes[i].op == "call_function":
            cuts.append(i)
    return cuts


def articulation_cut_points(gm: fx.GraphModule, side: set[fx.Node] | None = None) -> set[fx.Node]:
    """The articulation points of the undirected dataflow graph without side values and
    constants (networkx). Every value live alone at a cut point of :func:`cut_points` is
    one, unless it starts the main dataflow (the embedding: it reads only side values and
    constants)."""
    import networkx as nx

    side = side_values(gm) if side is None else side
    graph = nx.Graph()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node in side:
            continue
        graph.add_node(node)
        for a in node.all_input_nodes:
            if a.op == "call_function" and a not in side:
                graph.add_edge(a, node)
    return set(nx.articulation_points(graph))


def _segments(gm: fx.GraphModule, side: set[fx.Node]) -> list[list[fx.Node]]:
    nodes, _ = _order(gm)
    bounds = [-1, *cut_points(gm, side), len(nodes) - 1]
    segs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = [n for n in nodes[a + 1:b + 1] if n.op == "call_function"]
        if seg:
            segs.append(seg)
    return segs


def _merge_linearless(segs: list[list[fx.Node]], linears: set[fx.Node],
                      alone: Callable[[list[fx.Node]], bool] | None = None) -> list[list[fx.Node]]:
    """Join every segment without a quantizable linear to the next one (the last ones to the
    previous), except those for which ``alone(segment)`` holds: they stay stages of their own."""
    out: list[list[fx.Node]] = []
    pending: list[fx.Node] = []
    for seg in segs:
        if alone is not None and not any(n in linears for n in seg) and alone(seg):
            out.append(pending + seg)
            pending = []
            continue
        pending = pending + seg
        if any(n in linears for n in seg):
            out.append(pending)
            pending = []
    if pending:
        if out:
            out[-1] = out[-1] + pending
        else:
            out.append(pending)
    return out


def _signature(gm: fx.GraphModule, seg: list[fx.Node], linears: set[fx.Node]) -> tuple:
    return tuple(tuple(get_constant(gm, n.args[1]).shape) for n in seg if n in linears)


def _group_periodic(sigs: list[tuple]) -> list[tuple[int, int]]:
    """``(start, end)`` ranges of segments per stage: the longest run of >= 2 equal groups of
    ``p`` consecutive segments becomes one stage per group; other segments stay alone."""
    n = len(sigs)
    best = (0, 1, 0, 0)  # (covered, -p, start, groups)
    for p in range(1, n // 2 + 1):
        for start in range(n):
            groups = 1
            while start + (groups + 1) * p <= n and sigs[start + groups * p:start + (groups + 1) * p] == sigs[start:start + p]:
                groups += 1
            if groups >= 2 and (groups * p, -p) > best[:2]:
                best = (groups * p, -p, start, groups)
    covered, neg_p, start, groups = best
    if not covered:
        return [(i, i + 1) for i in range(n)]
    p = -neg_p
    ranges = [(i, i + 1) for i in range(start)]
    ranges += [(start + g * p, start + (g + 1) * p) for g in range(groups)]
    ranges += [(i, i + 1) for i in range(start + groups * p, n)]
    return ranges


def _reads_matrix(gm: fx.GraphModule, seg: list[fx.Node]) -> bool:
    """Whether a segment reads a constant of 2 or more dimensions (an embedding table)."""
    return any(a.op == "get_attr" and _is_large_constant(gm, a) for n in seg for a in n.all_input_nodes)


def find_stages(gm: fx.GraphModule, *, group: bool = True, separate_tables: bool = False) -> list[Stage]:
    """Consecutive stages of ``gm`` (see the module docstring). ``group=False`` keeps one
    stage per segment between cut points that holds a linear (a transformer's halves).
    ``separate_tables=True`` keeps a segment without a linear that reads a weight matrix
    (an embedding lookup table) as a stage of its own instead of joining it to its
    neighbour, so that a stage-by-stage run never holds the table and a block's weights
    (and its GPTQ working set) at once; the stages' results are the same either way."""
    side = side_values(gm)
    linears = set(quantizable_linears(gm))
    alone = (lambda seg: _reads_matrix(gm, seg)) if separate_tables else None
    segs = _merge_linearless(_segments(gm, side), linears, alone)
    if group and len(segs) > 1:
        sigs = [_signature(gm, s, linears) for s in segs]
        segs = [sum(segs[a:b], []) for a, b in _group_periodic(sigs)]
    stage_of: dict[fx.Node, int] = {}
    for i, seg in enumerate(segs):
        for n in seg:
            stage_of[n] = i
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            stage_of[n] = -1
    stages = [Stage(i, seg) for i, seg in enumerate(segs)]
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    for stage in stages:
        seen_in: set[fx.Node] = set()
        seen_c: set[fx.Node] = set()
        members = set(stage.nodes)
        for n in stage.nodes:
            for a in n.all_input_nodes:
                if a.op == "get_attr":
                    if a not in seen_c:
                        seen_c.add(a)
                        stage.constants.append(a)
                elif a not in members and a not in seen_in:
                    seen_in.add(a)
                    stage.inputs.append(a)
            if n in linears:
                stage.linears.append(n)
            later = [u for u in n.users if u is not output_node and stage_of.get(u, -1) > stage.index]
            if later:
                stage.outputs.append(n)
            if output_node in n.users:
                stage.graph_outputs.append(n)
        stage.side_inputs = [n for n in stage.inputs if n in side]
    return stages


def stage_module(
    gm: fx.GraphModule, stage: Stage, constant: Callable[[fx.Node], torch.Tensor] | None = None,
    *, with_graph_outputs: bool = False,
) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A GraphModule computing ``stage``: placeholders = ``stage.inputs``, returns the tuple
    ``stage.outputs`` (+ ``stage.graph_outputs`` with ``with_graph_outputs``).

    ``constant(get_attr_node)`` gives each constant's tensor (default: the parent's own);
    the copies keep the parent nodes' metadata (layer names, shapes). Returns the module
    and the map parent node -> its copy.
    """
    fetch = constant or (lambda node: get_constant(gm, node))
    root = torch.nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in stage.inputs:
        env[n] = graph.placeholder(n.name)
        env[n].meta = dict(n.meta)
    for i, n in enumerate(stage.constants):
        name = f"c{i}"
        root.register_buffer(name, fetch(n), persistent=True)
        env[n] = graph.get_attr(name)
        env[n].meta = dict(n.meta)
    for n in stage.nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
    outs: list[Any] = [env[n] for n in stage.outputs]
    if with_graph_outputs:
        outs += [env[n] for n in stage.graph_outputs]
    graph.output(tuple(outs))
    module = fx.GraphModule(root, graph, class_name=f"Stage{stage.index}")
    return module, env
