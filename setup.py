"""Compiled parts of flexkv_core (everything else is in pyproject.toml).

Each extension is its own module and source file. Portable flags only (no -march=native): a wheel or
checkout built on one machine runs on any other of the same architecture.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("flexkv_core._copy", ["flexkv_core/native/copy.c"], extra_compile_args=["-O2", "-pthread"],
                  extra_link_args=["-pthread"]),
    ],
)
