"""The ONNX Runtime backend: embed + vision -> prefill (selection inside) -> decode loop, from an engine
directory. `Pipeline.from_engine(DIR).generate(image, prompt)`.

Everything about the engine (shapes, method, token ids) is read from its manifest.json. Every problem with
the directory is one line saying what is wrong and what to do.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iwp.export.engine import FORMAT, GRAPHS, sha256

from ._core import Backend as CoreBackend

REBUILD = "rebuild it with `make engine`"


def _error(directory: Path, what: str) -> ValueError:
    return ValueError(f"engine {directory}: {what}; {REBUILD}")


def read_manifest(directory: Path, verify_files: bool = True) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"engine {directory} does not exist; build it with `make engine` or pass --engine DIR")
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except FileNotFoundError:
        raise _error(directory, "has no manifest.json (an interrupted or foreign build)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _error(directory, "manifest.json is corrupt") from None
    if manifest.get("format") != FORMAT:
        raise _error(directory, f"manifest format {manifest.get('format')!r} is not this iwp's format {FORMAT}")
    for name in GRAPHS:
        if not (directory / f"{name}.onnx").is_file():
            raise _error(directory, f"{name}.onnx is missing")
    if verify_files:
        for name, digest in manifest.get("files", {}).items():
            path = directory / name
            if not path.is_file() or sha256(path) != digest:
                raise _error(directory, f"{name} does not match the hash in manifest.json (corrupt or edited)")
    return manifest


_MASK64 = (1 << 64) - 1


class SplitMix64:
    """The runtime core's random stream (runtime/core/sampler.cpp), in Python."""

    def __init__(self, seed: int):
        self.state = seed & _MASK64

    def uniform(self) -> float:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return ((z ^ (z >> 31)) >> 11) * 2.0 ** -53


@dataclass
class Sampler:
    """Greedy at temperature 0; otherwise temperature then top-p (nucleus), from a seeded SplitMix64 stream.

    This is the pure-Python reference of the runtime core's sampler (runtime/core/sampler.cpp), step for step
    (sums in index or rank order, in double), so both draw the same token for the same seed.
    """
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        self.rng = SplitMix64(self.seed)

    def core(self):
        """The same sampler in the runtime core."""
        from ._core import Sampler as CoreSampler
        return CoreSampler(self.temperature, self.top_p, self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        p = np.exp(z - z.max())
        p /= np.cumsum(p)[-1]                      # a sequential sum, as the C++ loop adds
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        before = np.concatenate([[0.0], cumulative[:-1]])
        kept = int(np.count_nonzero(before < self.top_p))   # the smallest prefix reaching top_p
        u = self.rng.uniform() * cumulative[kept - 1]
        pick = min(int(np.searchsorted(cumulative[:kept], u, side="right")), kept - 1)
        return int(order[pick])


def _prefill_feeds(batch, embeds: np.ndarray) -> dict:
    """The prefill graph's inputs (export/graphs.PREFILL_INPUTS) for a padded batch."""
    return {"inputs_embeds": embeds, "attention_mask": batch.attention_mask.numpy(),
            "positions": batch.positions.numpy(), "visual_start": batch.visual_start.numpy(),
            "query_idx": batch.query_idx.numpy(), "query_mask": batch.query_mask.numpy(),
            "last_idx": batch.last_idx.numpy()}


def _numpy_dtype(elem_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bool)": np.bool_,
            "tensor(int64)": np.int64}[elem_type]


def make_arena(manifest: dict):
    """The runtime core's KV arena for an engine: per-layer capacities from the manifest."""
    from ._core import KvArena
    m = manifest["model"]
    return KvArena(manifest["shapes"]["cache_len"], m["n_kv_heads"], m["head_dim"],
                   2 if manifest["dtype"] == "fp16" else 4)


def _cache_names(kind: str, n_layers: int) -> list[tuple[int, str, str]]:
    return [(layer, part, f"{kind}.{layer}.{part}") for layer in range(n_layers) for part in ("key", "value", "valid")]


def _arena_buffer(arena, which: int, layer: int, part: str) -> np.ndarray:
    return {"key": arena.key, "value": arena.value, "valid": arena.valid}[part](which, layer)


