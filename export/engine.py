"""Build an engine directory: its ONNX graphs (export/graphs.py), the token table, the processor files and
manifest.json.

    engines/<model>-<method>[-b<budget>]-<grid>[-native][-fp16][-int8|-int4][-trt]-<settings hash>/
        embed.onnx vision.onnx segment.0.onnx [select.0.onnx segment.1.onnx ...]
                          (QUANT=int8|int4: the segments' linear weights quantized, export/quantize.py)
        token_table.bin   (the embedding table, stored once: embed's input and, when tied, the LM head's)
        *.plan            (BACKEND=tensorrt: one TensorRT engine per graph, version in the manifest)
        tokenizer files, preprocessor_config.json, chat_template.jinja, processor_config.json
        manifest.json   (the resolved config and the io section; iwp/engine_format.py types it, and the
                         runtime reads everything from here)

The model is a skeleton (meta parameters) and each weight is read from its source only as its graph is
written (export/lazy.py), so the export's memory does not grow with the model.

Writes are atomic: the directory is built under a temporary name beside the target and renamed into place
last, so an interrupted export leaves nothing that looks valid. A rebuild with the same inputs (same
`inputs_hash`, intact files) is skipped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import onnx
import torch

from iwp.atomic import staging_directory
from iwp.engine_format import FORMAT, EngineManifest, GraphIO, TensorSpec, sha256

from .spec import DTYPE_NAMES, EngineSpec

# fp16 graphs are fp16 in the file (TensorRT 11 builds only strongly typed networks); selection scores in fp32
DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16)))   # the spec's names, as torch dtypes


def engine_name(spec: EngineSpec, grid_name: str) -> str:
    """<model>-<method>[-b<budget>]-<grid>[-native][-fp16][-int4][-trt]-<settings>: the readable part, then 8 hex digits
    over every build input it leaves out, so two engines that differ never share a directory."""
    budget = f"-b{spec.budget}" if spec.method != "none" else ""
    native = "-native" if spec.select == "native" and spec.method != "none" else ""
    dtype = f"-{spec.dtype}" if spec.dtype != "fp32" else ""
    quant = f"-{spec.quant}" if spec.quant != "none" else ""
    trt = "-trt" if spec.backend == "tensorrt" else ""
    return f"{spec.model}-{spec.method}{budget}-{grid_name}{native}{dtype}{quant}{trt}-{settings_hash(spec)}"


def settings_hash(spec: EngineSpec) -> str:
    """The build inputs the readable name leaves out: the method's resolved options (defaults included, so a
    change of default is a new name), the capacities, random weights, the weights' layout, the TensorRT
    workspace. A checkpoint's location is not an input: the same weights anywhere give the same engine."""
    from iwp.plugins.visual_token_select import make_method
    config = dataclasses.asdict(make_method(spec.method, **dict(spec.options)).config) if spec.method != "none" else {}
    workspace = float(spec.trt_workspace_gb) if spec.backend == "tensorrt" and spec.trt_workspace_gb else None
    key = {"config": config, "max_text_tokens": spec.max_text_tokens, "max_new_tokens": spec.max_new_tokens,
           "random_weights": spec.random_weights, "external_data": spec.external_data,
           "trt_workspace_gb": workspace}
    if spec.quant != "none":   # only then: an unquantized engine keeps the name it had before QUANT existed
        key["quant"] = spec.quant
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:8]


