"""An engine's pipeline on ONNX Runtime: prepare (image + prompt -> unpadded batch) -> prefill (embed, vision,
then the decoder's segments with a selection between each two: logits, kept indices, caches) -> decode (the
runtime core's C++ loop over the KV arena, every segment per token). `Pipeline.from_engine(DIR).generate(image,
prompt)`.

The steps are public so that tools compose them instead of reaching in, and one observer sees every graph
run: `Pipeline.from_engine(DIR, observer=obj)` or `pipeline.observe(obj)`, where
`obj.on_graph(name, feeds, outputs, seconds)` is called after each run of a graph: embed, vision, each segment
(once per chunk of the prompt, PREFILL_CHUNK) and select of the prefill, then embed and each segment per decode
step (feeds and outputs by tensor name; decode's are the arena's bound buffers, so copy what you keep).

Everything about the engine is read from its manifest (iwp/engine_format.py), and tensors are bound by the
roles it records.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iwp.engine_format import TOKEN_AXIS, EngineManifest

from .engine_dir import read_engine
from .ort_backend import Graphs, OrtBackend, arena_buffer, load_sessions, make_arena
from .prompt import prefill_arrays, prepare
from .sampler import Sampler, SplitMix64

__all__ = ["PREFILL_CHUNK", "Pipeline", "Prefill", "Sampler", "SplitMix64", "read_manifest", "prepare"]

# A segment's prefill runs over at most this many tokens at a time. Its attention scores are [heads, T, capacity]
# and ONNX Runtime's CPU widens them to fp32 and holds several at once: at 7B over 1,536 tokens that was 1.7 GB
# above the resident weights, the generation's peak. Chunks of 512 bound it to a third (issue 15).
PREFILL_CHUNK = 512


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
    prompt_len: int = 0             # the prompt's tokens (each segment's cache fill follows from it)


class Pipeline:
    def __init__(self, manifest: EngineManifest, processor, sessions: dict, observer=None,
                 prefill_chunk: int | None = PREFILL_CHUNK):
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be a positive number of tokens or None (whole prompt), "
                             f"got {prefill_chunk!r}")
        self.manifest, self.processor, self.sessions = manifest, processor, sessions
        self.prefill_chunk = prefill_chunk
        self.directory = Path(manifest.directory)
        self.graphs = Graphs(manifest, sessions, observer)
        self.arena = make_arena(manifest)

    @classmethod
    def from_engine(cls, directory, budget: int | None = None, providers: list[str] | None = None,
                    observer=None, prefill_chunk: int | None = PREFILL_CHUNK) -> Pipeline:
        from iwp.processor import processor_from_checkpoint
        manifest = read_engine(directory)
        built = manifest.method.budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
            raise TypeError(f"budget must be an int (the visual tokens the engine keeps), got {type(budget).__name__}")
        if budget is not None and budget != built:
            raise ValueError(f"engine {directory} was built for budget {built}, not {budget}; "
                             f"run `make engine BUDGET={budget}` or use the engine built for it")
        return cls(manifest, processor_from_checkpoint(Path(directory)), load_sessions(manifest, providers), observer,
                   prefill_chunk)

    def observe(self, observer) -> None:
        """Set (or, with None, clear) the one observer of every graph run."""
        self.graphs.observer = observer

    @property
    def max_new_tokens(self) -> int:
        return self.manifest.shapes.max_new_tokens

    # --- the public steps ---

    def prepare(self, image, prompt: str):
        """One image and prompt -> the engine's unpadded batch (iwp.inputs.Batch)."""
        return prepare(self.manifest, self.processor, image, prompt)

    def prefill(self, batch) -> Prefill:
        """Embed, vision, then the decoder's segments over the prompt's real length with each selection
        between them (`decoder_graphs`): the logits, each stage's kept indices and every layer's caches."""
        run, m = self.graphs.run, self.manifest
        embeds = run("embed", {"token_ids": batch.input_ids.numpy()})[m.find("embed", "outputs", "embeddings").name]
        features = run("vision", {"pixels": batch.pixel_values.numpy()})[m.find("vision", "outputs", "features").name]
        start, n = int(batch.visual_start[0]), batch.n_visual
        embeds[0, start:start + n] = features[0]
        out = self.decoder_graphs(prefill_arrays(batch, embeds))
        return Prefill(out["logits"][0], out["kept"], out["caches"], int(batch.positions[0, -1]) + 1,
                       batch.input_ids.shape[1])

    def decoder_graphs(self, arrays: dict) -> dict:
        """The prefill's segment and select graphs in run order, from the first segment's inputs by role:
        {"logits", "kept" (per stage), "caches" (per layer key, value, valid, at decode capacity)}. Each graph's
        outputs are the next one's inputs by role; a segment's caches start empty (the arena's reset set)."""
        m, run = self.manifest, self.graphs.run
        self.arena.reset()
        state, kept, caches = dict(arrays), [], []
        for graph in m.graphs[2:]:
            if graph.kind == "segment":
                out = self.segment_prefill(graph.name, state)
                caches += [out[spec.name] for spec in m.caches(graph.name, "outputs")]
            else:
                out = run(graph.name, state)
                kept.append(out[m.find(graph.name, "outputs", "kept", stage=graph.stage).name])
                state["alive"] = kept[-1]
            for spec in m.io[graph.name].outputs:
                if spec.layer is None and spec.role != "kept":
                    state[spec.role] = out[spec.name]
        return {"logits": state["logits"], "kept": kept, "caches": caches}

    def segment_prefill(self, graph: str, state: dict) -> dict:
        """One segment over the prompt's tokens in `state` (by role), from the arena's empty caches, in chunks of
        at most `prefill_chunk` tokens: every output by tensor name, per-token ones joined along their token
        axis, the caches and logits those of the last chunk (which has the last token)."""
        m = self.manifest
        past = {(spec.role, spec.layer): arena_buffer(self.arena, self.arena.past, spec.layer, spec.role)
                for spec in m.caches(graph, "inputs")}
        tokens = state["hidden"].shape[TOKEN_AXIS["hidden"]]
        chunk = self.prefill_chunk or tokens
        pieces = []
        for start in range(0, tokens, chunk):
            span = slice(start, start + chunk)   # a view: a prompt of one chunk is not copied
            part = {role: state[role][(slice(None),) * TOKEN_AXIS[role] + (span,)] for role in ("hidden", "positions")}
            offset = np.asarray(state["offset"] + start, dtype=np.int64)
            pieces.append(self.graphs.run(graph, {**state, **part, "offset": offset, **past}))
            past = {(spec.role, spec.layer): pieces[-1][spec.name] for spec in m.caches(graph, "outputs")}
        out = dict(pieces[-1])
        if len(pieces) > 1:
            for spec in m.io[graph].outputs:
                if spec.role in TOKEN_AXIS:
                    out[spec.name] = np.concatenate([p[spec.name] for p in pieces], TOKEN_AXIS[spec.role])
        return out

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
        return generate(OrtBackend(self.graphs, prefill.prompt_len), self.arena, prefill.logits, prefill.next_position, sampler.core(),
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
        past = {(spec.role, spec.layer): cache for spec, cache in
                zip([c for g in m.segments() for c in m.caches(g.name, "outputs")], pre.caches)}
        token, tokens = sampler(pre.logits), []
        for step in range(steps):
            tokens.append(token)
            if token == eos or step == steps - 1:
                break
            state = {"hidden": run("embed", {"token_ids": np.array([[token]], dtype=np.int64)})[embeddings],
                     "positions": np.array([[pre.next_position + step]], dtype=np.int64)}
            for segment in m.segments():
                offset = m.segment_prefill_len(segment, pre.prompt_len) + step
                out = run(segment.name, {**state, "offset": np.array(offset, dtype=np.int64), **past})
                past.update(((spec.role, spec.layer), out[spec.name]) for spec in m.caches(segment.name, "outputs"))
                state["hidden"] = out[m.io[segment.name].outputs[0].name]
            token = sampler(state["hidden"][0])
        return tokens

    def time_stages(self, image, prompt: str, repeats: int = 5) -> dict:
        """Median seconds of the vision graph and of the decoder's prefill (its segments and selections) on one
        input, after a warm-up run (used by `iwp bench-prefill`)."""
        import statistics
        batch = self.prepare(image, prompt)
        run = self.graphs.run
        (embeds,) = run("embed", {"token_ids": batch.input_ids.numpy()}).values()
        arrays = prefill_arrays(batch, embeds)  # unmerged embeddings: same shapes, same work
        runs = {"vision": lambda: run("vision", {"pixels": batch.pixel_values.numpy()}),
                "prefill": lambda: self.decoder_graphs(arrays)}
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
        m = self.manifest
        for spec, cache in zip([c for g in m.segments() for c in m.caches(g.name, "outputs")], caches):
            arena_buffer(self.arena, self.arena.past, spec.layer, spec.role)[...] = cache
