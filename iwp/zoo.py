"""The model zoo: named LLaVA-OneVision presets, and loading them from weights, a checkpoint, or a seed.

- tiny-llava-ov: the real HF classes (SigLIP tower, projector, Qwen2 LM) at small sizes, seeded random
  weights and a local byte-level tokenizer. Builds in about a second with no download.
- ovqa-small: the same classes trained on the OVQA benchmark (calibration/ovqa.py) by `make train`; its
  weights, processor and calibrated method defaults ship in iwp/weights/ovqa-small.
- llava-ov-0.5b / llava-ov-7b: real checkpoints from MODEL_PATH or the HF cache; with random_weights the
  real-size architecture from the config stored in iwp/configs (for latency work, no download).

The crop grid is part of the build: an edge camera has one resolution, so images are resized to the
grid's resolution and the number of visual tokens N is fixed.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from .processor import ImageProcessor, local_processor, processor_from_checkpoint

CONFIG_DIR = Path(__file__).parent / "configs"
WEIGHTS_DIR = Path(__file__).parent / "weights"   # models trained here and shipped with iwp
METHOD_DEFAULTS = "method_defaults.json"          # calibrated per-method options, beside bundled weights


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hf_id: str | None                 # None: built locally, never downloaded
    grid: tuple[int, int]             # high-res crops (rows, cols) beside the base crop
    budget: int                       # default BUDGET for `make engine`
    method_defaults: dict = field(default_factory=dict)  # per-method option overrides, e.g. chosen layers
    bundled: bool = False             # weights in WEIGHTS_DIR/<name>, made by `make train`

    def __post_init__(self):
        rows, cols = self.grid
        if rows < 1 or cols < 1 or rows * cols > 9:
            raise ValueError(f"grid {rows}x{cols} is not allowed; use RxC with 1 <= R*C <= 9 (anyres_max_9)")

    @property
    def grid_name(self) -> str:
        return f"{self.grid[0]}x{self.grid[1]}"


PRESETS = {
    "tiny-llava-ov": ModelSpec("tiny-llava-ov", None, grid=(2, 2), budget=64),
    "ovqa-small": ModelSpec("ovqa-small", None, grid=(1, 1), budget=64, bundled=True),
    "llava-ov-0.5b": ModelSpec("llava-ov-0.5b", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", grid=(1, 1), budget=128),
    "llava-ov-7b": ModelSpec("llava-ov-7b", "llava-hf/llava-onevision-qwen2-7b-ov-hf", grid=(1, 1), budget=128),
}

TINY_SEED = 0
TINY_IMAGE_SIZE, TINY_PATCH = 64, 8   # an 8x8 grid of patches per crop


def get_spec(name: str, grid: str | None = None) -> ModelSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(PRESETS)}")
    spec = PRESETS[name]
    if spec.bundled and (bundled_dir(name) / METHOD_DEFAULTS).is_file():  # written by `iwp calibrate`
        defaults = json.loads((bundled_dir(name) / METHOD_DEFAULTS).read_text())
        spec = dataclasses.replace(spec, method_defaults={m: _tuples(o) for m, o in defaults.items()})
    if not grid:
        return spec
    rows, cols = parse_grid(grid)
    allowed = valid_grids(name)
    if f"{rows}x{cols}" not in allowed:
        raise ValueError(f"grid {grid!r} is not one {name} can run: its processor's pinpoints with R*C <= 9 give "
                         f"{', '.join(allowed)}")
    return dataclasses.replace(spec, grid=(rows, cols))


def valid_grids(name: str) -> list[str]:
    """The crop grids RxC a preset can be built for: its processor's pinpoints, at most 9 crops (anyres_max_9)."""
    spec = PRESETS[name]
    if spec.bundled:
        stored = json.loads((bundled_dir(name) / "config.json").read_text()) if (bundled_dir(name) / "config.json").is_file() else None
    elif spec.hf_id is None:
        stored = None
    else:
        stored = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    if stored is None:  # built locally (or not trained yet): the local processor's pinpoints
        size, pinpoints = TINY_IMAGE_SIZE, all_pinpoints(TINY_IMAGE_SIZE)
    else:
        size, pinpoints = stored["vision_config"]["image_size"], stored["image_grid_pinpoints"]
    grids = sorted({(h // size, w // size) for h, w in pinpoints if h % size == 0 and w % size == 0})
    return [f"{r}x{c}" for r, c in grids if r * c <= 9]


def bundled_dir(name: str) -> Path:
    return WEIGHTS_DIR / name


def _tuples(options: dict) -> dict:
    """JSON lists back to the tuples the method configs hold."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def parse_grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"grid {text!r} is not of the form RxC, e.g. 1x1 or 2x2") from None
    return rows, cols


def all_pinpoints(image_size: int) -> list[list[int]]:
    return [[image_size * r, image_size * c] for r in range(1, 4) for c in range(1, 4)]


@dataclass
class Loaded:
    spec: ModelSpec
    model: LlavaOnevisionForConditionalGeneration
    processor: ImageProcessor
    source: str                       # where the weights came from, for the manifest
    weights: object = None            # lazy loads: the weight source (iwp/weight_source.py); the model is a skeleton

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    @property
    def resolution(self) -> tuple[int, int]:
        """(height, width) every input image is resized to: the grid's anyres resolution."""
        return self.spec.grid[0] * self.image_size, self.spec.grid[1] * self.image_size

    @property
    def patch_side(self) -> int:
        """Patches per side of one crop."""
        return self.image_size // self.model.config.vision_config.patch_size

    @property
    def high_res_shape(self) -> tuple[int, int]:
        """(rows, cols) of the high-res feature grid, before the newline column."""
        side = self.patch_side
        rows, cols = self.spec.grid[0] * side, self.spec.grid[1] * side
        ratio = math.sqrt(rows * cols / (9 * side * side))
        if ratio > 1.1:  # anyres_max_9 downsamples past nine crops' worth of tokens
            rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols

    @property
    def n_visual(self) -> int:
        """Visual tokens per image: the base crop, then the high-res grid with a newline per row."""
        rows, cols = self.high_res_shape
        return self.patch_side ** 2 + rows * (cols + 1)


def tiny_config(vocab_size: int, image_token: int, video_token: int) -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, image_size=TINY_IMAGE_SIZE,
                           patch_size=TINY_PATCH),
        text_config=dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         initializer_range=0.1),  # peaked attention, as trained LVLMs have
        image_token_index=image_token, video_token_index=video_token,
        image_grid_pinpoints=all_pinpoints(TINY_IMAGE_SIZE),
        vision_feature_layer=-1, vision_feature_select_strategy="full")


