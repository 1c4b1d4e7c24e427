"""Compiled parts of flexkv_core. Everything else (metadata, dependencies, tools) lives in pyproject.toml.

Built by any install of the project (`bash scripts/setup.sh` runs `uv pip install -e .`). Portable flags
only: the result may run on other CPUs than the one that built it (no -march=native).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("flexkv_core.native._index", ["flexkv_core/native/index.c"],
                  extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                      "-Wno-missing-field-initializers", "-Wno-cast-function-type"]),
    ],
)
