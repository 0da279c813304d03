"""Generation with a KV cache: a causal LM's prefill and decode steps as quantized graphs.

``model.generate()`` calls the model once on the prompt (prefill: many new tokens, the
cache empty) and then once per token (decode: one new token, the cache growing). The
model's code takes different paths for the two (transformers' attention and mask code
branch on ``query_length == 1``), so torch.export traces them as two programs. Here each
is captured from a :class:`GenerationStep`, a wrapper whose inputs and outputs are plain
tensors::

    step(input_ids [B, S], attention_mask [B, P + S], past_keys [L x [B, H, P, D]],
         past_values [L x ...]) -> (logits [B, S, V], keys [L x [B, H, P + S, D]], values)

with dynamic batch, new-token count (prefill: any S >= 2; decode: S = 1) and cache length
P (any P >= 0, so a prompt of one token is a decode step on an empty cache). Inside, the
cache is transformers' own ``DynamicCache`` filled with the given tensors, so the model's
own code (rotary positions from the cache length, causal, padding and sliding-window
masks) runs unchanged. A sliding-window model is given the full past and its mask hides
what lies outside the window: the same attention as its windowed cache, at the memory of
a full one.

Both graphs are quantized by replaying the choices made on the model's call graph
(``qcompile.decisions``): the same rounded weights (the same tensors), their own
function-preserving rewrites verified on their own example.

:class:`GenerationGraphs` runs them on a transformers ``Cache``: a ``DynamicCache``
(including its sliding-window layers) or a ``StaticCache`` without sliding-window layers.
``QuantizedModel.generate`` hands a weightless copy of the model object
(:func:`generation_shell`) to transformers' ``GenerationMixin.generate``, so sampling,
stopping criteria and batching are transformers' own.
"""
from __future__ import annotations

import copy
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .capture import CapturedGraph, capture
from .errors import CaptureError, InputMismatchError

__all__ = [
    "GenerationStep",
    "GenerationPlan",
    "GenerationGraphs",
    "StepGraph",
    "generation_plan",
    "generation_shell",
]

_CACHE_KWARGS = ("cache", "past_key_values")
# keyword arguments the example call may hold besides the token ids and the padding mask
_NEUTRAL_KWARGS = {"use_cache": (True, False, None), "return_dict": (True, None)}


def _cache_kwarg(model: torch.nn.Module) -> str | None:
    params = inspect.signature(model.forward).parameters
    return next((name for name in _CACHE_KWARGS if name in params), None)


