"""TensorRT engines (.plan files) from an engine directory's ONNX graphs, through polygraphy. Their check
against ONNX Runtime needs the runtime, so it is a tool: tools/compare_trt.py.

TensorRT cannot be installed on iwp's CI machines, so everything that needs it imports it lazily and the
rest (backend choice, version checks, profiles) is plain Python that the tests exercise. The plugin library
(build/plugins/libiwp_trt_plugins.so, `make plugins TENSORRT_ROOT=...`) is loaded before parsing, so the
parser maps iwp::VisualTokenSelect to it.

A plan has one optimization profile per way its graph runs (`profiles`, recorded in the manifest): a segment's
PREFILL profile takes the prompt's real length, its DECODE profile one token; embed one range from a decode
token to the longest prompt; a select its stage's prompt; vision none, being static. The ranges follow from
the manifest's limits (`token_ranges`), the shapes from the graph's own inputs.

Engines are strongly typed: the FP16 ONNX already carries its types. TensorRT 10.x needs the
STRONGLY_TYPED network flag for that; 11.x builds strongly typed networks by default and has no weak-typing
FP16 flag, so the flag is set only below 11.
"""
from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from pathlib import Path

import onnx

from iwp.engine_format import KINDS, REBUILD, GraphInfo

PLUGIN_LIBRARY = "libiwp_trt_plugins.so"
BACKENDS = ("onnxruntime", "tensorrt", "auto")
REBUILD_PLUGIN = "rebuild it with `make plugins TENSORRT_ROOT=<your TensorRT>`"
TOKENS = "tokens"          # the one dynamic dimension of every graph (export/graphs.py name_dims)
PREFILL, DECODE = 0, 1     # a segment's optimization profiles: the prompt, then one decode token


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


AMPERE = (8, 0)   # TensorRT's int4 weight-only GEMMs: Ampere and later (Orin is sm_87)


def gpu_capability() -> tuple[int, int] | None:
    """The first CUDA device's compute capability through the CUDA runtime TensorRT links, or None when there
    is no CUDA runtime or device here."""
    for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"):
        try:
            cudart = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return None
    major, minor = ctypes.c_int(), ctypes.c_int()
    # cudaDevAttrComputeCapabilityMajor = 75, ...Minor = 76
    if cudart.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0) or cudart.cudaDeviceGetAttribute(
            ctypes.byref(minor), 76, 0):
        return None
    return major.value, minor.value


def check_quant(quant: str, capability: tuple[int, int] | None) -> None:
    """QUANT=int4 on a GPU older than Ampere: TensorRT refuses its int4 weights, so say so before any work."""
    if quant == "int4" and capability is not None and tuple(capability) < AMPERE:
        raise ValueError(f"QUANT=int4 needs an Ampere or later GPU (compute capability 8.0+; Orin is 8.7), and "
                         f"this one is {capability[0]}.{capability[1]}, where TensorRT refuses int4 weights; "
                         f"use QUANT=int8 or QUANT=none")


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


@dataclass(frozen=True)
class Limits:
    """What every graph's token count follows from: manifest.json's shapes.max_prompt, model.n_visual and
    method.tokens_per_layer (export/engine.py passes them as a dict)."""
    max_prompt: int
    n_visual: int
    tokens_per_layer: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "tokens_per_layer", tuple(self.tokens_per_layer))


def token_ranges(graph: GraphInfo, limits: Limits) -> tuple[tuple[int, int, int], ...]:
    """(min, opt, max) of T per optimization profile, in profile order. opt is the most a profile takes: the
    tactics TensorRT picks there serve every shorter prompt.

    embed:   1 (a decode token) to the longest prompt.
    vision:  none: every shape is static.
    segment: PREFILL, 1 to the prompt's tokens entering its first layer (the pruned ones gone); DECODE, one token.
    select:  the prompt's tokens entering its stage: the visual tokens still alive and at least one text token.
    """
    text = limits.max_prompt - limits.n_visual         # prompt tokens beside the image, at most
    if graph.kind == "embed":
        return ((1, limits.max_prompt, limits.max_prompt),)
    if graph.kind == "vision":
        return ()
    if graph.kind == "segment":
        most = text + limits.tokens_per_layer[graph.layers[0]]
        return ((1, most, most), (1, 1, 1))
    if graph.kind == "select":
        alive = limits.tokens_per_layer[graph.layer - 1] if graph.layer else limits.n_visual
        return ((alive + 1, text + alive, text + alive),)
    raise ValueError(f"graph {graph.name} is of kind {graph.kind!r}, not one of {', '.join(KINDS)}; {REBUILD}")


