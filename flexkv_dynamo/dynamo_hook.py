"""Make ``python -m dynamo.vllm ... --connector flexkv`` work on an unmodified Dynamo 1.6.1.

Dynamo 1.6.1 rejects ``--connector`` for vLLM. We do not patch Dynamo's files; instead a one-line
``flexkv_dynamo_hook.pth`` in site-packages (`install`) imports this module when an interpreter starts.
For every process that is not ``python -m dynamo.vllm`` naming flexkv in ``--connector`` (or in
``DYN_CONNECTOR``) it does nothing else. For such a process it puts a one-shot finder on
``sys.meta_path`` that runs when ``dynamo.vllm`` itself is about to be imported (by ``runpy``, after the
interpreter's start-up, before any of Dynamo or vLLM is loaded): it rewrites ``sys.argv`` with
`flexkv_dynamo.launch_args.translate` and runs `flexkv_dynamo.preflight` (the FlexKV configuration and
the cache's endpoint, about a second); a command it cannot translate or a check that fails ends the
process there with one line on stderr and status 2. Right after ``dynamo.vllm.main`` has been imported
(so Dynamo's logging is configured) it logs what it did. Dynamo then parses the translated command
(``--kv-transfer-config`` naming our connector, ``--kv-events-config`` if needed).

Switches:

* ``FLEXKV_DYNAMO_HOOK=0`` disables it for one command;
* ``python -m flexkv_dynamo.dynamo_hook uninstall`` removes the ``.pth`` (``install`` puts it back,
  ``status`` says where it is and whether it is active);
* ``python -m flexkv_dynamo.vllm ...`` does the same translation explicitly, without the hook.

The .pth line itself imports this module only in processes started as ``python -m ...dynamo.vllm``;
every other interpreter start pays for evaluating that one line. Even where it is imported, the module
touches only ``sys`` and ``os`` (already loaded) until it knows the process needs it.
`startup_cost_ms` measures the import.
"""

from __future__ import annotations

import os
import sys

# Deliberately nothing else at module level (no logging, dataclasses, importlib.util, json ...): this
# module is imported at the start of every `python -m` process. Heavier imports live in the functions.

__all__ = [
    "HOOK_ENV",
    "PTH_LINE",
    "PTH_NAME",
    "HookStatus",
    "after_dynamo_import",
    "apply_plan",
    "arm",
    "before_import",
    "hook_disabled",
    "install",
    "launched_module",
    "main",
    "prepare",
    "startup_cost_ms",
    "status",
    "uninstall",
    "wants_translation",
]

#: Set to 0/false/no/off to disable the hook for one command.
HOOK_ENV = "FLEXKV_DYNAMO_HOOK"
#: The file `install` writes into site-packages. Site processes .pth files in alphabetical order; this
#: name sorts after editable-install and base-environment .pth files, so the package is importable.
PTH_NAME = "flexkv_dynamo_hook.pth"
#: Its one line: import this module, but only in a ``python -m ...dynamo.vllm`` process (every other
#: interpreter start pays for evaluating this line alone, some microseconds), and ignore a missing
#: package (the project uninstalled, the .pth left behind) instead of printing a traceback at every
#: start-up. `wants_translation` then checks exactly.
PTH_LINE = ('import sys; exec("try:\\n import flexkv_dynamo.dynamo_hook\\nexcept ImportError:\\n pass") '
            'if getattr(sys, "argv", [""])[:1] == ["-m"] and sys.orig_argv[-len(sys.argv)].endswith("dynamo.vllm") '
            'else None')

#: The module whose command line we translate (its import is when we do it), and the module whose import
#: we wait for to log through Dynamo's logging.
TARGET_MODULE = "dynamo.vllm"
TRIGGER_MODULE = "dynamo.vllm.main"
#: What Dynamo's main imports and `flexkv_dynamo.resets` patches.
ASYNC_LLM_MODULE = "vllm.v1.engine.async_llm"

_FALSE = ("0", "false", "no", "off")


def hook_disabled(env: os._Environ[str] | dict[str, str] | None = None) -> bool:
    """Whether ``FLEXKV_DYNAMO_HOOK`` turns the hook off."""
    env = os.environ if env is None else env
    return env.get(HOOK_ENV, "").strip().lower() in _FALSE


def launched_module(orig_argv: list[str], argv: list[str]) -> str | None:
    """The module a ``python [opts] -m MODULE args...`` process runs, from ``sys.orig_argv`` and the
    ``sys.argv`` seen at start-up (``["-m", args...]``); None for scripts, ``-c`` and the REPL."""
    if not argv or argv[0] != "-m" or len(orig_argv) < len(argv) + 1:
        return None
    token = orig_argv[-len(argv)]  # "MODULE", or "-mMODULE" / "-umMODULE" when glued to the flag
    if token.startswith("-"):
        cut = token.find("m")
        return (token[cut + 1:] or None) if cut > 0 else None
    return token


