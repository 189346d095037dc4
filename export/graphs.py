"""The exportable graphs of an engine (format 4), as torch modules, and every tensor name they carry.

The decoder is split at the method's stage layers into segment graphs, so each weight is in exactly one graph
and prefill and decode run the same ones:

vision:    pixel_values [B, crops, 3, H, W] for the build's fixed grid in; image features [B, N, D] out, with
           HF's anyres packing (unpad and newline tokens), exactly what HF would merge into the prompt.
embed:     token ids [B, T] and the token table [V, D] in; embeddings [B, T, D] out. The table is an input:
           it is stored once (token_table.bin) and read by embed and, when tied, by the LM head.
segment.j: decoder layers [first, end). Hidden states [B, T, D], their RoPE positions and a cache offset in,
           with each of its layers' fixed-capacity K/V/valid; its layers' caches with slots [offset, offset+T)
           written out, and the hidden states (the last segment: the last token's logits [B, V]). Prefill runs
           it over the prompt's real length (offset 0), decode over one token (offset = its prefill length +
           step), so T is dynamic and nothing is padded.
select.j:  stage j, between segment.j and segment.j+1 (prefill only): the layer's own input norm and q/k/v
           (a small named copy of that layer's weights) on the hidden states, one iwp::VisualTokenSelect node,
           and the kept tokens gathered: kept indices [B, K_j] into the original N, hidden states and
           positions of T - n + K_j tokens, the shifted query and last indices.

Every tensor name of an engine is spelled here and nowhere else: the exporter records each with its role in
manifest.json's io section (iwp/engine_format.py ROLES), and runtimes find tensors by role.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx
import torch
import torch.nn.functional as F

from iwp.kv_cache import write_slots
from iwp.model import PrunedLlavaOnevision, compact_index, inline, take, through_op
from iwp.plugins.visual_token_select import LayerView
from iwp.plugins.visual_token_select.transprune import transition_logits


@dataclass(frozen=True)
class Decoder:
    """How an engine's decoder is cut into graphs: the stages (layer, kept) of its method, whether the LM head
    is the token table, and the layers whose transitions TransPrune accumulates ([first, end), or None)."""
    n_layers: int
    n_visual: int
    stages: tuple[tuple[int, int], ...]
    tied: bool
    ttv_layers: tuple[int, int] | None = None

    @classmethod
    def of(cls, model: PrunedLlavaOnevision, method, plan, n_visual: int) -> Decoder:
        """The cut of a model's decoder for a method's plan (None: unpruned, one segment)."""
        stages = tuple(tuple(s) for s in plan.stages) if plan else ()
        ttv_start = getattr(method, "ttv_start", None)
        tied = model.lm_head.weight is model.embed_tokens.weight   # 0.5b ties, 7b does not
        return cls(model.n_layers, n_visual, stages, tied,
                   (ttv_start, stages[-1][0]) if ttv_start is not None and stages else None)

    def graphs(self) -> list[dict]:
        """manifest.json's graphs list, in run order. A stage at layer 0 (DivPrune, random: they select from the
        input embeddings) runs before the first segment."""
        cuts = [layer for layer, _ in self.stages]
        if cuts != sorted(set(cuts)) or (cuts and not (0 <= cuts[0] and cuts[-1] < self.n_layers)):
            raise ValueError(f"stage layers {cuts} must be increasing, in 0..{self.n_layers - 1}")
        bounds = [0, *cuts, self.n_layers]
        out = [{"name": "embed", "kind": "embed"}, {"name": "vision", "kind": "vision"}]
        segments = 0
        for j, (first, end) in enumerate(zip(bounds, bounds[1:])):
            if j:
                out.append({"name": f"select.{j - 1}", "kind": "select", "stage": j - 1, "layer": first})
            if first < end:
                out.append({"name": f"segment.{segments}", "kind": "segment", "layers": [first, end]})
                segments += 1
        return out

    def transition_layers(self, first: int, end: int) -> list[int]:
        if self.ttv_layers is None:
            return []
        return list(range(max(first, self.ttv_layers[0]), min(end, self.ttv_layers[1])))

    def alive(self, stage: int) -> int:
        """Visual tokens entering stage `stage`."""
        return self.stages[stage - 1][1] if stage else self.n_visual

    def tensors(self, graph: dict) -> tuple[list[tuple], list[tuple]]:
        """(inputs, outputs) of a graph as (name, role, layer, stage), in the graph's own order."""
        kind = graph["kind"]
        if kind == "embed":
            return ([("input_ids", "token_ids", None, None), ("token_table", "token_table", None, None)],
                    [("inputs_embeds", "embeddings", None, None)])
        if kind == "vision":
            return [("pixel_values", "pixels", None, None)], [("image_features", "features", None, None)]
        if kind == "segment":
            first, end = graph["layers"]
            last = end == self.n_layers
            inputs = [("hidden", "hidden", None, None), ("positions", "positions", None, None),
                      ("offset", "offset", None, None)]
            inputs += [("token_table", "token_table", None, None)] if last and self.tied else []
            outputs = [("logits", "logits", None, None) if last else ("next_hidden", "hidden", None, None)]
            outputs += [("transitions", "transitions", None, None)] if self.transition_layers(first, end) else []
            return inputs + _caches("past", first, end), outputs + _caches("present", first, end)
        if kind == "select":
            stage = graph["stage"]
            inputs = [(role, role, None, None) for role in
                      ("hidden", "positions", "visual_start", "query_idx", "query_mask", "last_idx")]
            inputs += [("alive", "alive", None, None)] if stage else []
            inputs += [("ttv", "ttv", None, None)] if self.ttv_layers is not None and stage else []
            previous = self.stages[stage - 1][0] if stage else 0
            if self.transition_layers(previous, graph["layer"]):
                inputs.append(("transitions", "transitions", None, None))
            outputs = [(f"kept.{stage}", "kept", None, stage)]
            outputs += [(f"kept_{role}", role, None, None) for role in ("hidden", "positions", "query_idx", "last_idx")]
            if self.ttv_layers is not None and stage < len(self.stages) - 1:
                outputs.append(("kept_ttv", "ttv", None, None))
            return inputs, outputs
        raise ValueError(f"no graph kind {kind!r}")


