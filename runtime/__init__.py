"""iwp.runtime: an engine directory on ONNX Runtime (pipeline.py: prepare -> prefill -> decode, with an
observer of every graph run) and the C++ runtime core (_core: the decode loop, the sampler, the KV arena)."""