def profiles(model: onnx.ModelProto, graph: GraphInfo, limits: Limits) -> tuple[dict[str, tuple], ...]:
    """Per optimization profile, (min, opt, max) of every input of `model` with a dynamic dimension, T put for
    the one dimension the exporter names `tokens`. Static inputs (the caches at their capacity, the token table,
    the query indices) take no range; a graph with none has no profile."""
    dynamic = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]
        for dim in dims:
            if isinstance(dim, str) and dim != TOKENS:
                raise ValueError(f"{graph.name}.onnx input {value.name} has dimension {dim!r}, not {TOKENS!r} (a graph "
                                 f"from another exporter); {REBUILD}")
        if TOKENS in dims:
            dynamic[value.name] = dims
    ranges = token_ranges(graph, limits)
    if dynamic and not ranges:
        raise ValueError(f"{graph.name}.onnx has dynamic inputs ({', '.join(dynamic)}) but a {graph.kind} graph is "
                         f"static; {REBUILD}")
    if not dynamic:
        return ()
    return tuple({name: tuple(tuple(t if d == TOKENS else d for d in dims) for t in span)
                  for name, dims in dynamic.items()} for span in ranges)


def plan_profiles(directory: Path, graph: GraphInfo, limits: Limits) -> tuple[dict[str, tuple], ...]:
    """`profiles` of `directory/<graph>.onnx`, read without its weights."""
    return profiles(onnx.load(directory / f"{graph.name}.onnx", load_external_data=False), graph, limits)


def polygraphy_profiles(shapes: tuple[dict[str, tuple], ...]) -> list:
    """The builder's profiles (polygraphy's Profile needs no TensorRT to be made)."""
    from polygraphy.backend.trt import Profile
    out = []
    for profile in shapes:
        made = Profile()
        for name, (low, opt, high) in profile.items():
            made.add(name, min=low, opt=opt, max=high)
        out.append(made)
    return out


def strongly_typed_flag(version: str) -> bool:
    """Whether the STRONGLY_TYPED network flag must be set (10.x) or is the default (11.x and later)."""
    return int(version.split(".")[0]) < 11


def workspace_limit(trt, gigabytes: float | None) -> dict | None:
    """The builder's tactic workspace cap (`iwp engine --trt-workspace-gb`, EngineSpec.trt_workspace_gb, which
    validates it): Orin's CPU and GPU share one DRAM. None leaves TensorRT's default."""
    if gigabytes is None:
        return None
    return {trt.MemoryPoolType.WORKSPACE: int(gigabytes * (1 << 30))}


def build_plans(directory: Path, graphs, limits, progress=print, workspace_gb: float | None = None) -> dict:
    """Build `<graph>.plan` beside each `<graph>.onnx` in `directory` (`graphs`: the manifest's GraphInfo list,
    `limits`: Limits or its fields as a dict); returns the manifest's tensorrt entry. Each plan holds its own
    graph's weights only; the token table stays an input (token_table.bin), so it is stored once."""
    reason = unavailable_reason()
    if reason is not None:
        raise ValueError(f"BACKEND=tensorrt needs TensorRT, but {reason}; install TensorRT (JetPack 6 ships 10.3) "
                         "or use BACKEND=onnxruntime")
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath

    limits = limits if isinstance(limits, Limits) else Limits(**limits)
    path, info = load_plugin(trt.__version__)
    strongly = strongly_typed_flag(trt.__version__)
    pools = workspace_limit(trt, workspace_gb)
    plans = {}
    for graph in graphs:
        source = directory / f"{graph.name}.onnx"
        shapes = plan_profiles(directory, graph, limits)
        progress(f"building TensorRT engine {graph.name}.plan ({len(shapes)} profiles, TensorRT {trt.__version__}) ...")
        try:
            network = NetworkFromOnnxPath(str(source), strongly_typed=strongly or None)
            config = CreateConfig(profiles=polygraphy_profiles(shapes) or None, memory_pool_limits=pools)
            plan = EngineBytesFromNetwork(network, config)()
        except Exception as error:  # polygraphy and TensorRT raise many types; the parser's log says why
            raise ValueError(f"TensorRT could not build {source.name} ({str(error).splitlines()[0]}); "
                             "the parser's or the plugin's reason is printed above") from None
        (directory / f"{graph.name}.plan").write_bytes(plan)
        plans[graph.name] = {"file": f"{graph.name}.plan", "profiles": plan_entry(shapes)}
    return {"version": trt.__version__, "plugin": info, "plugin_library": str(path),
            "strongly_typed_flag": strongly, "plans": plans}


def plan_entry(shapes: tuple[dict[str, tuple], ...]) -> list[dict]:
    """A plan's profiles as manifest.json records them (engine_format.Plan.profiles)."""
    return [{name: [list(s) for s in span] for name, span in profile.items()} for profile in shapes]


def check_plans(tensorrt, installed: str) -> None:
    """Plans are specific to a TensorRT version (and GPU): refuse ones from another version. `tensorrt` is
    the manifest's entry (EngineManifest.tensorrt; None when the engine has no plans)."""
    if tensorrt is None:
        raise ValueError("this engine has no TensorRT plans; rebuild it with `make engine BACKEND=tensorrt`")
    if tensorrt.version != installed:
        raise ValueError(f"the plans were built with TensorRT {tensorrt.version} but {installed} is installed; "
                         "rebuild with `make engine BACKEND=tensorrt`")