def wants_translation(orig_argv: list[str], argv: list[str], env: os._Environ[str] | dict[str, str]) -> bool:
    """True for ``python -m dynamo.vllm`` whose connector list names flexkv, unless disabled."""
    if launched_module(orig_argv, argv) != TARGET_MODULE or hook_disabled(env):
        return False
    from .launch_args import requested_connectors  # only dynamo.vllm processes get this far

    return "flexkv" in (requested_connectors(argv[1:], env) or [])


# ---- running code right after dynamo.vllm.main was imported -------------------------------------


class _RunAfterExec:
    """A loader that executes the real loader, then ``after()`` (delegates everything else)."""

    def __init__(self, loader, after) -> None:
        self._loader = loader
        self._after = after

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._after()

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _BeforeImportFinder:
    """A one-shot ``sys.meta_path`` finder: runs ``before()`` when ``name`` is first looked up, then lets
    the other finders import it."""

    def __init__(self, name: str, before) -> None:
        self._name = name
        self._before = before

    def find_spec(self, name, path=None, target=None):
        if name != self._name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self._before()
        return None


def before_import(name: str, before) -> None:
    """Run ``before()`` once, when module ``name`` is about to be imported for the first time (an exception
    it raises, SystemExit included, propagates out of that import)."""
    if name in sys.modules:
        before()
        return
    sys.meta_path.insert(0, _BeforeImportFinder(name, before))


class _AfterImportFinder:
    """A one-shot ``sys.meta_path`` finder: wraps the loader of `TRIGGER_MODULE`, then steps aside."""

    def __init__(self, after) -> None:
        self._after = after

    def find_spec(self, name, path=None, target=None):
        if name != TRIGGER_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RunAfterExec(spec.loader, self._after)
        return spec


def arm(after) -> None:
    """Run ``after()`` once, right after ``dynamo.vllm.main`` is first imported in this process.

    That module configures Dynamo's logging when imported and reads ``sys.argv`` only when ``main()``
    runs, so ``after`` can both log and rewrite the arguments."""
    if TRIGGER_MODULE in sys.modules:
        after()
        return
    sys.meta_path.insert(0, _AfterImportFinder(after))


def apply_plan(plan) -> None:
    """Put a `launch_args.LaunchPlan` into effect: ``sys.argv[1:]`` and the environment."""
    sys.argv[1:] = plan.args
    for name in plan.unset_env:
        os.environ.pop(name, None)


def after_dynamo_import(plan) -> None:
    """What needs Dynamo loaded: log the translation through Dynamo's logging; make Dynamo's prefix-cache
    resets clear our tiers too (`flexkv_dynamo.resets`); for NIXL inside our MultiConnector, set NIXL's
    side-channel host the way Dynamo does for a plain NixlConnector config (its check does not look
    inside a MultiConnector)."""
    import logging

    from .resets import reset_connector_with_prefix_cache

    log = logging.getLogger("flexkv_dynamo.launch_args")
    for line in plan.info:
        log.info("%s", line)
    for line in plan.warnings:
        log.warning("%s", line)
    # Dynamo's main module has imported vLLM's AsyncLLM by now; only a stand-in Dynamo (tests) has not, and
    # importing vLLM here just for it would cost tens of seconds.
    if "flexkv" in plan.connectors and not (ASYNC_LLM_MODULE in sys.modules and reset_connector_with_prefix_cache()):
        log.warning("vLLM's AsyncLLM not loaded by Dynamo: Dynamo's weight updates will not clear FlexKV's tiers")
    if "nixl" in plan.connectors and not os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST"):
        try:
            from dynamo.vllm.args import ensure_side_channel_host
        except ImportError as exc:
            log.warning("cannot set VLLM_NIXL_SIDE_CHANNEL_HOST (%s): set it to this node's IP", exc)
        else:
            ensure_side_channel_host()


def prepare(prog: str, default_connectors: list[str] | None = None):
    """Translate this process's ``sys.argv[1:]`` and check the FlexKV configuration and endpoint, before
    Dynamo or vLLM is imported; return the `launch_args.LaunchPlan` put into effect (None: the command
    does not name flexkv, nothing done). A command that cannot be translated, or a failed check, ends the
    process: ``PROG: error: MESSAGE`` on stderr (one line, no traceback) and status 2."""
    from .launch_args import LaunchArgsError, translate
    from .preflight import PreflightError, preflight

    try:
        plan = translate(sys.argv[1:], os.environ, default_connectors=default_connectors)
        if plan is None:
            return None
        apply_plan(plan)  # first: the plan removes launcher-only variables the configuration refuses
        preflight(os.environ)
    except (LaunchArgsError, PreflightError) as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
    arm(lambda: after_dynamo_import(plan))
    return plan