def _tool_versions() -> dict:
    import onnxruntime
    import transformers
    from importlib.metadata import version
    return {"iwp": version("iwp"), "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def inputs_hash(spec: EngineSpec, source: str) -> str:
    """What the engine is a function of: the spec, the weights' identity and iwp's version."""
    from importlib.metadata import version
    fields = dataclasses.asdict(spec)
    if spec.quant == "none":   # an engine built before QUANT existed is still current
        del fields["quant"]
    key = json.dumps({"spec": fields, "source": source, "iwp": version("iwp"),
                      "format": FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()


def _weights_identity(loaded) -> str:
    if loaded.source.startswith(("seed:", "random:")):
        return loaded.source
    # A checkpoint directory: its config and weights by content where that is cheap (a retrained model has the
    # same sizes), by size and modification time for multi-GB checkpoints.
    path = Path(loaded.source)
    parts = [(p.name, sha256(p) if p.stat().st_size < 256 << 20 else [p.stat().st_size, p.stat().st_mtime_ns])
             for p in sorted(path.glob("*.safetensors*")) + [path / "config.json"]]
    return json.dumps([loaded.source, parts])


def is_current(directory: Path, expected_hash: str) -> bool:
    """An existing engine that was built from the same inputs and whose files are intact. Anything else (a
    damaged, foreign or older-format directory) is rebuilt."""
    if not directory.is_dir():
        return False
    try:
        manifest = EngineManifest.read(directory)
    except ValueError:
        return False
    if manifest.inputs_hash != expected_hash:
        return False
    return all((directory / name).is_file() and sha256(directory / name) == digest
               for name, digest in manifest.files.items())


_DTYPES = {"FLOAT": "float32", "FLOAT16": "float16", "BFLOAT16": "bfloat16", "INT64": "int64", "INT32": "int32",
           "BOOL": "bool"}


def graph_io(model, named: tuple[list, list]) -> GraphIO:
    """The io entry of an exported graph (an onnx_ir model): its own names, shapes (symbolic dims by name) and
    dtypes, with the roles export/graphs.py gives each name."""
    def specs(values, tensors) -> tuple[TensorSpec, ...]:
        values = list(values)
        assert [v.name for v in values] == [t[0] for t in tensors], ([v.name for v in values], tensors)
        out = []
        for value, (name, role, layer, stage) in zip(values, tensors):
            shape = tuple(d if isinstance(d, int) else d.value for d in value.shape)
            out.append(TensorSpec(name, shape, _DTYPES[value.dtype.name], role, layer, stage))
        return tuple(out)
    return GraphIO(specs(model.graph.inputs, named[0]), specs(model.graph.outputs, named[1]))


def on_meta(batch):
    """The example batch on the meta device, as the skeleton is, but for the visual tokens' grid coordinates:
    a real constant of the select graphs."""
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to("meta") for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)
                                         and f.name != "visual_xy"})