def _build_random(config: LlavaOnevisionConfig, seed: int, dtype: torch.dtype):
    torch.manual_seed(seed)
    config.text_config._attn_implementation = "sdpa"
    return LlavaOnevisionForConditionalGeneration(config).to(dtype).eval()


def _in_memory(model, identity: str, lazy: bool):
    """A model built in memory (a few MB), as itself or, lazily, as a skeleton over its own tensors."""
    if not lazy:
        return model, None
    from .weight_source import InMemory, parameters_to_meta
    source = InMemory(model, identity)
    parameters_to_meta(model)
    return model, source


def _checkpoint_dir(spec: ModelSpec, model_path: str | None) -> Path:
    hint = (f"download {spec.hf_id} on a connected machine (`hf download {spec.hf_id}`) and pass "
            f"MODEL_PATH=<dir>, or set RANDOM_WEIGHTS=1 for the real-size architecture with random weights")
    if model_path:
        path = Path(model_path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"MODEL_PATH={path} holds no config.json for {spec.name}; {hint}")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(spec.hf_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise FileNotFoundError(f"weights for {spec.name} are not in the HF cache; {hint}") from None


def load(name: str, *, grid: str | None = None, model_path: str | None = None,
         random_weights: bool = False, dtype: torch.dtype = torch.float32, lazy: bool = False) -> Loaded:
    """A preset's model and processor. `lazy`: the model is a skeleton (meta parameters, real buffers) and
    `Loaded.weights` reads each tensor when asked, so a 7B model is never held whole (the exporter's way)."""
    from .weight_source import SeededRandom, materialize, skeleton
    spec = get_spec(name, grid)
    if spec.bundled:
        if model_path or random_weights:
            raise ValueError(f"{name} ships its trained weights; drop MODEL_PATH and RANDOM_WEIGHTS")
        path = bundled_dir(name)
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{name} has no weights in {path}; train them with `make train`")
        return _from_checkpoint(spec, path, dtype, lazy)
    if spec.hf_id is None:
        if model_path:
            raise ValueError(f"{name} is built locally from a seed; drop MODEL_PATH or pick a real model")
        processor = local_processor(TINY_IMAGE_SIZE, TINY_PATCH, all_pinpoints(TINY_IMAGE_SIZE))
        tok = processor.tokenizer
        config = tiny_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<video>"))
        model, source = _in_memory(_build_random(config, TINY_SEED, dtype), f"seed:{TINY_SEED}", lazy)
        return Loaded(spec, model, processor, f"seed:{TINY_SEED}", source)
    if random_weights:
        stored = json.loads((CONFIG_DIR / f"{name}.json").read_text())
        vision = stored["vision_config"]
        processor = local_processor(vision["image_size"], vision["patch_size"], stored["image_grid_pinpoints"])
        tok = processor.tokenizer  # local ids for the special tokens; shapes and FLOPs stay the real ones
        stored.update(image_token_index=tok.convert_tokens_to_ids("<image>"),
                      video_token_index=tok.convert_tokens_to_ids("<video>"))
        config = LlavaOnevisionConfig(**{k: v for k, v in stored.items() if k not in ("architectures", "model_type")})
        # tensor by tensor from a seed: a real-size random model is never built whole unless asked (not lazy)
        model = skeleton(config, dtype)
        source = SeededRandom(model if lazy else skeleton(config, dtype), RANDOM_SEED)
        if not lazy:
            materialize(model, source)
        return Loaded(spec, model, processor, f"random:{spec.hf_id}", source if lazy else None)
    return _from_checkpoint(spec, _checkpoint_dir(spec, model_path), dtype, lazy)


RANDOM_SEED = 0


def _from_checkpoint(spec: ModelSpec, path: Path, dtype: torch.dtype, lazy: bool) -> Loaded:
    from .weight_source import Checkpoint, skeleton
    processor = processor_from_checkpoint(path)
    if lazy:   # the safetensors memory-mapped, read tensor by tensor; shapes checked here, before any work
        model = skeleton(LlavaOnevisionConfig.from_pretrained(path), dtype)
        return Loaded(spec, model, processor, str(path), Checkpoint(path, model, dtype))
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return Loaded(spec, model.eval(), processor, str(path))
