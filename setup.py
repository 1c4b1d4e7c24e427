"""Build steps pyproject.toml cannot declare. Everything else about the package is in pyproject.toml.

* ``ext_modules``: the compiled parts of flexkv_core (``flexkv_core/native``), built by any install of the
  project (`bash scripts/setup.sh` runs ``uv pip install -e .``). Portable flags only: the result may run on
  other CPUs than the one that built it (no -march=native).
* `build_hook_pth` puts the start-up hook's one-line ``flexkv_dynamo_hook.pth`` (see
  `flexkv_dynamo.dynamo_hook`) at the top level of the wheel, so that installing the project, from a wheel
  or editable, installs the hook into site-packages (``python -m dynamo.vllm --connector flexkv`` works)
  and ``pip uninstall`` removes it with the rest. setuptools ships its own ``distutils-precedence.pth``
  with a custom build step for the same reason: a wheel has no declarative way to put a file next to the
  packages.
"""

from __future__ import annotations

import importlib.util
import os

from setuptools import Command, Extension, setup
from setuptools.command.build import build

#: Warnings on, portable optimisation (CPUs differ between the machines that build and run this).
C_FLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers",
           "-Wno-cast-function-type"]


def _hook_module():
    """flexkv_dynamo/dynamo_hook.py, loaded by path (the name and the line live there, once)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flexkv_dynamo", "dynamo_hook.py")
    spec = importlib.util.spec_from_file_location("_flexkv_dynamo_hook_for_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class build_hook_pth(Command):
    """Write flexkv_dynamo_hook.pth at the top of what becomes the wheel."""

    description = "write the dynamo.vllm start-up hook's .pth file"
    user_options: list = []

    def initialize_options(self) -> None:
        self.build_lib = None
        self.editable_mode = False  # set by setuptools' editable_wheel

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def _target(self) -> str:
        hook = _hook_module()
        if self.editable_mode:
            # An editable wheel is packed from install_lib; build_lib is a scratch directory there.
            directory = self.get_finalized_command("install").install_lib
        else:
            directory = self.build_lib
        return os.path.join(directory, hook.PTH_NAME)

    def run(self) -> None:
        path = self._target()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(_hook_module().PTH_LINE + "\n")

    def get_outputs(self) -> list[str]:
        return [] if self.editable_mode else [self._target()]


class build_with_hook(build):
    sub_commands = [*build.sub_commands, ("build_hook_pth", None)]


setup(
    cmdclass={"build": build_with_hook, "build_hook_pth": build_hook_pth},
    ext_modules=[
        Extension("flexkv_core.native._index", ["flexkv_core/native/index.c"], extra_compile_args=C_FLAGS),
        Extension("flexkv_core.native._copy", ["flexkv_core/native/copy.c"], extra_compile_args=[*C_FLAGS, "-pthread"],
                  extra_link_args=["-pthread"]),
    ],
)