def build(spec: EngineSpec, out_root: Path = Path("engines"), progress=print) -> Path:
    from iwp.flops import model_dims, prefill_flops
    from iwp.inputs import fit_capacity, make_batch
    from iwp.model import PrunedLlavaOnevision
    from iwp.demo import demo_image
    from iwp.plugins.visual_token_select import make_method
    from iwp.plugins.visual_token_select.contract import node_attributes
    from iwp.processor import save_processor
    from iwp.zoo import load

    from .graphs import Decoder, export_program, graph_jobs, names, save_ir
    from .lazy import LazyWeights, buffers_to_meta
    from .quantize import quantize_matmuls

    started = time.perf_counter()
    if spec.backend == "tensorrt":
        from .tensorrt import check_quant, gpu_capability
        check_quant(spec.quant, gpu_capability())
    # a skeleton: no weight is read until the graph that holds it is written (export/lazy.py)
    loaded = load(spec.model, grid=spec.grid, model_path=spec.model_path, random_weights=spec.random_weights,
                  dtype=DTYPES[spec.dtype], lazy=True)
    spec = dataclasses.replace(spec, budget=spec.budget or loaded.spec.budget)
    if spec.method != "none":   # options as the config holds them (lam=1 is lam=1.0), so the hash is of the values
        config = make_method(spec.method, **dict(spec.options)).config
        spec = dataclasses.replace(spec, options=tuple(sorted((k, getattr(config, k)) for k, _ in spec.options)))
    target = out_root / engine_name(spec, loaded.spec.grid_name)
    expected = inputs_hash(spec, _weights_identity(loaded))
    if is_current(target, expected):
        progress(f"engine {target} is up to date (same inputs, intact files); reusing it")
        return target

    need = estimated_bytes(loaded.model, spec.quant)
    check_disk(out_root, need)   # before any work: a 7B export that fills the disk halfway helps no one
    weights = LazyWeights(loaded.model, loaded.weights, buffers_to_meta(loaded.model))
    model = PrunedLlavaOnevision(loaded.model)
    n = loaded.n_visual
    budget = spec.budget
    method = None if spec.method == "none" else make_method(spec.method, **dict(spec.options))
    plan = method.plan(model.n_layers, n, budget) if method else None
    tokens_per_layer = plan.tokens_per_layer if plan else (n,) * model.n_layers
    decoder = Decoder.of(model, method, plan, n)
    graphs = decoder.graphs()
    tokenizer = loaded.processor.tokenizer
    length = n + spec.max_text_tokens
    batch = on_meta(fit_capacity(make_batch(loaded, demo_image(0, loaded.resolution[::-1]), "Describe the image."),
                                 length))
    cache_len = [length - n + k + spec.max_new_tokens for k in tokens_per_layer]

    with staging_directory(target) as staging, out_of_disk(out_root, need):   # removed on failure
        table = loaded.weights.tensor(weights.hf_names[id(model.embed_tokens.weight)])
        table.contiguous().numpy().tofile(staging / TABLE_FILE)
        table_shape, table_dtype = list(table.shape), _DTYPE_NAMES[table.dtype]
        del table                 # 1 GB at 7B: not held while the graphs are written
        io, stored = {}, {}
        for graph, module, args, dynamic in graph_jobs(model, decoder, method, loaded, batch, length, cache_len,
                                                       native=spec.select == "native"):
            name = graph["name"]
            progress(f"exporting {name} graph ...")
            named = decoder.tensors(graph)
            program = export_program(module, args, names(named[0]), names(named[1]), dynamic, weights=weights)
            io[name] = graph_io(program.model, named)
            if spec.quant != "none" and graph["kind"] == "segment":   # selects keep their float q/k/v copy
                progress(f"quantizing {name} to {spec.quant} as it is written ...")
                quantize_matmuls(program.model, spec.quant)
            stored[name] = save_ir(program.model, staging / f"{name}.onnx")
            del program
        save_processor(loaded.processor, staging)
        peak = {"export": peak_rss_bytes()}
        tensorrt = None
        if spec.backend == "tensorrt":
            from iwp.engine_format import GraphInfo
            from .tensorrt import build_plans
            infos = [GraphInfo(g["name"], g["kind"], tuple(g["layers"]) if "layers" in g else None, g.get("stage"),
                               g.get("layer")) for g in graphs]
            tensorrt = build_plans(staging, infos, {"max_prompt": length, "n_visual": n,
                                                    "tokens_per_layer": list(tokens_per_layer)},
                                   progress, workspace_gb=spec.trt_workspace_gb)
            peak["tensorrt"] = peak_rss_bytes()
        d, m = model_dims(loaded.model)
        full = prefill_flops((n,) * model.n_layers, d, m)
        cfg = loaded.model.config.text_config
        manifest = {
            "format": FORMAT,
            "inputs_hash": expected,
            "model": {"name": loaded.spec.name, "hf_id": loaded.spec.hf_id, "source": loaded.source,
                      "grid": loaded.spec.grid_name, "resolution": list(loaded.resolution), "n_visual": n,
                      "n_layers": model.n_layers, "hidden_size": d, "n_kv_heads": model.n_kv,
                      "head_dim": model.head_dim, "vocab_size": cfg.vocab_size},
            "method": {"name": spec.method, "budget": budget if method else n,
                       "config": dataclasses.asdict(method.config) if method else {},
                       "stages": [list(s) for s in plan.stages] if plan else [],
                       "nodes": [node_attributes(method, k, layer, i, len(plan.stages))
                                 for i, (layer, k) in enumerate(plan.stages)] if plan else [],
                       "tokens_per_layer": list(tokens_per_layer), "options": dict(spec.options)},
            "flops": {"formula": "4nd^2 + 2n^2d + 3ndm per layer over visual tokens", "unpruned": full,
                      "pruned": prefill_flops(tokens_per_layer, d, m),
                      "ratio": prefill_flops(tokens_per_layer, d, m) / full},
            "shapes": {"batch": 1, "max_prompt": length, "max_text_tokens": spec.max_text_tokens,
                       "max_new_tokens": spec.max_new_tokens, "cache_len": cache_len},
            "dtype": spec.dtype, "select": spec.select, "backend": spec.backend, "tensorrt": tensorrt,
            "tokens": {"image": loaded.processor.image_token_id, "eos": tokenizer.eos_token_id,
                       "pad": tokenizer.pad_token_id},
            "tools": _tool_versions(),
            "files": {p.name: sha256(p) for p in sorted(staging.iterdir()) if p.is_file()},
            "spec": dataclasses.asdict(spec),
            "graphs": graphs,
            "token_table": {"file": TABLE_FILE, "shape": table_shape, "dtype": table_dtype, "tied": decoder.tied},
            "weights": weight_bytes(loaded.model, staging, stored, graphs, model),
            "io": {name: dataclasses.asdict(graph) for name, graph in io.items()},
            "build": {"seconds": round(time.perf_counter() - started, 1), "peak_rss_bytes": peak},
        }
        # through the reader: an engine whose manifest the runtime would refuse is never written
        typed = EngineManifest.from_dict(json.loads(json.dumps(manifest)), staging)
        (staging / "manifest.json").write_text(typed.to_json())
        _replace_dir(staging, target)
    return target