def _dynamic_cache(keys: list[torch.Tensor], values: list[torch.Tensor]):
    """transformers' DynamicCache holding ``keys`` / ``values`` as its layers' past."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    cache.layers = []
    for k, v in zip(keys, values):
        layer = DynamicLayer()
        layer.keys, layer.values, layer.device, layer.is_initialized = k, v, k.device, True
        cache.layers.append(layer)
    return cache


class GenerationStep(torch.nn.Module):
    """One forward of a causal LM with its KV cache as plain tensor inputs and outputs."""

    def __init__(self, model: torch.nn.Module, cache_kwarg: str):
        super().__init__()
        self.model = model
        self.cache_kwarg = cache_kwarg

    def forward(self, input_ids, attention_mask, past_keys, past_values):
        cache = _dynamic_cache(list(past_keys), list(past_values))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, return_dict=True,
                         **{self.cache_kwarg: cache})
        return out.logits, [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


@dataclass
class StepGraph:
    """One captured step (``"prefill"`` or ``"decode"``) and its example inputs (flat)."""

    name: str
    captured: CapturedGraph
    example_flat: list[Any]


@dataclass
class GenerationPlan:
    """What :func:`generation_plan` found: how to capture the steps, from the example call."""

    cache_kwarg: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    output_type: type
    cache_field: str
    layer_shapes: list[tuple[tuple[int, int], tuple[int, int]]]  # per layer: ((heads, dim) of keys, of values)
    dtype: torch.dtype

    def empty_past(self, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        keys = [torch.zeros(batch, k[0], 0, k[1], dtype=self.dtype) for k, _ in self.layer_shapes]
        values = [torch.zeros(batch, v[0], 0, v[1], dtype=self.dtype) for _, v in self.layer_shapes]
        return keys, values

    def capture(self, model: torch.nn.Module) -> list[StepGraph]:
        """Capture the prefill and decode steps of ``model`` (in eval mode, no grad)."""
        step = GenerationStep(model, self.cache_kwarg)
        ids, mask = self.input_ids, self.attention_mask
        batch = ids.shape[0]
        keys, values = self.empty_past(batch)
        with torch.no_grad():
            logits, present_k, present_v = step(ids, mask, keys, values)
        # prefill: traced on a non-empty past (its length a dynamic dimension of its own), run on the empty one
        traced_mask = torch.cat([mask, mask], dim=1)
        prefill = self._capture(step, "prefill", (ids, traced_mask, present_k, present_v), (ids, mask, keys, values))
        token = logits[:, -1:].argmax(-1).to(ids.dtype)
        decode_args = (token, torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1), present_k, present_v)
        decode = self._capture(step, "decode", decode_args, decode_args)
        return [prefill, decode]

    def _capture(self, step: GenerationStep, name: str, traced: tuple, example: tuple) -> StepGraph:
        auto, static = torch.export.Dim.AUTO, torch.export.Dim.STATIC
        layers = len(self.layer_shapes)
        shapes = {
            "input_ids": {0: auto, 1: auto if name == "prefill" else static},
            "attention_mask": {0: auto, 1: auto},
            "past_keys": [{0: auto, 2: auto}] * layers,
            "past_values": [{0: auto, 2: auto}] * layers,
        }
        try:
            captured = capture(step, traced, dynamic_shapes=shapes, source_prefix="model.")
        except CaptureError as exc:
            raise CaptureError(f"the {name} step of generation could not be captured: {exc}\n"
                               "quantize with generation=False to capture only the call as given") from exc
        return StepGraph(name, captured, captured.flatten_inputs(example, {}))


def generation_plan(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[GenerationPlan | None, str]:
    """(plan, "") when ``model(*args, **kwargs)`` is a causal LM call that generation graphs
    can serve, else (None, why not)."""
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    if not (callable(can_generate) and can_generate() and hasattr(model, "generate")):
        return None, f"{type(model).__name__} is not a transformers model that generates"
    if getattr(config, "is_encoder_decoder", False):
        return None, "encoder-decoder models are not supported yet"
    cache_kwarg = _cache_kwarg(model)
    if cache_kwarg is None:
        return None, f"{type(model).__name__}.forward takes no cache argument"
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except TypeError as exc:
        return None, f"the example inputs do not bind to {type(model).__name__}.forward: {exc}"
    ids = bound.pop("input_ids", None)
    mask = bound.pop("attention_mask", None)
    extra = {**{k: v for k, v in bound.items() if k != "kwargs"}, **bound.get("kwargs", {})}
    others = {k: v for k, v in extra.items() if v is not None and v not in _NEUTRAL_KWARGS.get(k, ())}
    if others:
        return None, f"the example call passes {sorted(others)}; generation graphs take input_ids and attention_mask"
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        return None, "the example call has no 2-D integer input_ids"
    if ids.shape[1] < 2:
        return None, "the example prompt has fewer than 2 tokens (the prefill step is traced on it)"
    if mask is None:
        mask = torch.ones_like(ids)
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        return None, "the example attention_mask is not a [batch, length] padding mask"
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, return_dict=True)
    except Exception as exc:  # reported: the reason becomes the report's note (or generation=True's error)
        return None, f"the model raised {type(exc).__name__} when called with use_cache=True: {exc}"
    cache_field = next((f for f in _CACHE_KWARGS if getattr(out, f, None) is not None), None)
    cache = getattr(out, cache_field) if cache_field else None
    layers = getattr(cache, "layers", None)
    if not layers or not all(_is_dynamic_layer(layer) for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or ()}) or [type(cache).__name__]
        return None, f"the model's cache ({', '.join(kinds)}) is not a key/value cache of DynamicLayers"
    shapes = [((l.keys.shape[1], l.keys.shape[3]), (l.values.shape[1], l.values.shape[3])) for l in layers]
    plan = GenerationPlan(cache_kwarg, ids, mask.to(ids.dtype), type(out), cache_field, shapes, layers[0].keys.dtype)
    return plan, ""


def _is_dynamic_layer(layer: Any) -> bool:
    from transformers.cache_utils import DynamicLayer

    keys = getattr(layer, "keys", None)
    return isinstance(layer, DynamicLayer) and isinstance(keys, torch.Tensor) and keys.dim() == 4


# --------------------------------------------------------------------------------------
# Running the steps on a transformers cache


@dataclass
class GenerationGraphs:
    """The quantized prefill and decode steps, called like the model with a cache."""

    plan: GenerationPlan
    prefill: CapturedGraph
    decode: CapturedGraph
    shell: torch.nn.Module  # what generate() runs on: see generation_shell
    capture_seconds: float = 0.0
    passes_seconds: float = 0.0
    calls: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0})

    def __post_init__(self) -> None:
        _attach_shell(self)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: Any = None,
                 **kwargs: Any) -> Any:
        _check_kwargs(kwargs)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise InputMismatchError("generation steps take input_ids of shape [batch, new tokens]")
        batch, new = input_ids.shape
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()
        layers = _cache_layers(cache, len(self.plan.layer_shapes))
        keys, values, past = _past_of(layers, self.plan, batch)
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + new, dtype=input_ids.dtype)
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, past + new):
            raise InputMismatchError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; the generation steps take the 2-D padding "
                f"mask of the whole sequence, [batch, cached + new tokens] = [{batch}, {past + new}]"
            )
        name = "decode" if new == 1 else "prefill"
        graph = self.decode if new == 1 else self.prefill
        flat = graph.flatten_inputs((input_ids, attention_mask.to(input_ids.dtype), keys, values), {})
        logits, new_keys, new_values = graph.unflatten_outputs(graph.graph_module(*flat))
        self.calls[name] += 1
        for layer, k, v in zip(layers, new_keys, new_values):
            _store(layer, k, v, past)
        return self.plan.output_type(logits=logits, **{self.plan.cache_field: cache})


def _check_kwargs(kwargs: dict[str, Any]) -> None:
    inert = {"use_cache": (True, False, None), "return_dict": (True, None), "output_attentions": (False, None),
             "output_hidden_states": (False, None)}
    bad = sorted(k for k, v in kwargs.items() if k not in inert or v not in inert[k])
    if bad:
        raise InputMismatchError(
            f"the quantized generation steps cannot take {bad}: they take input_ids, attention_mask (2-D) and "
            "the cache (use_cache=True, return_dict=True)"
        )


def _cache_layers(cache: Any, count: int) -> list[Any]:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, StaticLayer, StaticSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if isinstance(cache, DynamicCache) and not layers:  # built without a config: its layers come on first use
        cache.layers = layers = [DynamicLayer() for _ in range(count)]
    if layers is None or len(layers) != count:
        raise InputMismatchError(
            f"the cache ({type(cache).__name__}) has {len(layers) if layers is not None else 'no'} layers; the "
            f"model has {count}: pass a transformers DynamicCache or StaticCache built for this model"
        )
    for layer in layers:
        if isinstance(layer, StaticSlidingWindowLayer) or not isinstance(layer, (DynamicLayer, StaticLayer)):
            raise InputMismatchError(
                f"cache layers of type {type(layer).__name__} are not supported by the quantized generation "
                "steps; they run on DynamicCache (any model) and StaticCache (models without sliding-window "
                "layers): generate with the default cache, or cache_implementation=\"static\" where it applies"
            )
    return list(layers)


def _past_of(layers: list[Any], plan: GenerationPlan, batch: int) -> tuple[list, list, int]:
    from transformers.cache_utils import StaticLayer

    keys, values, lengths = [], [], set()
    empty_k, empty_v = plan.empty_past(batch)
    for i, layer in enumerate(layers):
        if not layer.is_initialized:
            k, v = empty_k[i], empty_v[i]
        elif isinstance(layer, StaticLayer):
            n = int(layer.get_seq_length())
            if layer.keys.shape[0] != batch:
                raise InputMismatchError(
                    f"the static cache was built for batch {layer.keys.shape[0]}, the input has batch {batch}"
                )
            k, v = layer.keys[:, :, :n], layer.values[:, :, :n]
        elif layer.keys is None or layer.keys.numel() == 0:
            k, v = empty_k[i], empty_v[i]
        else:
            k, v = layer.keys, layer.values
        keys.append(k)
        values.append(v)
        lengths.add(k.shape[2])
    if len(lengths) != 1:
        raise InputMismatchError(f"the cache's layers hold different lengths {sorted(lengths)}")
    return keys, values, lengths.pop()


def _store(layer: Any, keys: torch.Tensor, values: torch.Tensor, past: int) -> None:
    from transformers.cache_utils import StaticLayer

    if isinstance(layer, StaticLayer):
        new_k, new_v = keys[:, :, past:], values[:, :, past:]
        if not layer.is_initialized:
            layer.lazy_initialization(new_k, new_v)
        end = past + new_k.shape[2]
        if end > layer.max_cache_len:
            raise InputMismatchError(
                f"the static cache holds {layer.max_cache_len} tokens; this step would make it {end}"
            )
        layer.keys[:, :, past:end] = new_k
        layer.values[:, :, past:end] = new_v
        layer.cumulative_length.fill_(end)
        return
    if not layer.is_initialized:
        layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    if hasattr(layer, "cumulative_length"):  # a sliding-window layer, here holding the full past
        layer.cumulative_length = keys.shape[2]


# --------------------------------------------------------------------------------------
# generate(): transformers' loop on a weightless copy of the model object


def generation_shell(model: torch.nn.Module, step: Callable[..., Any] | None) -> torch.nn.Module:
    """A copy of ``model``'s object without its modules and weights whose forward is ``step``
    (or, when None, the ``GenerationGraphs`` that holds the shell as its ``shell``);
    ``shell.generate(...)`` is transformers' own generate driving the quantized steps."""
    cls = type(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def forward(self, input_ids=None, attention_mask=None, cache=None, **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        steps = step or self._qcompile_steps()
        if steps is None:
            raise InputMismatchError("the quantized generation steps this model ran on are gone")
        return steps(input_ids, attention_mask, cache, **kwargs)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        mask = kwargs.get("attention_mask")
        inputs = cls.prepare_inputs_for_generation(self, *args, **kwargs)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            inputs["attention_mask"] = mask  # the 2-D mask the steps take, not a 4-D one built for a static cache
        return inputs

    shell_cls = type(f"Quantized{cls.__name__}", (cls,), {
        "forward": forward,
        "prepare_inputs_for_generation": prepare_inputs_for_generation,
        "device": property(lambda self: device),
        "dtype": property(lambda self: dtype),
        "__module__": __name__,
    })
    shell = shell_cls.__new__(shell_cls)
    # the model's own state (config, generation_config, hooks), dicts copied so the shell's are its own
    state = {k: copy.copy(v) if isinstance(v, dict) else v
             for k, v in vars(model).items() if k not in ("_modules", "_parameters", "_buffers")}
    shell.__dict__.update(state)
    shell.__dict__.update(_modules={}, _parameters={}, _buffers={})
    return shell


def _attach_shell(graphs: "GenerationGraphs") -> None:
    # the shell calls back into the graphs through a weak reference: no cycle, so the graphs
    # (and their quantized weights) go as soon as the model holding them goes
    graphs.shell.__dict__["_qcompile_steps"] = weakref.ref(graphs)

