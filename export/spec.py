"""EngineSpec: everything an engine build is a function of, with every build default defined once here.

Light on purpose (no torch, no onnx), so the command line can read its defaults without loading either."""
from __future__ import annotations

import math
from dataclasses import dataclass

DTYPE_NAMES = ("fp32", "fp16")   # fp16 graphs are fp16 in the file; the selection scores in fp32
QUANT_NAMES = ("none", "int8", "int4")   # weight-only, the segments' linear layers (export/quantize.py)


@dataclass(frozen=True)
class EngineSpec:
    model: str
    method: str                    # a method name or "none"
    budget: int | None = None      # None: the preset's (resolved once, in build)
    grid: str | None = None
    max_text_tokens: int = 128     # prompt tokens beside the image; fixes the prefill length
    max_new_tokens: int = 32
    dtype: str = "fp32"
    select: str = "plugin"
    model_path: str | None = None
    random_weights: bool = False
    options: tuple = ()            # method options as sorted (name, value) pairs
    external_data: bool = False    # a settings-hash input only: every graph now streams its weights to a side file
    backend: str = "onnxruntime"   # or "tensorrt": also build a .plan per graph (export/tensorrt.py)
    trt_workspace_gb: float | None = None   # TensorRT builder's tactic workspace cap in GiB (None: TensorRT's)
    quant: str = "none"            # int8: per channel; int4: block 128; both symmetric, round to nearest

    def __post_init__(self):
        if self.max_text_tokens < 1 or self.max_new_tokens < 1:
            raise ValueError("max_text_tokens and max_new_tokens must be >= 1")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"DTYPE={self.dtype} is not one of {', '.join(DTYPE_NAMES)}")
        if self.quant not in QUANT_NAMES:
            raise ValueError(f"QUANT={self.quant} is not one of {', '.join(QUANT_NAMES)}; pass one of them, "
                             "e.g. QUANT=int4 (weight-only int4, block 128)")
        if self.quant == "int4" and self.backend == "tensorrt" and self.dtype != "fp16":
            raise ValueError("QUANT=int4 on TensorRT is W4A16: its int4 weight-only GEMMs take fp16 activations; "
                             "pass DTYPE=fp16 (or BACKEND=onnxruntime)")
        if self.select not in ("plugin", "native"):
            raise ValueError(f"SELECT={self.select} is not one of plugin, native")
        if self.backend not in ("onnxruntime", "tensorrt"):
            raise ValueError(f"BACKEND={self.backend} is not one of onnxruntime, tensorrt (auto is resolved first)")
        gb = self.trt_workspace_gb
        if gb is not None and (isinstance(gb, bool) or not isinstance(gb, (int, float)) or not math.isfinite(gb)
                               or gb <= 0):
            raise ValueError(f"--trt-workspace-gb {gb} must be a positive number of GiB (Orin's CPU and GPU share "
                             "one DRAM; e.g. 2)")
