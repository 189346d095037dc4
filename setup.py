"""The compiled part of the package build: iwp's CPU kernels and the runtime core (everything else is in
pyproject.toml). The CUDA kernels and the TensorRT plugin are built by CMake (`make plugins`)."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

setup(
    ext_modules=[Pybind11Extension("iwp.plugins.visual_token_select._cpu",
                                   [f"plugins/visual_token_select/{name}.cpp" for name in
                                    ("cpu_module", "cpu", "cpu_ops", "cpu_panels", "plan")], cxx_std=17,
                                   # no FMA contraction (the kernel rounds as the reference); no FP traps, so the
                                   # vector exp's clamps vectorize (results are unchanged)
                                   extra_compile_args=["-O3", "-pthread", "-ffp-contract=off", "-fno-trapping-math"],
                                   extra_link_args=["-pthread"]),
                 Pybind11Extension("iwp.runtime._core",
                                   ["runtime/core/kv_arena.cpp", "runtime/core/sampler.cpp",
                                    "runtime/core/generate.cpp", "runtime/core/manifest.cpp",
                                    "runtime/core/prompt.cpp", "runtime/core/bindings.cpp"], cxx_std=17,
                                   extra_compile_args=["-O3"])],
    cmdclass={"build_ext": build_ext},
)