def _caches(kind: str, first: int, end: int) -> list[tuple]:
    return [(f"{kind}.{layer}.{part}", part, layer, None)
            for layer in range(first, end) for part in ("key", "value", "valid")]


def names(tensors) -> list[str]:
    return [t[0] for t in tensors]


class VisionGraph(torch.nn.Module):
    def __init__(self, model: PrunedLlavaOnevision, image_size: tuple[int, int]):
        super().__init__()
        self.model, self.image_size = model, list(image_size)   # a constant: the crop grid is fixed

    def forward(self, pixel_values):
        hf, cfg = self.model.hf.model, self.model.hf.config
        b = pixel_values.shape[0]
        feats = hf.get_image_features(
            pixel_values, [self.image_size] * b, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True).pooler_output
        return torch.stack(list(feats))                                       # [B, N, D]


class EmbedGraph(torch.nn.Module):
    def forward(self, input_ids, token_table):
        return F.embedding(input_ids, token_table)


class SegmentGraph(torch.nn.Module):
    """Decoder layers [first, end) over T tokens at cache slots [offset, offset + T)."""

    def __init__(self, model: PrunedLlavaOnevision, decoder: Decoder, first: int, end: int):
        super().__init__()
        self.model, self.first, self.end = model, first, end
        self.last, self.tied = end == model.n_layers, decoder.tied
        self.transitions = set(decoder.transition_layers(first, end))

    def forward(self, hidden, positions, offset, *rest):
        table = rest[0] if self.last and self.tied else None
        past = rest[1:] if table is not None else rest
        keys, values, valid = list(past[0::3]), list(past[1::3]), list(past[2::3])
        model, h, t = self.model, hidden, hidden.shape[1]
        rows = []
        for i, index in enumerate(range(self.first, self.end)):
            layer = model.layers[index]
            _, _, v, q_rot, k_rot = model.qkv(layer, h, positions)
            keys[i], values[i], valid[i] = write_slots(keys[i], values[i], valid[i], offset, k_rot, v)
            slots = torch.arange(keys[i].shape[2], device=h.device)
            causal = slots[None, :] <= offset + torch.arange(t, device=h.device)[:, None]          # [T, S]
            mask = valid[i][:, None, None, :] & causal[None, None]
            h_in = h
            h, attn_out, h_mid, mlp_out = model.finish_layer(layer, h, q_rot, keys[i], values[i], mask)
            if index in self.transitions:
                rows += [transition_logits(h_in, attn_out), transition_logits(h_mid, mlp_out)]
        if self.last:
            x = model.norm(h[:, -1])
            # tied: (table @ x^T)^T, so the table input is GEMM's A operand; as F.linear's B operand ORT CPU
            # repacks all of it every step (benchmarks/tied_head.py: about 2.5 ms a token at 0.5b)
            outputs = [(table @ x.T).T if table is not None else model.lm_head(x)]
        else:
            outputs = [h]
        outputs += [torch.stack(rows, dim=1)] if rows else []
        return (*outputs, *[c for layer in zip(keys, values, valid) for c in layer])