TABLE_FILE = "token_table.bin"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16"}


def weight_bytes(hf, directory: Path, stored: dict[str, int], graphs: list[dict], model) -> dict:
    """Distinct parameter bytes of the model (tied ones once) against the bytes the engine stores: every
    graph's initializers as written (int4 packed) and the token table; each select's copy of its layer's norm
    and q/k/v is named."""
    distinct = sum(p.numel() * p.element_size() for p in hf.parameters())   # each tied tensor once
    copies = []
    for graph in graphs:
        if graph["kind"] == "select":
            layer = model.layers[graph["layer"]]
            parts = [layer.input_layernorm, layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
            copies.append({"graph": graph["name"], "what": f"layer {graph['layer']} input norm and q/k/v projections",
                           "bytes": sum(p.numel() * p.element_size() for m in parts for p in m.parameters())})
    return {"distinct_bytes": distinct, "stored_bytes": (directory / TABLE_FILE).stat().st_size + sum(stored.values()),
            "copies": copies}


def estimated_bytes(hf, quant: str) -> int:
    """About what the engine will store: every parameter once in its dtype, the decoder layers' linear weights
    at the quantized width plus their scales (one per 128 for int4, one per column for int8)."""
    from .quantize import INT4_BLOCK, QUANT_BITS
    total = 0
    for name, p in hf.named_parameters():
        size = p.numel() * p.element_size()
        if quant != "none" and ".layers." in name and "language_model" in name and p.dim() == 2:
            size = p.numel() * QUANT_BITS[quant] // 8 + (p.numel() // INT4_BLOCK if quant == "int4" else p.shape[0]) \
                * p.element_size()
        total += size
    return total


_DISK_MARGIN = 1.05   # graph protos, processor files and the manifest beside the weights


def check_disk(out_root: Path, need: int) -> None:
    out_root = Path(out_root)
    probe = next((p for p in (out_root, *out_root.resolve().parents) if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if free < need * _DISK_MARGIN:
        raise ValueError(f"the engine needs about {need * _DISK_MARGIN / 1e9:.1f} GB in {out_root}, which has "
                         f"{free / 1e9:.1f} GB free; free some space or pass --out on a larger disk")


@contextlib.contextmanager
def out_of_disk(out_root: Path, need: int):
    """A disk that fills while the weights are written (another writer took the space) is one line too; the
    staged directory is already gone when it is raised."""
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise ValueError(f"the disk under {out_root} filled up while the engine was written (it needs about "
                         f"{need * _DISK_MARGIN / 1e9:.1f} GB); the partial engine was removed; free some space "
                         f"or pass --out on a larger disk") from None


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _replace_dir(staging: Path, target: Path) -> None:
    """Move a finished engine into place. An existing directory (stale or damaged: an intact one with the same
    inputs was reused before any work) is first moved aside into a locked staging name, so a kill between the
    two renames leaves nothing the next build does not sweep. If a concurrent builder's engine lands in between,
    it has the same inputs and ours is dropped."""
    try:
        os.rename(staging, target)  # atomic; fails if target exists and is not empty
        return
    except OSError:
        pass
    with staging_directory(target) as aside:
        try:
            os.rename(target, aside)  # over the empty staging directory
        except FileNotFoundError:
            pass
        try:
            os.rename(staging, target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
