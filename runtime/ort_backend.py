"""The ONNX Runtime side of an engine: its four sessions, one place that runs a graph (and tells the
observer), and the runtime core's decode backend over the KV arena.

Every tensor is found by its role in the manifest's io section; no tensor name is spelled here.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from iwp.engine_format import GRAPHS, EngineManifest

from ._core import Backend as CoreBackend
from .engine_dir import check_graph, engine_error, numpy_dtype


def load_sessions(manifest: EngineManifest, providers: list[str] | None = None) -> dict:
    """One ONNX Runtime session per graph, each checked against what the manifest records of it."""
    from iwp.plugins.visual_token_select.ort_op import session
    directory = Path(manifest.directory)
    try:
        import onnxruntime
        available = onnxruntime.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        sessions = {name: session(directory / f"{name}.onnx", providers) for name in GRAPHS}
    except Exception as err:  # onnx/ORT raise many types for a damaged graph
        raise engine_error(directory, f"a graph does not load ({type(err).__name__}: {str(err).splitlines()[0]})")
    for name in GRAPHS:
        check_graph(manifest, name, sessions[name])
    return sessions


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
        self.manifest, self.sessions, self.observer = manifest, sessions, observer

    def run(self, graph: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feeds by role ((role, layer) for the caches) -> every output by tensor name, in the graph's order."""
        io = self.manifest.io[graph]
        feeds = {spec.name: arrays[spec.role] if spec.layer is None else arrays[(spec.role, spec.layer)]
                 for spec in io.inputs}
        names = [spec.name for spec in io.outputs]
        start = time.perf_counter()
        outputs = dict(zip(names, self.sessions[graph].run(names, feeds)))
        self.report(graph, feeds, outputs, time.perf_counter() - start)
        return outputs

    def report(self, graph: str, feeds: dict, outputs: dict, seconds: float) -> None:
        if self.observer is not None:
            self.observer.on_graph(graph, feeds, outputs, seconds)


class OrtBackend(CoreBackend):
    """The ONNX Runtime backend of the runtime core's decode loop: one decode step reads the arena's past
    set and writes its present set in place (IOBinding, no copies of the caches). The observer gets the
    bound arrays: the arena's buffers themselves, overwritten by later steps."""

    def __init__(self, graphs: Graphs):
        CoreBackend.__init__(self)
        m = graphs.manifest
        self.graphs, self._vocab = graphs, m.model.vocab_size
        self._token = m.find("embed", "inputs", "token_ids")
        self._embeds = m.find("embed", "outputs", "embeddings")
        self._inputs = [m.find("decode", "inputs", role) for role in ("embeddings", "position", "step")]
        self._past, self._present = m.caches("decode", "inputs"), m.caches("decode", "outputs")
        logits = m.find("decode", "outputs", "logits")
        self._logits_name = logits.name
        assert logits.static_shape, logits  # the export's decode graph is static
        self._logits = np.empty(logits.shape, dtype=numpy_dtype(logits))  # written in place each step

    def vocab(self) -> int:
        return self._vocab

    def decode(self, token: int, position: int, step: int, arena) -> np.ndarray:
        embed = self.graphs.run("embed", {"token_ids": np.array([[token]], dtype=numpy_dtype(self._token))})
        graph, start = "decode", time.perf_counter()
        session = self.graphs.sessions[graph]
        binding = session.io_binding()
        values = (embed[self._embeds.name], np.array([position], dtype=numpy_dtype(self._inputs[1])),
                  np.array(step, dtype=numpy_dtype(self._inputs[2])))
        for spec, value in zip(self._inputs, values):
            binding.bind_cpu_input(spec.name, value)
        bound = {}
        for specs, which, bind in ((self._past, arena.past, binding.bind_input),
                                   (self._present, arena.present, binding.bind_output)):
            for spec in specs:
                buffer = arena_buffer(arena, which, spec.layer, spec.role)
                bind(spec.name, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)
                bound[spec.name] = buffer
        binding.bind_output(self._logits_name, "cpu", 0, self._logits.dtype, list(self._logits.shape),
                            self._logits.ctypes.data)
        session.run_with_iobinding(binding)
        seconds = time.perf_counter() - start
        if self.graphs.observer is not None:
            feeds = {spec.name: value for spec, value in zip(self._inputs, values)}
            feeds.update((spec.name, bound[spec.name]) for spec in self._past)
            outputs = {self._logits_name: self._logits, **{spec.name: bound[spec.name] for spec in self._present}}
            self.graphs.report(graph, feeds, outputs, seconds)
        return self._logits.reshape(-1)