class SelectGraph(torch.nn.Module):
    """Selection stage `stage` at its layer: that layer's q/k/v, the op (or the native twin), the gather."""

    def __init__(self, model: PrunedLlavaOnevision, decoder: Decoder, method, stage: int, visual_xy: torch.Tensor,
                 native: bool = False):
        super().__init__()
        self.model, self.decoder, self.method, self.stage, self.native = model, decoder, method, stage, native
        self.layer, self.keep = decoder.stages[stage]
        self.n_alive = decoder.alive(stage)
        self.register_buffer("visual_xy", visual_xy.clone())   # [1, N, 2], fixed by the crop grid
        inputs, _ = decoder.tensors({"kind": "select", "stage": stage, "layer": self.layer})
        self.extra = [role for _, role, _, _ in inputs[6:]]    # alive, ttv, transitions: as the graph has them

    def forward(self, hidden, positions, visual_start, query_idx, query_mask, last_idx, *rest):
        extra = dict(zip(self.extra, rest))
        b, t, _ = hidden.shape
        model = self.model
        alive = extra.get("alive")
        if alive is None:
            alive = torch.arange(self.n_alive, device=hidden.device)[None].expand(b, -1)
        xy = take(self.visual_xy.to(hidden.device).expand(b, -1, -1), alive)   # a real constant on a meta trace
        ttv = None
        if self.decoder.ttv_layers is not None:
            ttv = extra.get("ttv", torch.zeros(b, self.n_alive, device=hidden.device))
            if "transitions" in extra:
                idx = visual_start[:, None] + torch.arange(self.n_alive, device=hidden.device)[None]
                rows = extra["transitions"]
                for r in range(rows.shape[1]):
                    ttv = ttv + torch.softmax(rows[:, r].gather(1, idx), dim=-1)
        layer = model.layers[self.layer]
        q, k, v, q_rot, k_rot = model.qkv(layer, hidden, positions)
        key_mask = torch.ones(b, t, dtype=torch.bool, device=hidden.device)   # prompts are not padded
        view = LayerView(hidden, q, k, q_rot, k_rot, v, key_mask, visual_start, self.n_alive, query_idx, query_mask,
                         last_idx, xy, ttv, self.layer, self.stage, len(self.decoder.stages))
        keep = (inline if self.native else through_op)(self.method, view, self.keep)
        src = compact_index(visual_start, self.n_alive, keep, t)
        shift = self.n_alive - self.keep
        outputs = [alive.gather(1, keep), take(hidden, src), take(positions, src), query_idx - shift, last_idx - shift]
        if ttv is not None and self.stage < len(self.decoder.stages) - 1:
            outputs.append(ttv.gather(1, keep))
        return tuple(outputs)


