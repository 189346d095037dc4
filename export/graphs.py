"""The exportable graphs of an engine, as torch modules with static shapes.

vision:  pixel_values [B, crops, 3, H, W] for the build's fixed grid in; image features [B, N, D] out, with
         HF's anyres packing (unpad and newline tokens), exactly what HF would merge into the prompt.
embed:   token ids [B, T] in (T dynamic: the prompt, then one token per decode step); embeddings [B, T, D]
         out. The table lives in this graph only.
prefill: input embeddings (text and image merged) [B, T, D], attention mask, positions and the derived
         token positions in; the last token's logits [B, 1, V], the kept indices of each stage [B, K_s], and
         each layer's present K/V [B, Hkv, T_l + max_new, d] with validity [B, T_l + max_new] out, already
         laid out as the decode graph's past. The selection is one iwp::VisualTokenSelect node per stage.
decode:  one token's embedding [B, 1, D], its position [B], the step, and every layer's fixed-capacity
         past K/V [B, Hkv, T_l + max_new, d] with its validity [B, T_l + max_new] in; logits [B, V] and the
         same caches with slot T_l + step written out. Shapes never change between steps.
"""
from __future__ import annotations

import dataclasses

import onnx
import torch

from iwp.inputs import Batch
from iwp.model import PrunedLlavaOnevision, inline, through_op

# Every tensor name of an engine is spelled here and nowhere else: the exporter records each with its role in
# manifest.json's io section (iwp/engine_format.py ROLES), and runtimes find tensors by role.
# A named tensor: (name, role, layer, stage); layer for the caches, stage for kept.
_PREFILL_INPUTS = (("inputs_embeds", "embeddings"), ("attention_mask", "attention_mask"), ("positions", "positions"),
                   ("visual_start", "visual_start"), ("query_idx", "query_idx"), ("query_mask", "query_mask"),
                   ("last_idx", "last_idx"))
PREFILL_INPUTS = tuple(name for name, _ in _PREFILL_INPUTS)


def _caches(kind: str, n_layers: int) -> list[tuple]:
    return [(f"{kind}.{layer}.{part}", part, layer, None)
            for layer in range(n_layers) for part in ("key", "value", "valid")]


def graph_tensors(graph: str, n_layers: int, n_stages: int) -> tuple[list[tuple], list[tuple]]:
    """(inputs, outputs) of a graph as (name, role, layer, stage), in the graph's own order."""
    if graph == "embed":
        return [("input_ids", "token_ids", None, None)], [("inputs_embeds", "embeddings", None, None)]
    if graph == "vision":
        return [("pixel_values", "pixels", None, None)], [("image_features", "features", None, None)]
    if graph == "prefill":
        return ([(name, role, None, None) for name, role in _PREFILL_INPUTS],
                [("logits", "logits", None, None)] + [(f"kept.{s}", "kept", None, s) for s in range(n_stages)]
                + _caches("present", n_layers))
    if graph == "decode":
        return ([("inputs_embeds", "embeddings", None, None), ("position", "position", None, None),
                 ("step", "step", None, None)] + _caches("past", n_layers),
                [("logits", "logits", None, None)] + _caches("present", n_layers))
    raise ValueError(f"no graph {graph!r}")


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
    def __init__(self, model: PrunedLlavaOnevision):
        super().__init__()
        self.embed_tokens = model.embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


class PrefillGraph(torch.nn.Module):
    def __init__(self, model: PrunedLlavaOnevision, template: Batch, method, plan, max_new_tokens: int = 0,
                 native: bool = False):
        super().__init__()
        self.model, self.template, self.method, self.plan = model, template, method, plan
        self.max_new_tokens, self.native = max_new_tokens, native
        self.register_buffer("visual_xy", template.visual_xy.clone())   # fixed by the crop grid

    def input_names(self) -> list[str]:
        return names(graph_tensors("prefill", self.model.n_layers, self.n_stages)[0])

    def output_names(self) -> list[str]:
        return names(graph_tensors("prefill", self.model.n_layers, self.n_stages)[1])

    @property
    def n_stages(self) -> int:
        return len(self.plan.stages) if self.method else 0

    def forward(self, inputs_embeds, attention_mask, positions, visual_start, query_idx, query_mask, last_idx):
        batch = dataclasses.replace(self.template, attention_mask=attention_mask, positions=positions,
                                    visual_start=visual_start, query_idx=query_idx, query_mask=query_mask,
                                    last_idx=last_idx, visual_xy=self.visual_xy)
        pre = self.model.prefill(inputs_embeds, batch, self.method, self.plan, self.max_new_tokens,
                                 last_logits_only=True, select=inline if self.native else through_op)
        outputs = [pre.logits, *pre.kept]
        for key, value, valid in zip(pre.cache.keys, pre.cache.values, pre.cache.valid):
            outputs += [key, value, valid]
        return tuple(outputs)

    def example_inputs(self, embeds: torch.Tensor) -> tuple:
        b = self.template
        return (embeds, b.attention_mask, b.positions, b.visual_start, b.query_idx, b.query_mask, b.last_idx)


class DecodeGraph(torch.nn.Module):
    def __init__(self, model: PrunedLlavaOnevision, prefill_len: list[int]):
        super().__init__()
        self.model, self.prefill_len = model, list(prefill_len)

    def input_names(self) -> list[str]:
        return names(graph_tensors("decode", self.model.n_layers, 0)[0])

    def output_names(self) -> list[str]:
        return names(graph_tensors("decode", self.model.n_layers, 0)[1])

    def forward(self, inputs_embeds, position, step, *past):
        keys, values, valid = list(past[0::3]), list(past[1::3]), list(past[2::3])
        logits, keys, values, valid = self.model.decode_step(inputs_embeds, position, step, self.prefill_len,
                                                             keys, values, valid)
        return (logits, *[t for layer in zip(keys, values, valid) for t in layer])


def export_program(module: torch.nn.Module, args: tuple, input_names, output_names, dynamic_shapes=None):
    """torch.onnx (dynamo) export with iwp's op translations -> torch.onnx.ONNXProgram."""
    import logging
    import warnings

    from iwp.plugins.visual_token_select.onnx_op import custom_translation_table
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            return torch.onnx.export(module.eval(), args, dynamo=True, input_names=list(input_names),
                                     output_names=list(output_names), dynamic_shapes=dynamic_shapes,
                                     custom_translation_table=custom_translation_table(), verbose=False)
    finally:
        registration.setLevel(level)


def export(module: torch.nn.Module, args: tuple, input_names, output_names,
           dynamic_shapes=None) -> onnx.ModelProto:
    """The exported graph as an in-memory ModelProto (graphs under 2 GB); passes onnx.checker."""
    model = export_program(module, args, input_names, output_names, dynamic_shapes).model_proto
    onnx.checker.check_model(model)
    return model


def save(program, path, external_data: bool | None = None) -> None:
    """Write an exported graph, its weights as external data when over 2 GB (or when asked), then check it
    and run shape inference on the file, which works at any size."""
    from pathlib import Path
    path = Path(path)
    program.save(path, external_data=external_data)
    onnx.checker.check_model(str(path))
    inferred = path.with_name(path.name + ".inferred")
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
    finally:
        inferred.unlink(missing_ok=True)
