"""The ONNX Runtime side of an engine: one session per graph (embed, vision, each segment and selection),
one place that runs a graph (and tells the observer), and the runtime core's decode backend over the KV arena.

Every tensor is found by its role in the manifest's io section; no tensor name is spelled here. The token
table is memory-mapped once and handed to every graph that takes it (embed and, when tied, the LM head).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from iwp.engine_format import EngineManifest

from ._core import Backend as CoreBackend
from .engine_dir import check_graph, engine_error, numpy_dtype, token_table


def load_sessions(manifest: EngineManifest, providers: list[str] | None = None) -> dict:
    """One ONNX Runtime session per graph, each checked against what the manifest records of it."""
    from iwp.plugins.visual_token_select.ort_op import session
    directory = Path(manifest.directory)
    names = [graph.name for graph in manifest.graphs]
    try:
        import onnxruntime
        available = onnxruntime.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        # largest graph first: a session's load holds its weights twice for a moment (ORT widens fp16 weights
        # for the CPU and prepacks them), so that moment should come before the other graphs are resident
        # (7B int4: the load's peak 9.9 -> 8.2 GB)
        by_size = sorted(names, key=lambda name: -_graph_bytes(directory, name))
        sessions = {name: session(directory / f"{name}.onnx", providers) for name in by_size}
    except Exception as err:  # onnx/ORT raise many types for a damaged graph
        raise engine_error(directory, f"a graph does not load ({type(err).__name__}: {str(err).splitlines()[0]})")
    for name in names:
        check_graph(manifest, name, sessions[name])
    return sessions


def _graph_bytes(directory: Path, name: str) -> int:
    return sum(path.stat().st_size for path in directory.glob(f"{name}.onnx*"))


def make_arena(manifest: EngineManifest):
    """The runtime core's KV arena for an engine: per-layer capacities from the manifest."""
    from ._core import KvArena
    m = manifest.model
    return KvArena(list(manifest.shapes.cache_len), m.n_kv_heads, m.head_dim, 2 if manifest.dtype == "fp16" else 4)


def arena_buffer(arena, which: int, layer: int, role: str) -> np.ndarray:
    """The arena's buffer of one cache tensor (role key, value or valid) in set `which` (past or present)."""
    return {"key": arena.key, "value": arena.value, "valid": arena.valid}[role](which, layer)


class Graphs:
    """Runs an engine's graphs by name with inputs and outputs by role, timing each run and reporting it to
    the observer: `observer.on_graph(name, feeds, outputs, seconds)`, feeds and outputs by tensor name.
    Arrays an observer is handed may be reused by the next step (the arena's sets): copy what you keep."""

    def __init__(self, manifest: EngineManifest, sessions: dict, observer=None):
        import onnxruntime
        self.manifest, self.sessions, self.observer = manifest, sessions, observer
        self.token_table = token_table(manifest)
        # these runs are the prefill's (vision, every segment over the prompt, the selections): their
        # activations are large and used once, so each run hands its arena's free chunks back to the system;
        # decode steps (OrtBackend) keep theirs (7B int4: resident while decoding 11.4 -> 8.6 GB)
        self.run_options = onnxruntime.RunOptions()
        self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def feeds(self, graph: str, arrays: dict) -> dict[str, np.ndarray]:
        """A graph's feeds by tensor name from arrays by role ((role, layer) for the caches); the token table
        is the engine's own."""
        arrays = {**arrays, "token_table": self.token_table}
        return {spec.name: arrays[spec.role] if spec.layer is None else arrays[(spec.role, spec.layer)]
                for spec in self.manifest.io[graph].inputs}

    def run(self, graph: str, arrays: dict) -> dict[str, np.ndarray]:
        """Feeds by role -> every output by tensor name, in the graph's order."""
        feeds = self.feeds(graph, arrays)
        names = [spec.name for spec in self.manifest.io[graph].outputs]
        start = time.perf_counter()
        outputs = dict(zip(names, self.sessions[graph].run(names, feeds, self.run_options)))
        self.report(graph, feeds, outputs, time.perf_counter() - start)
        return outputs

    def report(self, graph: str, feeds: dict, outputs: dict, seconds: float) -> None:
        if self.observer is not None:
            self.observer.on_graph(graph, feeds, outputs, seconds)