def graph_jobs(model: PrunedLlavaOnevision, decoder: Decoder, method, loaded, batch, length: int, cache_len,
               native: bool = False):
    """Each graph of an engine in run order as (graph, module, example args, dynamic shapes): the example
    inputs of each decoder graph are the previous ones' outputs on the example batch, as at run time."""
    table = model.embed_tokens.weight.detach()
    with torch.no_grad():
        state = _example_state(model, batch, cache_len)
    for graph in decoder.graphs():
        module, args, dynamic = _job(graph, model, decoder, method, loaded, batch, state, table, length, native)
        yield graph, module, args, dynamic
        if graph["kind"] in ("segment", "select"):   # the next graph's example inputs
            with torch.no_grad():
                _advance(state, decoder.tensors(graph)[1], module(*args))


def _example_state(model, batch, cache_len: list[int]) -> dict:
    """The prefill's tensors by role, advanced graph by graph: the example inputs of the next export. On a
    skeleton (meta weights) the embeddings are zeros of their shape: tracing needs shapes, not values."""
    if batch.input_ids.device.type == "meta":
        embeds = torch.zeros(*batch.input_ids.shape, model.embed_tokens.weight.shape[1],
                             dtype=model.embed_tokens.weight.dtype, device="meta")
    else:
        embeds = model.embed(batch)
    dtype = embeds.dtype
    caches = {}
    for layer, slots in enumerate(cache_len):
        shape = (1, model.n_kv, slots, model.head_dim)
        caches[("key", layer)] = torch.zeros(shape, dtype=dtype, device=embeds.device)
        caches[("value", layer)] = torch.zeros(shape, dtype=dtype, device=embeds.device)
        caches[("valid", layer)] = torch.zeros(1, slots, dtype=torch.bool, device=embeds.device)
    return {"hidden": embeds, "positions": batch.positions, "visual_start": batch.visual_start,
            "query_idx": batch.query_idx, "query_mask": batch.query_mask, "last_idx": batch.last_idx,
            "offset": torch.tensor(0, device=embeds.device), **caches}


def _advance(state: dict, outputs: list[tuple], values) -> None:
    for (_, role, layer, stage), value in zip(outputs, values):
        if role in ("key", "value", "valid"):
            continue            # the next segment's caches are its own layers' (still empty)
        state["alive" if role == "kept" else role] = value


def _job(graph: dict, model, decoder, method, loaded, batch, state: dict, table, length: int, native: bool):
    """(module, example args, dynamic shapes) of one graph."""
    kind = graph["kind"]
    inputs, _ = decoder.tensors(graph)
    if kind == "embed":
        tokens = torch.export.Dim("tokens", min=1, max=length)
        return EmbedGraph(), (batch.input_ids, table), ({1: tokens}, None)
    if kind == "vision":
        return VisionGraph(model, loaded.resolution), (batch.pixel_values,), None
    if kind == "segment":
        first, end = graph["layers"]
        most = length - loaded.n_visual + decoder.alive(sum(1 for s in decoder.stages if s[0] <= first))
        module = SegmentGraph(model, decoder, first, end)
        tokens = torch.export.Dim("tokens", min=1, max=most)
    else:
        alive = decoder.alive(graph["stage"])
        module = SelectGraph(model, decoder, method, graph["stage"], batch.visual_xy[None], native=native)
        tokens = torch.export.Dim("tokens", min=alive + 1, max=length - loaded.n_visual + alive)
    args = tuple(table if role == "token_table" else state[role if layer is None else (role, layer)]
                 for _, role, layer, _ in inputs)
    dynamic = tuple({1: tokens} if role in ("hidden", "positions", "transitions") else None
                    for _, role, _, _ in inputs)
    if kind == "select" and "transitions" in [role for _, role, _, _ in inputs]:
        dynamic = tuple({2: tokens} if role == "transitions" else d for (_, role, _, _), d in zip(inputs, dynamic))
    # by forward's parameter names, its *rest as one entry (torch.onnx turns a top-level tuple into a list)
    params = ("hidden", "positions", "offset") if kind == "segment" else (
        "hidden", "positions", "visual_start", "query_idx", "query_mask", "last_idx")
    named = dict(zip(params, dynamic))
    if len(dynamic) > len(params):
        named["rest"] = tuple(dynamic[len(params):])
    return module, args, named


