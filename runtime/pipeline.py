"""An engine's pipeline on ONNX Runtime: prepare (image + prompt -> padded batch) -> prefill (embed, vision,
then prefill with the selection inside: logits, kept indices, caches) -> decode (the runtime core's C++ loop
over the KV arena). `Pipeline.from_engine(DIR).generate(image, prompt)`.

The steps are public so that tools compose them instead of reaching in, and one observer sees every graph
run: `Pipeline.from_engine(DIR, observer=obj)` or `pipeline.observe(obj)`, where
`obj.on_graph(name, feeds, outputs, seconds)` is called after each run of embed, vision, prefill and each
decode step (feeds and outputs by tensor name; decode's are the arena's bound buffers, so copy what you keep).

Everything about the engine is read from its manifest (iwp/engine_format.py), and tensors are bound by the
roles it records.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iwp.engine_format import EngineManifest

from .engine_dir import read_engine
from .ort_backend import Graphs, OrtBackend, arena_buffer, load_sessions, make_arena
from .prompt import prefill_arrays, prepare
from .sampler import Sampler, SplitMix64

__all__ = ["Pipeline", "Prefill", "Sampler", "SplitMix64", "read_manifest", "prepare"]


def read_manifest(directory, verify_files: bool = True) -> EngineManifest:
    """The typed manifest of an engine directory (runtime/engine_dir.py read_engine)."""
    return read_engine(directory, verify_files)


@dataclass
class Prefill:
    """What the prefill step leaves for decode."""
    logits: np.ndarray              # [V] the last prompt token's
    kept: list[np.ndarray]          # per selection stage: [1, K_s] kept visual-token indices
    caches: list[np.ndarray]        # per layer key, value, valid at decode capacity (decode's past layout)
    next_position: int              # the first new token's RoPE position


class Pipeline:
    def __init__(self, manifest: EngineManifest, processor, sessions: dict, observer=None):
        self.manifest, self.processor, self.sessions = manifest, processor, sessions
        self.directory = Path(manifest.directory)
        self.graphs = Graphs(manifest, sessions, observer)
        self.arena = make_arena(manifest)

    @classmethod
    def from_engine(cls, directory, budget: int | None = None, providers: list[str] | None = None,
                    observer=None) -> Pipeline:
        from iwp.processor import processor_from_checkpoint
        manifest = read_engine(directory)
        built = manifest.method.budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
            raise TypeError(f"budget must be an int (the visual tokens the engine keeps), got {type(budget).__name__}")
        if budget is not None and budget != built:
            raise ValueError(f"engine {directory} was built for budget {built}, not {budget}; "
                             f"run `make engine BUDGET={budget}` or use the engine built for it")
        return cls(manifest, processor_from_checkpoint(Path(directory)), load_sessions(manifest, providers), observer)

    def observe(self, observer) -> None:
        """Set (or, with None, clear) the one observer of every graph run."""
        self.graphs.observer = observer

    @property
    def max_new_tokens(self) -> int:
        return self.manifest.shapes.max_new_tokens

    # --- the public steps ---

    def prepare(self, image, prompt: str):
        """One image and prompt -> the engine's left-padded batch (iwp.inputs.Batch)."""
        return prepare(self.manifest, self.processor, image, prompt)

    def prefill(self, batch) -> Prefill:
        """Embed, vision and prefill (the selection runs inside the prefill graph)."""
        run, m = self.graphs.run, self.manifest
        embeds = run("embed", {"token_ids": batch.input_ids.numpy()})[m.find("embed", "outputs", "embeddings").name]
        features = run("vision", {"pixels": batch.pixel_values.numpy()})[m.find("vision", "outputs", "features").name]
        start, n = int(batch.visual_start[0]), batch.n_visual
        embeds[0, start:start + n] = features[0]
        out = run("prefill", prefill_arrays(batch, embeds))
        kept = [out[m.find("prefill", "outputs", "kept", stage=s).name] for s in range(len(m.method.stages))]
        caches = [out[spec.name] for spec in m.caches("prefill", "outputs")]
        return Prefill(out[m.find("prefill", "outputs", "logits").name][0, -1], kept, caches,
                       int(batch.positions[0, -1]) + 1)

    def decode(self, prefill: Prefill, max_new_tokens: int | None = None, sampler: Sampler | None = None,
               on_token: Callable[[int], bool | None] | None = None,
               stop_tokens: Sequence[int] | None = None) -> list[int]:
        """New token ids from a prefill: the runtime core's loop, sampler and KV arena (C++), ONNX Runtime
        running the graphs. Stops at `stop_tokens` (default: the engine's EOS), after `max_new_tokens`, or when
        `on_token` returns False."""
        from ._core import generate
        steps = self._check_steps(max_new_tokens)
        sampler = sampler or Sampler()
        self._load_arena(prefill.caches)
        stops = [self.manifest.tokens.eos] if stop_tokens is None else list(stop_tokens)
        return generate(OrtBackend(self.graphs), self.arena, prefill.logits, prefill.next_position, sampler.core(),
                        steps, stops, on_token)

    def generate_ids(self, image, prompt: str, max_new_tokens: int | None = None, sampler: Sampler | None = None,
                     on_token: Callable[[int], bool | None] | None = None) -> tuple[list[int], list[np.ndarray]]:
        """Token ids (stopping at EOS or max_new_tokens) and each stage's kept indices."""
        self._check_steps(max_new_tokens)  # before any work
        pre = self.prefill(self.prepare(image, prompt))
        return self.decode(pre, max_new_tokens, sampler, on_token), pre.kept

    def generate(self, image, prompt: str, max_new_tokens: int | None = None, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, on_text: Callable[[str], None] | None = None) -> str:
        tokenizer = self.processor.tokenizer
        callback = (lambda token: on_text(tokenizer.decode([token], skip_special_tokens=True))) if on_text else None
        ids, _ = self.generate_ids(image, prompt, max_new_tokens, Sampler(temperature, top_p, seed), callback)
        return tokenizer.decode(ids, skip_special_tokens=True)

    # --- the reference loop and stage timing ---

    def generate_ids_reference(self, image, prompt: str, max_new_tokens: int | None = None,
                               sampler: Sampler | None = None) -> list[int]:
        """The pure-Python decode loop over numpy caches, kept as the reference the core is tested against."""
        steps = self._check_steps(max_new_tokens)
        sampler = sampler or Sampler()
        pre = self.prefill(self.prepare(image, prompt))
        m, run, eos = self.manifest, self.graphs.run, self.manifest.tokens.eos
        embeddings = m.find("embed", "outputs", "embeddings").name
        logits, present = m.find("decode", "outputs", "logits").name, m.caches("decode", "outputs")
        past = {(spec.role, spec.layer): cache for spec, cache in zip(m.caches("decode", "inputs"), pre.caches)}
        token, tokens = sampler(pre.logits), []
        for step in range(steps):
            tokens.append(token)
            if token == eos or step == steps - 1:
                break
            embed = run("embed", {"token_ids": np.array([[token]], dtype=np.int64)})[embeddings]
            out = run("decode", {"embeddings": embed, "position": np.array([pre.next_position + step]),
                                 "step": np.array(step, dtype=np.int64), **past})
            past = {(spec.role, spec.layer): out[spec.name] for spec in present}
            token = sampler(out[logits][0])
        return tokens

    def time_stages(self, image, prompt: str, repeats: int = 5) -> dict:
        """Median seconds of the vision and prefill graphs on one input, after a warm-up run (used by
        `iwp bench-prefill`)."""
        import statistics
        batch = self.prepare(image, prompt)
        run = self.graphs.run
        (embeds,) = run("embed", {"token_ids": batch.input_ids.numpy()}).values()
        arrays = prefill_arrays(batch, embeds)  # unmerged embeddings: same shapes, same work
        runs = {"vision": lambda: run("vision", {"pixels": batch.pixel_values.numpy()}),
                "prefill": lambda: run("prefill", arrays)}
        out = {}
        for name, stage in runs.items():
            stage()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                stage()
                times.append(time.perf_counter() - start)
            out[name] = statistics.median(times)
        return out

    # --- internals ---

    def _check_steps(self, max_new_tokens: int | None) -> int:
        """None means the engine's capacity; anything else must be an int in 1..capacity (0 is refused, not
        read as the default)."""
        steps = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= self.max_new_tokens:
            raise ValueError(f"max_new_tokens must be in 1..{self.max_new_tokens} for this engine, got {steps!r}")
        return int(steps)

    def _load_arena(self, caches) -> None:
        """The prefill's caches into the arena's past set, where the first decode step reads them."""
        for spec, cache in zip(self.manifest.caches("prefill", "outputs"), caches):
            arena_buffer(self.arena, self.arena.past, spec.layer, spec.role)[...] = cache