class OrtBackend(CoreBackend):
    """The ONNX Runtime backend of the runtime core's decode loop: one decode step reads the arena's past
    set and writes its present set in place (IOBinding, no copies of the caches)."""

    def __init__(self, sessions: dict, manifest: dict):
        CoreBackend.__init__(self)
        self.sessions, self.n_layers = sessions, manifest["model"]["n_layers"]
        self._vocab = manifest["model"]["vocab_size"]
        logits = next(o for o in sessions["decode"].get_outputs() if o.name == "logits")
        self._logits = np.empty(logits.shape, dtype=_numpy_dtype(logits.type))  # written in place each step

    def vocab(self) -> int:
        return self._vocab

    def decode(self, token: int, position: int, step: int, arena) -> np.ndarray:
        (embed,) = self.sessions["embed"].run(None, {"input_ids": np.array([[token]], dtype=np.int64)})
        session = self.sessions["decode"]
        binding = session.io_binding()
        for name, value in (("inputs_embeds", embed), ("position", np.array([position], dtype=np.int64)),
                            ("step", np.array(step, dtype=np.int64))):
            binding.bind_cpu_input(name, value)
        for kind, which in (("past", arena.past), ("present", arena.present)):
            for layer, part, name in _cache_names(kind, self.n_layers):
                buffer = _arena_buffer(arena, which, layer, part)
                bind = binding.bind_input if kind == "past" else binding.bind_output
                bind(name, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)
        binding.bind_output("logits", "cpu", 0, self._logits.dtype, list(self._logits.shape), self._logits.ctypes.data)
        session.run_with_iobinding(binding)
        return self._logits.reshape(-1)


def prepare(directory: Path, manifest: dict, processor, image, prompt: str):
    """Processor inputs for one image and prompt, left-padded to the engine's fixed prompt length."""
    import torch
    from iwp.inputs import Batch, load_image, pad_to_length
    m = manifest["model"]
    height, width = m["resolution"]
    image = load_image(image).resize((width, height))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        add_generation_prompt=True)
    if text.count(processor.image_token) != 1:
        raise ValueError(f"the prompt holds {processor.image_token}; remove it (one image per prompt)")
    enc = processor(images=[image], text=[text], return_tensors="pt")
    ids, n = enc["input_ids"], m["n_visual"]
    is_image = ids[0] == processor.image_token_id
    if int(is_image.sum()) != n:
        raise ValueError(f"engine {directory}: the processor gives {int(is_image.sum())} image tokens but "
                         f"the engine expects {n}; {REBUILD}")
    t, start = ids.shape[1], int(is_image.int().argmax())
    # positions and queries are recomputed by pad_to_length; only the image block's start matters here
    batch = Batch(ids, enc["attention_mask"], None, enc["pixel_values"], enc["image_sizes"],
                  torch.tensor([start]), n, None, None, torch.tensor([t - 1]), None)
    return pad_to_length(batch, manifest["shapes"]["max_prompt"], manifest["tokens"]["pad"])


