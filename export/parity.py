"""Compare an exported graph on ONNX Runtime with its PyTorch module, through polygraphy's Comparator.

ONNX Runtime runs through polygraphy's OnnxrtRunner over a session that registers iwp's op. PyTorch runs
through `TorchRunner`: polygraphy's own PytRunner moves inputs to CUDA unconditionally, and this one runs
on the module's device. Integer outputs (kept indices) must match exactly; float outputs within `atol`.
"""
from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import onnx
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.comparator import Comparator, CompareFunc

from iwp.plugins.visual_token_select.ort_op import session


class TorchRunner(BaseRunner):
    def __init__(self, module: torch.nn.Module, example_feeds: dict, output_names, name: str = "pytorch-reference"):
        super().__init__(name=name, prefix="pytorch-runner")
        from polygraphy.common import TensorMetadata
        self.module, self.input_names, self.output_names = module, list(example_feeds), list(output_names)
        self.metadata = TensorMetadata()
        for key, value in example_feeds.items():  # polygraphy feeds a runner only the inputs it declares
            self.metadata.add(key, value.dtype, value.shape)

    def activate_impl(self):
        self.module.eval()

    def get_input_metadata_impl(self):
        return self.metadata

    def infer_impl(self, feed_dict):
        device = next(self.module.parameters()).device
        with torch.no_grad():
            args = [torch.from_numpy(np.asarray(feed_dict[name])).to(device) for name in self.input_names]
            start = time.perf_counter()
            outputs = self.module(*args)
            self.inference_time = time.perf_counter() - start
        return OrderedDict((n, o.cpu().numpy()) for n, o in zip(self.output_names, outputs))

    def deactivate_impl(self):
        pass


def compare(model: onnx.ModelProto, module: torch.nn.Module, feeds: dict, atol: float = 1e-4) -> bool:
    """True when every output agrees: integer outputs exactly, float outputs within atol."""
    output_names = [o.name for o in model.graph.output]
    runners = [OnnxrtRunner(lambda: session(model)), TorchRunner(module, feeds, output_names)]
    results = Comparator.run(runners, data_loader=[OrderedDict(feeds)])
    integer = {o.name: 0.0 for o in model.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.INT64}
    check = CompareFunc.simple(atol={"": atol, **integer}, rtol={"": 0.0, **integer}, check_shapes=True)
    return bool(Comparator.compare_accuracy(results, compare_func=check))