def _on_interpreter_start() -> None:
    try:
        if wants_translation(list(getattr(sys, "orig_argv", ())), list(getattr(sys, "argv", ())), os.environ):
            # Not now: site-packages are still being processed (a .pth cannot exit cleanly, later .pth files
            # have not run). runpy imports dynamo.vllm next, before any of Dynamo's code runs.
            before_import(TARGET_MODULE, lambda: prepare(TARGET_MODULE))
    except Exception as exc:  # never break an interpreter start-up; say why the hook is off
        sys.stderr.write(f"flexkv_dynamo.dynamo_hook: disabled for this process: {exc!r}\n")


# ---- install / uninstall / status ------------------------------------------------------------------


class HookStatus:
    """Where the hook's .pth is (or would be) and whether it is in effect. (A plain class: a dataclass
    would import `dataclasses`, hence `inspect`, at every interpreter start.)"""

    __slots__ = ("site_dir", "pth_path", "installed", "current", "disabled_by_env", "loaded_in_this_process")

    def __init__(self, site_dir: str, pth_path: str, installed: bool, current: bool, disabled_by_env: bool,
                 loaded_in_this_process: bool) -> None:
        self.site_dir = site_dir
        self.pth_path = pth_path
        self.installed = installed  # the .pth exists
        self.current = current  # ... and holds exactly PTH_LINE
        self.disabled_by_env = disabled_by_env  # FLEXKV_DYNAMO_HOOK says off (in this environment)
        self.loaded_in_this_process = loaded_in_this_process  # this interpreter imported the module

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return f"HookStatus({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"

    def describe(self) -> str:
        if not self.installed:
            state = "not installed"
        elif not self.current:
            state = "installed, but the .pth differs from this version's (run install again)"
        elif self.disabled_by_env:
            state = f"installed, disabled by {HOOK_ENV}"
        else:
            state = "installed and active"
        return f"{state}: {self.pth_path}"


def _default_site_dir() -> str:
    import sysconfig

    return sysconfig.get_paths()["purelib"]


def _pth_path(site_dir: str | os.PathLike[str] | None) -> str:
    return os.path.join(os.fspath(site_dir) if site_dir is not None else _default_site_dir(), PTH_NAME)


def install(site_dir: str | os.PathLike[str] | None = None) -> str:
    """Write the .pth into ``site_dir`` (default: this interpreter's site-packages); return its path.

    Idempotent. Takes effect for interpreters started afterwards."""
    path = _pth_path(site_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(PTH_LINE + "\n")
    os.replace(tmp, path)
    return path


def uninstall(site_dir: str | os.PathLike[str] | None = None) -> bool:
    """Remove the .pth from ``site_dir``; True if there was one."""
    path = _pth_path(site_dir)
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    return True


def status(site_dir: str | os.PathLike[str] | None = None) -> HookStatus:
    path = _pth_path(site_dir)
    try:
        with open(path) as fh:
            content = fh.read()
        installed = True
    except FileNotFoundError:
        content, installed = "", False
    return HookStatus(site_dir=os.path.dirname(path), pth_path=path, installed=installed,
                      current=content.strip() == PTH_LINE, disabled_by_env=hook_disabled(),
                      loaded_in_this_process=__name__ in sys.modules)


def startup_cost_ms(python: str = sys.executable, runs: int = 20, env: dict[str, str] | None = None) -> float:
    """Median wall time (ms) of importing this module plus its start-up check in a fresh ``python -m``
    interpreter, i.e. what the .pth adds to a process start (measured in-process, noise-free)."""
    import statistics
    import subprocess

    code = ("import sys, time; t = time.perf_counter(); "
            "import flexkv_dynamo.dynamo_hook; "
            "sys.stdout.write(str((time.perf_counter() - t) * 1000))")
    samples = []
    for _ in range(runs):
        # `-c`: the .pth (if installed) imports nothing in such a process, so this import is the first.
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True,
                             env={**(os.environ if env is None else env), HOOK_ENV: "1"})
        samples.append(float(out.stdout))
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m flexkv_dynamo.dynamo_hook",
                                     description="Install, remove or inspect the hook that makes "
                                                 "`python -m dynamo.vllm --connector flexkv` work.")
    parser.add_argument("action", choices=["install", "uninstall", "status"])
    parser.add_argument("--site-dir", help="site-packages directory (default: this interpreter's)")
    parser.add_argument("--json", action="store_true", help="status as JSON")
    args = parser.parse_args(argv)
    if args.action == "install":
        sys.stdout.write(f"installed: {install(args.site_dir)}\n")
    elif args.action == "uninstall":
        removed = uninstall(args.site_dir)
        sys.stdout.write(f"{'removed' if removed else 'not installed'}: {_pth_path(args.site_dir)}\n")
    else:
        st = status(args.site_dir)
        if args.json:
            sys.stdout.write(json.dumps(st.as_dict()) + "\n")
        else:
            sys.stdout.write(st.describe() + "\n")
        return 0 if st.installed and st.current else 1
    return 0


_on_interpreter_start()

if __name__ == "__main__":
    sys.exit(main())
