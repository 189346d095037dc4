"""Where a model's weights come from, one tensor at a time: a seed, a checkpoint's safetensors, or a model that
is already in memory.

A model is first built as a *skeleton*: the real HF classes with every parameter on the meta device (no bytes)
and every buffer real (RoPE frequencies, position ids: small, computed by HF from the config). The exporter
traces the skeleton and reads each weight from the source only when it writes that weight (export/lazy.py),
so no step of `make engine` holds the whole model. `materialize` fills a skeleton from the same source for
the PyTorch paths, so the PyTorch reference and the engine hold the same values.

    SeededRandom   HF's own per-module init (`_init_weights` of the nearest PreTrainedModel) of the module that
                   owns the tensor, in fp32, seeded by (seed, the module's name), then cast: the same values
                   whichever tensors are asked for, and in any order.
    Checkpoint     the checkpoint's safetensors, memory-mapped; keys renamed by transformers' own conversion
                   mapping for the model type (old `language_model.model.*` layouts); shapes checked against
                   the skeleton before any work.
    InMemory       the tensors of a model already built (the tiny and trained models: a few MB).
"""
from __future__ import annotations

import contextlib
import copy
import zlib
from pathlib import Path

import torch


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter a module registers goes to the meta device; buffers stay real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)
    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def skeleton(config, dtype: torch.dtype):
    """The model's HF classes from `config` with meta parameters of `dtype` (tied ones stay one tensor)."""
    from transformers import LlavaOnevisionForConditionalGeneration
    config.text_config._attn_implementation = "sdpa"
    with _parameters_on_meta():
        model = LlavaOnevisionForConditionalGeneration(config)
    return model.to(dtype).eval()


def parameters_to_meta(model) -> None:
    """A built model's parameters moved to the meta device in place (tied ones stay one tensor)."""
    done = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.device.type != "meta":
                if id(p) not in done:
                    done[id(p)] = torch.nn.Parameter(p.detach().to("meta"), requires_grad=False)
                module._parameters[name] = done[id(p)]


def parameter_names(model) -> dict[str, torch.Size]:
    """Each distinct parameter's name (a tied one under its first name) and shape."""
    return {name: p.shape for name, p in model.named_parameters()}


def is_meta(model) -> bool:
    """A skeleton: every parameter on the meta device."""
    return all(p.device.type == "meta" for p in model.parameters())


class SeededRandom:
    def __init__(self, model, seed: int):
        # its own skeleton, never materialized: an owner's init may touch its children (SigLIP's pooling head
        # initialises its attention's weights), which must stay meta for every read to give the same values
        if not is_meta(model):
            raise ValueError("SeededRandom reads from a skeleton (iwp.weight_source.skeleton), not a built model")
        self.model, self.seed = model, seed
        self.dtype = next(model.parameters()).dtype
        self._owners = _init_owners(model)
        self._last: tuple[str, dict] | None = None     # a module's tensors come together (weight, bias)

    def identity(self) -> str:
        return f"seed:{self.seed}"

    def tensor(self, name: str) -> torch.Tensor:
        prefix, _, leaf = name.rpartition(".")
        if self._last is None or self._last[0] != prefix:
            self._last = (prefix, self._init_module(prefix))
        return self._last[1][leaf]

    def _init_module(self, prefix: str) -> dict[str, torch.Tensor]:
        module = self.model.get_submodule(prefix)
        piece = copy.copy(module)                       # shallow: its own parameters, real and in fp32
        piece._parameters = {k: None if p is None else torch.nn.Parameter(torch.zeros(p.shape), requires_grad=False)
                             for k, p in module._parameters.items()}
        torch.manual_seed(self.seed * 1_000_003 + zlib.crc32(prefix.encode()))
        with torch.no_grad():
            self._owners[prefix]._init_weights(piece)
        return {k: p.detach().to(self.dtype) for k, p in piece._parameters.items() if p is not None}


def _init_owners(model) -> dict[str, torch.nn.Module]:
    """For each module, the nearest PreTrainedModel at or above it: whose `_init_weights` HF applies to it."""
    from transformers import PreTrainedModel
    owners = {}
    for name, module in model.named_modules():
        parent = owners.get(name.rpartition(".")[0], model) if name else model
        owners[name] = module if isinstance(module, PreTrainedModel) else parent
    return owners


class InMemory:
    def __init__(self, model, identity: str):
        self._tensors = dict(model.named_parameters())
        self._identity = identity

    def identity(self) -> str:
        return self._identity

    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()


class Checkpoint:
    """A checkpoint directory's *.safetensors, memory-mapped; reads one tensor when asked."""

    def __init__(self, path: Path, model, dtype: torch.dtype):
        from safetensors import safe_open
        self.path, self.dtype = Path(path), dtype
        rename = _renamer(model)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.path} holds no *.safetensors; download the checkpoint's weights into it")
        self._files, self._where = {}, {}
        for file in files:
            handle = safe_open(str(file), framework="pt")
            self._files[file.name] = handle
            for key in handle.keys():
                self._where[rename(key)] = (file.name, key)
        expected = parameter_names(model)
        missing = [n for n in expected if n not in self._where]
        if missing:
            raise ValueError(f"checkpoint {self.path} lacks {len(missing)} of {model.config.model_type}'s tensors "
                             f"(first: {missing[0]}); it is not a checkpoint of this preset")
        for name, shape in expected.items():
            file, key = self._where[name]
            got = tuple(self._files[file].get_slice(key).get_shape())
            if got != tuple(shape):
                raise ValueError(f"checkpoint {self.path}: {key} has shape {list(got)} where the preset has "
                                 f"{list(shape)}; pass the checkpoint of this preset (or the preset of this checkpoint)")

    def identity(self) -> str:
        return str(self.path)

    def tensor(self, name: str) -> torch.Tensor:
        file, key = self._where[name]
        return self._files[file].get_tensor(key).to(self.dtype)


def _renamer(model):
    """checkpoint key -> the model's parameter name, by transformers' own loading rules for this model (its
    conversion mapping and base-model prefix). Only renamings: a checkpoint that needs tensors converted
    (fused, split) is refused."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    names = dict(model.state_dict())

    def rename(key: str) -> str:
        renamed, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
        if converted is not None:
            raise ValueError(f"checkpoint key {key} needs a conversion ({converted}) that lazy loading does not do")
        return renamed
    return rename


def materialize(model, source) -> None:
    """Fill a skeleton's parameters from `source`, in place (tied parameters stay one tensor)."""
    for name, param in list(model.named_parameters()):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, leaf, torch.nn.Parameter(source.tensor(name), requires_grad=False))
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        model.lm_head.weight = model.model.language_model.embed_tokens.weight

