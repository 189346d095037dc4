"""The CUDA kernels (kernel.cu) from Python, through ctypes: the GPU tests and `iwp bench-cuda` call them on
torch CUDA tensors, exactly as the TensorRT plugin calls them inside an engine.

`make plugins` builds the library into build/plugins. Without a GPU the library still loads (its host side
validates parameters and sizes workspaces), which the CPU tests use.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from . import contract
from .view import LayerView

LIBRARY_NAME = "libiwp_vts_kernels.so"
ABI_VERSION = contract.ABI_VERSION  # params.h's IWP_VTS_ABI_VERSION
DTYPES = {getattr(torch, name): i for i, name in enumerate(contract.ACTIVATION_DTYPES)}
_CTYPES = {"int32": ctypes.c_int32, "int64": ctypes.c_int64, "double": ctypes.c_double}


class Params(ctypes.Structure):
    """Mirror of params.h's IwpVtsParams, from contract.PARAMS (its size is checked against the library's on load)."""
    _fields_ = [(name, _CTYPES[ctype]) for name, ctype, _ in contract.PARAMS]


def default_library_path() -> Path:
    root = Path(__file__).resolve().parents[2]
    return Path(os.environ.get("IWP_PLUGIN_BUILD", root / "build" / "plugins")) / LIBRARY_NAME


_library = None


def library(path: Path | None = None) -> ctypes.CDLL:
    """Load the kernels' library once; a missing or mismatched build fails with what to run."""
    global _library
    if _library is not None and path is None:
        return _library
    path = Path(path or default_library_path())
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; build the CUDA kernels with `make plugins` (needs nvcc)")
    lib = ctypes.CDLL(str(path))
    lib.iwpVtsAbiVersion.restype = ctypes.c_int32
    lib.iwpVtsParamsSize.restype = ctypes.c_size_t
    lib.iwpVtsMethodId.argtypes = [ctypes.c_char_p]
    lib.iwpVtsMethodId.restype = ctypes.c_int32
    lib.iwpVtsValidate.argtypes = [ctypes.POINTER(Params), ctypes.c_char_p, ctypes.c_size_t]
    lib.iwpVtsValidate.restype = ctypes.c_int32
    lib.iwpVtsWorkspaceSize.argtypes = [ctypes.POINTER(Params)]
    lib.iwpVtsWorkspaceSize.restype = ctypes.c_size_t
    lib.iwpVtsEnqueue.argtypes = [ctypes.POINTER(Params), ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_void_p]
    lib.iwpVtsEnqueue.restype = ctypes.c_int32
    if lib.iwpVtsAbiVersion() != ABI_VERSION or lib.iwpVtsParamsSize() != ctypes.sizeof(Params):
        raise RuntimeError(f"{path} was built from other sources (ABI {lib.iwpVtsAbiVersion()}, expected "
                           f"{ABI_VERSION}); rebuild it with `make plugins`")
    if path == default_library_path():
        _library = lib
    return lib


def params(method, view: LayerView, keep: int) -> Params:
    """The kernel parameters for `method` on `view`: the same attributes the ONNX node carries."""
    lib = library()
    attrs = contract.complete_attributes(contract.node_attributes(method, keep, view.layer, view.stage,
                                                                  view.n_stages))
    method_id = lib.iwpVtsMethodId(method.name.encode())
    if method_id < 0:
        raise ValueError(f"the CUDA kernels have no method {method.name!r}")
    b, t, width = view.hidden.shape
    return Params(method=method_id, dtype=DTYPES.get(view.q.dtype, -1), batch=b, tokens=t, width=width,
                  queryHeads=view.q.shape[1], kvHeads=view.k.shape[1], headDim=view.q.shape[3],
                  visual=view.n_visual, queries=view.query_idx.shape[1], keep=keep, stage=view.stage,
                  nStages=view.n_stages, lam=attrs["lam"], chunk=attrs["chunk"], growth=attrs["growth"],
                  queriesLast=int(attrs["queries"] == "last"), rebalance=int(attrs["rebalance"]),
                  pivots=attrs["pivots"], seed=attrs["seed"], alpha=attrs["alpha"],
                  attentionFirst=attrs["attention_first"], attentionLast=attrs["attention_last"],
                  seedFraction=attrs["seed_fraction"])


def check(p: Params) -> None:
    message = ctypes.create_string_buffer(512)
    if library().iwpVtsValidate(ctypes.byref(p), message, len(message)):
        raise ValueError(f"VisualTokenSelect: {message.value.decode()}")


def workspace_size(p: Params) -> int:
    check(p)
    return int(library().iwpVtsWorkspaceSize(ctypes.byref(p)))


def device_inputs(view: LayerView, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """The node's 13 inputs on the GPU, in contract order, with the node's types (activations in `dtype`)."""
    dtype = dtype or view.q.dtype
    ttv = view.ttv if view.ttv is not None else torch.zeros(view.hidden.shape[0], view.n_visual)
    typed = {"key_mask": torch.int32, "query_mask": torch.int32, "visual_start": torch.int64,
             "query_idx": torch.int64, "last_idx": torch.int64, "visual_xy": torch.float32, "ttv": torch.float32}
    values = dict(hidden=view.hidden, q=view.q, k=view.k, q_rot=view.q_rot, k_rot=view.k_rot, v=view.v,
                  key_mask=view.key_mask, visual_start=view.visual_start, query_idx=view.query_idx,
                  query_mask=view.query_mask, last_idx=view.last_idx, visual_xy=view.visual_xy, ttv=ttv)
    return [values[name].to("cuda", typed.get(name, dtype)).contiguous() for name in contract.INPUTS]


class Selector:
    """One prepared selection (parameters, inputs, workspace, output): `run()` only enqueues, so it can be
    timed or captured in a CUDA graph."""

    def __init__(self, method, view: LayerView, keep: int, dtype: torch.dtype | None = None):
        self.inputs = device_inputs(view, dtype)
        self.params = params(method, view, keep)
        self.params.dtype = DTYPES[self.inputs[0].dtype]
        self.workspace = torch.empty(max(workspace_size(self.params), 1), dtype=torch.uint8, device="cuda")
        self.out = torch.empty(view.hidden.shape[0], keep, dtype=torch.int64, device="cuda")
        self._pointers = (ctypes.c_void_p * len(self.inputs))(*[t.data_ptr() for t in self.inputs])

    def run(self) -> torch.Tensor:
        status = library().iwpVtsEnqueue(ctypes.byref(self.params), self._pointers, self.out.data_ptr(),
                                         self.workspace.data_ptr(), torch.cuda.current_stream().cuda_stream)
        if status != 0:
            raise RuntimeError(f"VisualTokenSelect CUDA launch failed with status {status}")
        return self.out


def select(method, view: LayerView, keep: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, keep] int64 indices, ascending, computed by the CUDA kernels (returned on the CPU)."""
    out = Selector(method, view, keep, dtype).run()
    torch.cuda.synchronize()
    return out.cpu()
