"""TensorRT engines (.plan files) from an engine directory's ONNX graphs, through polygraphy. Their check
against ONNX Runtime needs the runtime, so it is a tool: tools/compare_trt.py.

TensorRT cannot be installed on iwp's CI machines, so everything that needs it imports it lazily and the
rest (backend choice, version checks, profiles) is plain Python that the tests exercise. The plugin library
(build/plugins/libiwp_trt_plugins.so, `make plugins TENSORRT_ROOT=...`) is loaded before parsing, so the
parser maps iwp::VisualTokenSelect to it.

Engines are strongly typed: the FP16 ONNX already carries its types. TensorRT 10.x needs the
STRONGLY_TYPED network flag for that; 11.x builds strongly typed networks by default and has no weak-typing
FP16 flag, so the flag is set only below 11.
"""
from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import onnx

PLUGIN_LIBRARY = "libiwp_trt_plugins.so"
BACKENDS = ("onnxruntime", "tensorrt", "auto")
REBUILD_PLUGIN = "rebuild it with `make plugins TENSORRT_ROOT=<your TensorRT>`"


def unavailable_reason() -> str | None:
    """Why TensorRT cannot be used here, or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed"
    except Exception as error:  # a broken install (missing libnvinfer) raises other errors on import
        return f"tensorrt does not import ({type(error).__name__}: {str(error).splitlines()[0]})"
    return None


def resolve_backend(backend: str, say=print) -> str:
    """BACKEND=auto picks TensorRT when present; an explicit tensorrt without TensorRT is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"BACKEND={backend} is not one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime":
        return backend
    reason = unavailable_reason()
    if reason is None:
        return "tensorrt"
    if backend == "auto":
        say(f"BACKEND=auto: TensorRT is not available ({reason}); building the ONNX Runtime engine only")
        return "onnxruntime"
    raise ValueError(f"BACKEND=tensorrt needs TensorRT, but {reason}; install TensorRT (JetPack 6 ships 10.3) "
                     "or use BACKEND=onnxruntime")


def plugin_path() -> Path:
    root = Path(__file__).resolve().parents[1]
    path = Path(os.environ.get("IWP_TRT_PLUGIN", root / "build" / "plugins" / PLUGIN_LIBRARY))
    if not path.exists():
        raise FileNotFoundError(f"the TensorRT plugin {path} is missing; {REBUILD_PLUGIN}")
    return path


def built_for(info: str) -> str:
    """The TensorRT version in the plugin library's iwpPluginInfo() string."""
    match = re.search(r"TensorRT (\d+\.\d+\.\d+)", info)
    if not match:
        raise ValueError(f"the plugin library describes itself as {info!r}; {REBUILD_PLUGIN}")
    return match.group(1)


def check_plugin_version(built: str, installed: str, path: Path | str = PLUGIN_LIBRARY) -> None:
    """A plugin built for another TensorRT major version is refused: the plugin ABI differs."""
    if built.split(".")[0] != installed.split(".")[0]:
        raise ValueError(f"{path} was built for TensorRT {built} but TensorRT {installed} is installed; "
                           f"{REBUILD_PLUGIN}")


def load_plugin(installed: str) -> tuple[Path, str]:
    """Load the plugin library into the process (static registration runs on load); returns its path and
    self-description. Call after `import tensorrt`, which loads libnvinfer."""
    path = plugin_path()
    major = installed.split(".")[0]
    try:  # make libnvinfer's symbols global for a plugin built against headers only
        ctypes.CDLL(f"libnvinfer.so.{major}", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        pass
    try:
        library = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        raise ValueError(f"{path} does not load ({error}); {REBUILD_PLUGIN}") from None
    library.iwpPluginInfo.restype = ctypes.c_char_p
    info = library.iwpPluginInfo().decode()
    check_plugin_version(built_for(info), installed, path)
    return path, info


def profile_shapes(model: onnx.ModelProto, max_prompt: int) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) for every input with a symbolic dimension: the export's static shapes leave only the
    embedding graph's token count free, from 1 (a decode step) to the prompt capacity."""
    shapes = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if None in dims:
            low = tuple(1 if d is None else d for d in dims)
            high = tuple(max_prompt if d is None else d for d in dims)
            shapes[value.name] = (low, high, high)
    return shapes


def strongly_typed_flag(version: str) -> bool:
    """Whether the STRONGLY_TYPED network flag must be set (10.x) or is the default (11.x and later)."""
    return int(version.split(".")[0]) < 11


def workspace_limit(trt, gigabytes: float | None) -> dict | None:
    """The builder's tactic workspace cap (`iwp engine --trt-workspace-gb`, EngineSpec.trt_workspace_gb, which
    validates it): Orin's CPU and GPU share one DRAM. None leaves TensorRT's default."""
    if gigabytes is None:
        return None
    return {trt.MemoryPoolType.WORKSPACE: int(gigabytes * (1 << 30))}


def build_plans(directory: Path, graphs, max_prompt: int, progress=print, workspace_gb: float | None = None) -> dict:
    """Build `<graph>.plan` beside each `<graph>.onnx` in `directory`; returns the manifest's tensorrt entry."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    path, info = load_plugin(trt.__version__)
    strongly = strongly_typed_flag(trt.__version__)
    pools = workspace_limit(trt, workspace_gb)
    plans = {}
    for name in graphs:
        source = directory / f"{name}.onnx"
        shapes = profile_shapes(onnx.load(source, load_external_data=False), max_prompt)
        profile = Profile()
        for input_name, (low, opt, high) in shapes.items():
            profile.add(input_name, min=low, opt=opt, max=high)
        progress(f"building TensorRT engine {name}.plan (TensorRT {trt.__version__}) ...")
        try:
            network = NetworkFromOnnxPath(str(source), strongly_typed=strongly or None)
            config = CreateConfig(profiles=[profile] if shapes else None, memory_pool_limits=pools)
            plan = EngineBytesFromNetwork(network, config)()
        except Exception as error:
            raise ValueError(f"TensorRT could not build {source.name} ({str(error).splitlines()[0]}); "
                               "the parser's or the plugin's reason is printed above") from None
        (directory / f"{name}.plan").write_bytes(plan)
        plans[name] = {"file": f"{name}.plan", "profile": {k: [list(s) for s in v] for k, v in shapes.items()}}
    return {"version": trt.__version__, "plugin": info, "plugin_library": str(path),
            "strongly_typed_flag": strongly, "plans": plans}


def check_plans(tensorrt, installed: str) -> None:
    """Plans are specific to a TensorRT version (and GPU): refuse ones from another version. `tensorrt` is
    the manifest's entry (EngineManifest.tensorrt; None when the engine has no plans)."""
    if tensorrt is None:
        raise ValueError("this engine has no TensorRT plans; rebuild it with `make engine BACKEND=tensorrt`")
    if tensorrt.version != installed:
        raise ValueError(f"the plans were built with TensorRT {tensorrt.version} but {installed} is installed; "
                         "rebuild with `make engine BACKEND=tensorrt`")