class OrtBackend(CoreBackend):
    """The ONNX Runtime backend of the runtime core's decode loop. One step embeds the token and runs every
    segment over it (T = 1) at cache slot `its prefill length + step`, each segment reading its layers' past
    set of the arena and writing their present set in place (IOBinding, no copies of the caches).

    Every input and output of a step lives in a buffer bound once: the token, the position and each
    segment's offset are small arrays written in place, each segment's hidden input is the previous graph's
    output buffer, and each segment has one binding per arena set (the sets swap every step), made on first
    use. So a step binds nothing. The observer gets the bound arrays: buffers overwritten by later steps."""

    def __init__(self, graphs: Graphs, prompt_len: int):
        CoreBackend.__init__(self)
        m = graphs.manifest
        self.graphs, self._vocab = graphs, m.model.vocab_size
        self._token = np.zeros((1, 1), dtype=numpy_dtype(m.find("embed", "inputs", "token_ids")))
        embeds = m.find("embed", "outputs", "embeddings")
        self._embeds = np.empty((1, 1, m.model.hidden_size), dtype=numpy_dtype(embeds))
        self._position = np.zeros((1, 1), dtype=numpy_dtype(m.find("segment.0", "inputs", "positions")))
        self._segments = []
        for segment in m.segments():
            last = segment.layers[1] == m.model.n_layers
            out = m.find(segment.name, "outputs", "logits" if last else "hidden")
            shape = (1, m.model.vocab_size) if last else (1, 1, m.model.hidden_size)
            self._segments.append((segment.name, m.segment_prefill_len(segment, prompt_len),
                                   m.caches(segment.name, "inputs"), m.caches(segment.name, "outputs"),
                                   out.name, np.empty(shape, dtype=numpy_dtype(out)),   # written in place
                                   np.zeros((), dtype=np.int64)))                        # the offset, 0-d
        self._embed_binding = self._bind("embed", {"token_ids": self._token, "token_table": graphs.token_table},
                                         {embeds.name: self._embeds})
        self._bindings = {}   # (segment index, the arena's past set) -> (binding, feeds, outputs)

    def vocab(self) -> int:
        return self._vocab

    def _bind(self, graph: str, inputs: dict, outputs: dict, caches: tuple = ()):
        """An IOBinding of `graph` over fixed buffers: inputs by role, outputs by name, caches as
        (specs, arena set) pairs; any other output (TransPrune's transitions) ORT allocates per run."""
        m, session = self.graphs.manifest, self.graphs.sessions[graph]
        binding, feeds, bound = session.io_binding(), {}, dict(outputs)
        for spec in m.io[graph].inputs:
            if spec.layer is None:
                feeds[spec.name] = inputs[spec.role]
                _bind_address(binding.bind_input, spec.name, inputs[spec.role])
        for specs, arena, which, is_input in caches:
            for spec in specs:
                buffer = arena_buffer(arena, which, spec.layer, spec.role)
                (feeds if is_input else bound)[spec.name] = buffer
                _bind_address(binding.bind_input if is_input else binding.bind_output, spec.name, buffer)
        for name, buffer in outputs.items():
            _bind_address(binding.bind_output, name, buffer)
        for spec in m.io[graph].outputs:
            if spec.name not in bound:
                binding.bind_output(spec.name, "cpu")
        return binding, feeds, bound

    def _run(self, graph: str, bound) -> None:
        binding, feeds, outputs = bound
        start = time.perf_counter()
        self.graphs.sessions[graph].run_with_iobinding(binding)
        if self.graphs.observer is not None:
            self.graphs.report(graph, feeds, outputs, time.perf_counter() - start)

    def decode(self, token: int, position: int, step: int, arena) -> np.ndarray:
        self._token[0, 0], self._position[0, 0] = token, position
        self._run("embed", self._embed_binding)
        hidden = self._embeds
        for i, (name, fill, past, present, out_name, out, offset) in enumerate(self._segments):
            offset[()] = fill + step
            key = (i, arena.past)
            if key not in self._bindings:
                self._bindings[key] = self._bind(
                    name, {"hidden": hidden, "positions": self._position, "offset": offset,
                           "token_table": self.graphs.token_table}, {out_name: out},
                    ((past, arena, arena.past, True), (present, arena, arena.present, False)))
            self._run(name, self._bindings[key])
            hidden = out
        return hidden.reshape(-1)


def _bind_address(bind, name: str, array: np.ndarray) -> None:
    """Bind a host array by address: ONNX Runtime reads (or writes) it at run time, so writes in place count."""
    bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
