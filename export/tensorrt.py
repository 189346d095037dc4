"""TensorRT engines (.plan files) from an engine directory's ONNX graphs, through polygraphy, and their check
against ONNX Runtime.

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


def workspace_limit(trt) -> dict | None:
    """IWP_TRT_WORKSPACE_GB caps the builder's tactic workspace (Orin's CPU and GPU share one DRAM)."""
    value = os.environ.get("IWP_TRT_WORKSPACE_GB")
    if not value:
        return None
    try:
        gigabytes = float(value)
        assert gigabytes > 0
    except (ValueError, AssertionError):
        raise ValueError(f"IWP_TRT_WORKSPACE_GB={value} must be a positive number of GiB") from None
    return {trt.MemoryPoolType.WORKSPACE: int(gigabytes * (1 << 30))}


def build_plans(directory: Path, graphs, max_prompt: int, progress=print) -> dict:
    """Build `<graph>.plan` beside each `<graph>.onnx` in `directory`; returns the manifest's tensorrt entry."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    path, info = load_plugin(trt.__version__)
    strongly = strongly_typed_flag(trt.__version__)
    pools = workspace_limit(trt)
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


def check_plans(manifest: dict, installed: str) -> None:
    """Plans are specific to a TensorRT version (and GPU): refuse ones from another version."""
    entry = manifest.get("tensorrt")
    if not entry:
        raise ValueError("this engine has no TensorRT plans; rebuild it with `make engine BACKEND=tensorrt`")
    if entry["version"] != installed:
        raise ValueError(f"the plans were built with TensorRT {entry['version']} but {installed} is installed; "
                         "rebuild with `make engine BACKEND=tensorrt`")


class _Recorder:
    """An ONNX Runtime session that keeps the first feeds each graph sees."""

    def __init__(self, session, name: str, sink: dict):
        self.session, self.name, self.sink = session, name, sink

    def run(self, outputs, feeds):
        self.sink.setdefault(self.name, dict(feeds))
        return self.session.run(outputs, feeds)

    def get_inputs(self):
        return self.session.get_inputs()


def compare(directory: Path, image=None, prompt: str = "What is in the image?", atol: float | None = None,
            progress=print) -> dict[str, bool]:
    """Each TensorRT plan against ONNX Runtime on the same real inputs (recorded from one generation):
    integer outputs (kept indices) exactly, float outputs within atol (1e-3 fp32, 2e-2 fp16)."""
    from collections import OrderedDict

    import tensorrt as trt
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    from iwp.demo import demo_image
    from iwp.runtime.pipeline import Pipeline

    pipeline = Pipeline.from_engine(Path(directory))
    manifest = pipeline.manifest
    check_plans(manifest, trt.__version__)
    load_plugin(trt.__version__)
    feeds: dict = {}
    sessions = pipeline.sessions
    pipeline.sessions = {name: _Recorder(s, name, feeds) for name, s in sessions.items()}
    image = image or demo_image(0, tuple(manifest["model"]["resolution"][::-1]))
    pipeline.generate_ids(image, prompt, max_new_tokens=min(2, pipeline.max_new_tokens))
    atol = atol if atol is not None else (2e-2 if manifest["dtype"] == "fp16" else 1e-3)
    verdicts = {}
    for name, entry in manifest["tensorrt"]["plans"].items():
        plan = (Path(directory) / entry["file"]).read_bytes()
        runners = [TrtRunner(EngineFromBytes(plan), name=f"tensorrt-{name}"),
                   OnnxrtRunner(lambda s=sessions[name]: s, name=f"onnxruntime-{name}")]
        results = Comparator.run(runners, data_loader=[OrderedDict(feeds[name])])
        integer = {o.name: 0.0 for o in sessions[name].get_outputs() if "int" in o.type}
        check = CompareFunc.simple(atol={"": atol, **integer}, rtol={"": 0.0, **integer}, check_shapes=True)
        verdicts[name] = bool(Comparator.compare_accuracy(results, compare_func=check))
        progress(f"{name:8s} {'match' if verdicts[name] else 'MISMATCH'}")
    return verdicts
