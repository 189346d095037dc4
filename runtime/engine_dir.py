"""An engine directory, read and verified: manifest.json through iwp/engine_format.py, every graph present,
every file matching its recorded hash, and each loaded graph matching what the manifest records of it.

Every problem is one line saying what is wrong and what to do (rebuild with `make engine`).
"""
from __future__ import annotations

from pathlib import Path

from iwp.engine_format import REBUILD, EngineManifest, TensorSpec, sha256

# ONNX Runtime's element types -> the format's dtype names
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def engine_error(directory, what: str) -> ValueError:
    return ValueError(f"engine {directory}: {what}; {REBUILD}")


def read_engine(directory, verify_files: bool = True) -> EngineManifest:
    """The typed manifest of an engine directory whose graphs are present (and, with verify_files, whose
    files all match their recorded sha256)."""
    directory = Path(directory)
    if not directory.exists():
        raise ValueError(f"engine {directory} does not exist; build it with `make engine` or pass --engine DIR")
    if not directory.is_dir():
        raise ValueError(f"engine {directory} is a file, not an engine directory; pass the directory "
                         "`make engine` built (engines/<name>/)")
    manifest = EngineManifest.read(directory)
    for graph in manifest.graphs:
        if not (directory / f"{graph.name}.onnx").is_file():
            raise engine_error(directory, f"{graph.name}.onnx is missing")
    if not (directory / manifest.token_table.file).is_file():
        raise engine_error(directory, f"{manifest.token_table.file} is missing")
    if verify_files:
        for name, digest in manifest.files.items():
            path = directory / name
            try:
                intact = path.is_file() and sha256(path) == digest
            except OSError:
                intact = False
            if not intact:
                raise engine_error(directory, f"{name} does not match the hash in manifest.json (corrupt or edited)")
    return manifest


def _signature(specs) -> list[tuple]:
    return [(s.name, s.dtype, tuple(d if isinstance(d, int) else None for d in s.shape)) for s in specs]


def check_graph(manifest: EngineManifest, graph: str, session) -> None:
    """A loaded ONNX Runtime session against the graph's recorded inputs and outputs (names, dtypes, static
    dims, in order): a graph swapped for another, even with its hash edited to match, is recognised here."""
    recorded = manifest.io[graph]
    for kind, values in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        found = [(v.name, _ORT_DTYPES.get(v.type, v.type), tuple(d if isinstance(d, int) else None for d in v.shape))
                 for v in values]
        wanted = _signature(getattr(recorded, kind))
        for i in range(max(len(found), len(wanted))):
            f, w = (found[i] if i < len(found) else None), (wanted[i] if i < len(wanted) else None)
            if f != w:
                raise engine_error(manifest.directory, f"{graph}.onnx is not the {graph} graph of this engine (its "
                                   f"{kind}[{i}] is {_describe(f)} where the manifest records {_describe(w)})")


def _describe(entry) -> str:
    if entry is None:
        return "nothing"
    name, dtype, shape = entry
    return f"{name} {dtype} [{', '.join('?' if d is None else str(d) for d in shape)}]"


def token_table(manifest: EngineManifest):
    """The token table, memory-mapped read-only: one copy for embed and (tied) the LM head, paged in by the OS."""
    import numpy as np
    table = manifest.token_table
    path = Path(manifest.directory) / table.file
    dtype = {"float32": np.float32, "float16": np.float16}[table.dtype]
    expected = table.shape[0] * table.shape[1] * np.dtype(dtype).itemsize
    if path.stat().st_size != expected:
        raise engine_error(manifest.directory, f"{table.file} holds {path.stat().st_size} bytes, not the "
                           f"{expected} of a {table.shape[0]}x{table.shape[1]} {table.dtype} table")
    return np.memmap(path, dtype=dtype, mode="r", shape=tuple(table.shape))


def numpy_dtype(spec: TensorSpec):
    import numpy as np
    return {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
            "bool": np.bool_}[spec.dtype]