# The optimizer's constant folding warns "Evaluation failed" on a select graph's wide Concat (numpy takes at most
# 64 arrays at once); it leaves that node unfolded, which is correct, so the warning is noise in `make engine`.
logging.getLogger("onnxscript.optimizer._constant_folding").setLevel(logging.ERROR)


def export_program(module: torch.nn.Module, args: tuple, input_names, output_names, dynamic_shapes=None,
                   weights=None):
    """torch.onnx (dynamo) export with iwp's op translations -> torch.onnx.ONNXProgram. With `weights`
    (export/lazy.py's LazyWeights) the module is a skeleton on the meta device and every initializer is read
    lazily, when the graph is saved."""
    import logging
    import warnings

    from iwp.plugins.visual_token_select.onnx_op import custom_translation_table
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            module = module.eval()
            traced = module
            if dynamic_shapes is not None:   # torch.onnx would turn *rest's tuple of shapes into a list
                traced = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
            program = torch.onnx.export(traced, args, dynamo=True, input_names=list(input_names),
                                        output_names=list(output_names), optimize=weights is None,
                                        custom_translation_table=custom_translation_table(), verbose=False)
            if weights is not None:   # the weights made lazy first: the optimizer must never read one
                weights.apply(program.model, module)
                program.optimize()
    finally:
        registration.setLevel(level)
    if dynamic_shapes is not None:
        name_dims(program.model, "tokens")
    for node in program.model.graph.all_nodes():   # torch's per-node stack traces: as many bytes as a small model
        node.metadata_props.clear()
    return program


def name_dims(model, name: str) -> None:
    """The graph's one dynamic input dimension (torch.export calls it s18 or the like) renamed `name`
    everywhere, expressions included ("s18 - 272" -> "tokens - 272"), so manifests and TensorRT profiles read
    the same word in every graph."""
    import re

    import onnx_ir as ir
    graph = model.graph
    symbols = {d.value for v in graph.inputs if v.shape is not None for d in v.shape
               if isinstance(d, ir.SymbolicDim) and d.value and d.value.isidentifier()}
    assert len(symbols) == 1, symbols   # each graph has one dynamic length
    pattern = re.compile(rf"\b{re.escape(symbols.pop())}\b")

    def rename(value) -> None:
        if value.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value for d in value.shape):
            value.shape = ir.Shape([ir.SymbolicDim(pattern.sub(name, d.value)) if isinstance(d, ir.SymbolicDim)
                                    and d.value else d for d in value.shape])
    for value in (*graph.inputs, *graph.outputs, *(out for node in graph.all_nodes() for out in node.outputs)):
        rename(value)


def export(module: torch.nn.Module, args: tuple, input_names, output_names,
           dynamic_shapes=None) -> onnx.ModelProto:
    """The exported graph as an in-memory ModelProto (graphs under 2 GB); passes onnx.checker."""
    model = export_program(module, args, input_names, output_names, dynamic_shapes).model_proto
    onnx.checker.check_model(model)
    return model


def save(program, path, external_data: bool = True) -> int:
    return save_ir(program.model, path, external_data)


def save_ir(model, path, external_data: bool = True) -> int:
    """Write a graph with its weights streamed into `<name>.onnx.data` beside it (`external_data=False`: inside
    the file, for small test graphs), then check it and run shape inference on the file, which works at any
    size. Lazy weights are read here, one at a time. Returns the initializers' bytes as stored (int4 packed)."""
    from pathlib import Path

    import onnx_ir as ir
    path = Path(path)
    sizes = [int(v.const_value.nbytes) for v in model.graph.initializers.values() if v.const_value is not None]
    stored = sum(sizes)
    if external_data and any(size >= _INLINE_UNDER for size in sizes):   # a graph of no weights gets no side file
        ir.save(model, path, external_data=f"{path.name}.data", size_threshold_bytes=_INLINE_UNDER)
    else:
        ir.save(model, path)
    onnx.checker.check_model(str(path))
    inferred = path.with_name(path.name + ".inferred")
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
    finally:
        inferred.unlink(missing_ok=True)
    return stored


_INLINE_UNDER = 256   # bytes: smaller tensors (shapes, scalars) stay in the .onnx, as onnx_ir does by default
