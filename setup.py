"""The compiled part of the package build: iwp's CPU kernels (everything else is in pyproject.toml)."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

setup(
    ext_modules=[Pybind11Extension("iwp.plugins.visual_token_select._cpu",
                                   ["plugins/visual_token_select/cpu.cpp"], cxx_std=17,
                                   extra_compile_args=["-O3"])],
    cmdclass={"build_ext": build_ext},
)