class Pipeline:
    def __init__(self, directory: Path, manifest: dict, processor, sessions: dict):
        self.directory, self.manifest, self.processor, self.sessions = directory, manifest, processor, sessions
        self.arena = make_arena(manifest)

    @classmethod
    def from_engine(cls, directory, budget: int | None = None, providers: list[str] | None = None) -> "Pipeline":
        from iwp.processor import processor_from_checkpoint
        from .ort_ops import session
        directory = Path(directory)
        manifest = read_manifest(directory)
        built = manifest["method"]["budget"]
        if budget is not None and budget != built:
            raise ValueError(f"engine {directory} was built for budget {built}, not {budget}; "
                             f"run `make engine BUDGET={budget}` or use the engine built for it")
        try:
            import onnxruntime
            available = onnxruntime.get_available_providers()
            providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
            sessions = {name: session(directory / f"{name}.onnx", providers) for name in GRAPHS}
        except Exception as err:  # onnx/ORT raise many types for a damaged graph
            raise _error(directory, f"a graph does not load ({type(err).__name__}: {str(err).splitlines()[0]})")
        return cls(directory, manifest, processor_from_checkpoint(directory), sessions)

    @property
    def max_new_tokens(self) -> int:
        return self.manifest["shapes"]["max_new_tokens"]

    def _prepare(self, image, prompt: str):
        return prepare(self.directory, self.manifest, self.processor, image, prompt)

    def _prefill(self, batch, timings: dict | None = None):
        """Embed, vision and prefill: the last logits, each stage's kept indices and the caches. `timings`,
        if given, gets the seconds of vision, prefill and the selection inside it (for `iwp profile`)."""
        import time

        from .ort_ops import selection_seconds
        s = self.sessions
        (embeds,) = s["embed"].run(None, {"input_ids": batch.input_ids.numpy()})
        mark = time.perf_counter()
        (features,) = s["vision"].run(None, {"pixel_values": batch.pixel_values.numpy()})
        vision = time.perf_counter() - mark
        start, n = int(batch.visual_start[0]), batch.n_visual
        embeds[0, start:start + n] = features[0]
        selection, mark = selection_seconds(), time.perf_counter()
        logits, *rest = s["prefill"].run(None, _prefill_feeds(batch, embeds))
        if timings is not None:
            timings.update(vision=vision, prefill=time.perf_counter() - mark,
                           selection=selection_seconds() - selection)
        n_stages = len(self.manifest["method"]["stages"])
        return logits[0, -1], rest[:n_stages], rest[n_stages:]

    def _load_arena(self, caches) -> None:
        """The prefill's caches into the arena's past set, where the first decode step reads them."""
        arena = self.arena
        for (layer, part, _), cache in zip(_cache_names("present", self.manifest["model"]["n_layers"]), caches):
            _arena_buffer(arena, arena.past, layer, part)[...] = cache

    def _check_steps(self, max_new_tokens: int | None) -> int:
        steps = max_new_tokens or self.max_new_tokens
        if not 1 <= steps <= self.max_new_tokens:
            raise ValueError(f"max_new_tokens must be in 1..{self.max_new_tokens} for this engine, got {steps}")
        return steps

    def generate_ids(self, image, prompt: str, max_new_tokens: int | None = None, sampler: Sampler | None = None,
                     on_token: Callable[[int], None] | None = None) -> tuple[list[int], list[np.ndarray]]:
        """Token ids (stopping at EOS or max_new_tokens) and each stage's kept indices. The decode loop,
        the sampler and the KV arena are the runtime core's (C++); ONNX Runtime runs the graphs."""
        from ._core import generate
        steps = self._check_steps(max_new_tokens)
        sampler = sampler or Sampler()
        batch = self._prepare(image, prompt)
        logits, kept, caches = self._prefill(batch)
        self._load_arena(caches)
        tokens = generate(OrtBackend(self.sessions, self.manifest), self.arena, logits, int(batch.positions[0, -1]) + 1,
                          sampler.core(), steps, [self.manifest["tokens"]["eos"]], on_token)
        return tokens, kept

    def generate_ids_reference(self, image, prompt: str, max_new_tokens: int | None = None,
                               sampler: Sampler | None = None) -> list[int]:
        """The pure-Python decode loop over numpy caches, kept as the reference the core is tested against."""
        steps = self._check_steps(max_new_tokens)
        sampler = sampler or Sampler()
        batch = self._prepare(image, prompt)
        logits, _, past = self._prefill(batch)
        s, eos = self.sessions, self.manifest["tokens"]["eos"]
        position = np.array([int(batch.positions[0, -1]) + 1])
        names = [i.name for i in s["decode"].get_inputs()]
        token, tokens = sampler(logits), []
        for step in range(steps):
            tokens.append(token)
            if token == eos or step == steps - 1:
                break
            (token_embed,) = s["embed"].run(None, {"input_ids": np.array([[token]])})
            logits, *past = s["decode"].run(None, dict(zip(names, [token_embed, position + step,
                                                                   np.array(step, dtype=np.int64), *past])))
            token = sampler(logits[0])
        return tokens

    def time_stages(self, image, prompt: str, repeats: int = 5) -> dict:
        """Median seconds of the vision and prefill graphs on one input, after a warm-up run (used by
        `iwp bench-prefill`)."""
        import statistics
        import time
        batch = self._prepare(image, prompt)
        s = self.sessions
        (embeds,) = s["embed"].run(None, {"input_ids": batch.input_ids.numpy()})
        feeds = _prefill_feeds(batch, embeds)  # unmerged embeddings: same shapes, same work
        runs = {"vision": lambda: s["vision"].run(None, {"pixel_values": batch.pixel_values.numpy()}),
                "prefill": lambda: s["prefill"].run(None, feeds)}
        out = {}
        for name, run in runs.items():
            run()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            out[name] = statistics.median(times)
        return out

    def generate(self, image, prompt: str, max_new_tokens: int | None = None, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, on_text: Callable[[str], None] | None = None) -> str:
        tokenizer = self.processor.tokenizer
        callback = (lambda token: on_text(tokenizer.decode([token], skip_special_tokens=True))) if on_text else None
        ids, _ = self.generate_ids(image, prompt, max_new_tokens, Sampler(temperature, top_p, seed), callback)
        return tokenizer.decode(ids, skip_special_tokens=True)
