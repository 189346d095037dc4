"""The CUDA kernels (kernel.cu) from Python, through ctypes: the GPU tests and `iwp bench-cuda` call them on
torch tensors, exactly as the TensorRT plugin calls them inside an engine.

Two builds of the same sources load here:
- the CUDA library (`make plugins`, build/plugins): device memory, the current torch CUDA stream. Without a GPU
  it still loads (its host side validates parameters and sizes workspaces), which the CPU tests use;
- the HIP-CPU library (`make kernels-cpu`, build/kernels-cpu): the same kernels executed on the host's threads
  through HIP-CPU, where device memory is host memory, so inputs, workspace and output are CPU tensors, and
  `run()` waits for the emulated stream. The parity tests run against it where no GPU is.
A loaded library is a `Kernels`; every function takes one (default: the CUDA library), so there is one code path.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import contract
from .view import LayerView

LIBRARY_NAME = "libiwp_vts_kernels.so"
CPU_LIBRARY_NAME = "libiwp_vts_kernels_cpu.so"
ABI_VERSION = contract.ABI_VERSION  # params.h's IWP_VTS_ABI_VERSION
DTYPES = {getattr(torch, name): i for i, name in enumerate(contract.ACTIVATION_DTYPES)}
_CTYPES = {"int32": ctypes.c_int32, "int64": ctypes.c_int64, "double": ctypes.c_double}
ROOT = Path(__file__).resolve().parents[2]


class Params(ctypes.Structure):
    """Mirror of params.h's IwpVtsParams, from contract.PARAMS (its size is checked against the library's on load)."""
    _fields_ = [(name, _CTYPES[ctype]) for name, ctype, _ in contract.PARAMS]


def default_library_path() -> Path:
    return Path(os.environ.get("IWP_PLUGIN_BUILD", ROOT / "build" / "plugins")) / LIBRARY_NAME


def cpu_library_path() -> Path:
    return ROOT / "build" / "kernels-cpu" / CPU_LIBRARY_NAME


@dataclass(frozen=True)
class Kernels:
    """One loaded build of the kernels: `device` is where its inputs live ("cuda", or "cpu" under HIP-CPU)."""
    lib: ctypes.CDLL
    device: str

    def __getattr__(self, name):   # the C interface, as on the CDLL
        return getattr(self.lib, name)


_loaded: dict[Path, Kernels] = {}


def _load(path: Path, build: str) -> Kernels:
    if path in _loaded:
        return _loaded[path]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; build it with `{build}`")
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
                           f"{ABI_VERSION}); rebuild it with `{build}`")
    host = hasattr(lib, "iwpVtsCpuSynchronize")   # only the HIP-CPU build exports it
    if host:
        lib.iwpVtsCpuSynchronize.restype = ctypes.c_int32
    _loaded[path] = Kernels(lib, "cpu" if host else "cuda")
    return _loaded[path]


def library(path: Path | None = None) -> Kernels:
    """The CUDA build, loaded once; a missing or mismatched build fails with what to run."""
    return _load(Path(path or default_library_path()), "make plugins (needs nvcc)")


def cpu_library(path: Path | None = None) -> Kernels:
    """The HIP-CPU build of the same kernels, loaded once."""
    return _load(Path(path or cpu_library_path()), "make kernels-cpu HIP_CPU_ROOT=<a HIP-CPU copy>")


def params(method, view: LayerView, keep: int, kernels: Kernels | None = None) -> Params:
    """The kernel parameters for `method` on `view`: the same attributes the ONNX node carries."""
    lib = kernels or library()
    attrs = contract.complete_attributes(contract.node_attributes(method, keep, view.layer, view.stage,
                                                                  view.n_stages))
    if lib.iwpVtsMethodId(method.name.encode()) != contract.METHOD_IDS.get(method.name, -1):
        raise ValueError(f"the kernel library's id for {method.name!r} is not the contract's; rebuild it (make plugins)")
    b, t, width = view.hidden.shape
    shapes = {"dtype": DTYPES.get(view.q.dtype, -1), "batch": b, "tokens": t, "width": width,
              "queryHeads": view.q.shape[1], "kvHeads": view.k.shape[1], "headDim": view.q.shape[3],
              "visual": view.n_visual, "queries": view.query_idx.shape[1]}
    return Params(**{field: shapes[field] if source is None else _param(source, attrs[source])
                     for field, _, source in contract.PARAMS})


def _param(attribute: str, value):
    """An attribute as IwpVtsParams keeps it: a closed-set string as its position (another method's neutral ""
    as 0, which that method never reads), a bool as 0/1."""
    if attribute in contract.CHOICES:
        return contract.CHOICES[attribute].index(value) if value else 0
    return int(value) if isinstance(value, bool) else value


def check(p: Params, kernels: Kernels | None = None) -> None:
    message = ctypes.create_string_buffer(512)
    if (kernels or library()).iwpVtsValidate(ctypes.byref(p), message, len(message)):
        raise ValueError(f"VisualTokenSelect: {message.value.decode()}")


def workspace_size(p: Params, kernels: Kernels | None = None) -> int:
    check(p, kernels)
    return int((kernels or library()).iwpVtsWorkspaceSize(ctypes.byref(p)))


def device_inputs(view: LayerView, dtype: torch.dtype | None = None, device: str = "cuda") -> list[torch.Tensor]:
    """The node's 13 inputs on `device`, in contract order, with the node's types (activations in `dtype`)."""
    dtype = dtype or view.q.dtype
    ttv = view.ttv if view.ttv is not None else torch.zeros(view.hidden.shape[0], view.n_visual)
    typed = {"key_mask": torch.int32, "query_mask": torch.int32, "visual_start": torch.int64,
             "query_idx": torch.int64, "last_idx": torch.int64, "visual_xy": torch.float32, "ttv": torch.float32}
    values = dict(hidden=view.hidden, q=view.q, k=view.k, q_rot=view.q_rot, k_rot=view.k_rot, v=view.v,
                  key_mask=view.key_mask, visual_start=view.visual_start, query_idx=view.query_idx,
                  query_mask=view.query_mask, last_idx=view.last_idx, visual_xy=view.visual_xy, ttv=ttv)
    return [values[name].to(device, typed.get(name, dtype)).contiguous() for name in contract.INPUTS]


class Selector:
    """One prepared selection (parameters, inputs, workspace, output): `run()` only enqueues on the CUDA
    build, so it can be timed or captured in a CUDA graph; on the HIP-CPU build it also waits."""

    def __init__(self, method, view: LayerView, keep: int, dtype: torch.dtype | None = None,
                 kernels: Kernels | None = None):
        self.kernels = kernels or library()
        device = self.kernels.device
        self.inputs = device_inputs(view, dtype, device)
        self.params = params(method, view, keep, self.kernels)
        self.params.dtype = DTYPES[self.inputs[0].dtype]
        # 256-byte aligned, as iwpVtsEnqueue requires: CUDA allocations are; a host tensor is offset to it
        size = max(workspace_size(self.params, self.kernels), 1)
        self._workspace = torch.empty(size + 256, dtype=torch.uint8, device=device)
        self.workspace_ptr = (self._workspace.data_ptr() + 255) // 256 * 256
        self.out = torch.empty(view.hidden.shape[0], keep, dtype=torch.int64, device=device)
        self._pointers = (ctypes.c_void_p * len(self.inputs))(*[t.data_ptr() for t in self.inputs])

    def run(self) -> torch.Tensor:
        stream = torch.cuda.current_stream().cuda_stream if self.kernels.device == "cuda" else None
        status = self.kernels.iwpVtsEnqueue(ctypes.byref(self.params), self._pointers, self.out.data_ptr(),
                                            self.workspace_ptr, stream)
        if status == 0 and self.kernels.device == "cpu":
            status = self.kernels.iwpVtsCpuSynchronize()
        if status != 0:
            raise RuntimeError(f"VisualTokenSelect kernel launch failed with status {status}")
        return self.out


def select(method, view: LayerView, keep: int, dtype: torch.dtype | None = None,
           kernels: Kernels | None = None) -> torch.Tensor:
    """[B, keep] int64 indices, ascending, computed by the kernels (returned on the CPU)."""
    selector = Selector(method, view, keep, dtype, kernels)
    out = selector.run()
    if selector.kernels.device == "cuda":
        torch.cuda.synchronize()
    return out.cpu()
