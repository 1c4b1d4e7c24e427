"""The configuration of flexkv_core: one immutable, validated object, built once, passed explicitly.

Where values come from, highest precedence first (the order upstream FlexKV users expect):

1. the YAML or JSON file named by ``FLEXKV_CONFIG_PATH``; its keys are the environment names lowercased
   without the ``FLEXKV_`` prefix (``cpu_cache_gb``, ``ssd_cache_dir``, ...; ``enable_flexkv`` for
   ``ENABLE_FLEXKV``);
2. ``FLEXKV_*`` environment variables;
3. the defaults declared on `FlexKVConfig`.

Everything is checked up front: a bad value, an unknown key or a machine that cannot hold the requested
cache is a `ConfigError` whose message names the key, the value, where it came from and what is allowed.
Nothing in the project reads ``FLEXKV_*`` variables after this: the object is handed to whoever needs it,
and to child processes as ``cfg.to_dict()`` / ``FlexKVConfig.from_dict(d)`` (or by pickling it).

``python -m flexkv_core.config`` prints the effective configuration and the source of every value.

Adding a key is one line in the `FlexKVConfig` class body: ``name: type = _key(default, rule)``; its
environment name (``FLEXKV_NAME``), file key, parsing, checks and help text follow from that line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import fnmatch
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import yaml

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_PATH_ENV",
    "FOREIGN_ENV",
    "GiB",
    "SSD_FILE_GLOB",
    "ConfigError",
    "EvictionPolicy",
    "FlexKVConfig",
    "configure_logging",
    "explain_config",
    "format_bytes",
    "load_config",
    "main",
    "patched_environ",
]

GiB = 1 << 30

@contextmanager
def patched_environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in os.environ for the block (child processes started in it inherit them), then restore
    what was there."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


#: The variable that names the configuration file.
CONFIG_PATH_ENV = "FLEXKV_CONFIG_PATH"

#: ``FLEXKV_*`` variables that are not configuration keys but belong to other parts of the project (the Dynamo
#: launcher reads FLEXKV_DYNAMO_HOOK and FLEXKV_KV_EVENTS_PORT; FLEXKV_TEST_FAULTS is the connector's test-only
#: fault injection, flexkv_dynamo.guard); every other unknown ``FLEXKV_*`` variable is an error (a typo would
#: otherwise be silently ignored).
FOREIGN_ENV = frozenset({CONFIG_PATH_ENV, "FLEXKV_DYNAMO_HOOK", "FLEXKV_KV_EVENTS_PORT", "FLEXKV_TEST_FAULTS"})

#: Where the CPU tier's shared-memory region lives (flexkv_core.tiers.cpu creates it there).
SHM_DIR = "/dev/shm"

#: Names of the SSD tier's data files. Space they already occupy counts as available when checking the
#: SSD size, so a warm restart over preallocated files is not refused for lack of free space.
SSD_FILE_GLOB = "flexkv_ssd_*.bin"

#: Longest ipc:// path ZeroMQ accepts on Linux (sun_path is 108 bytes including the terminating NUL).
_MAX_IPC_PATH = 107

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: float) -> str:
    """A size for people: three significant digits in the largest binary unit that keeps the number at
    least 1 (``512 B``, ``32.0 MiB``, ``1.50 GiB``), so that 32 MiB never reads "0.0 GiB"."""
    n = float(n)
    unit = 0
    while abs(n) >= 1024 and unit < len(_UNITS) - 1:
        n /= 1024
        unit += 1
    if unit == 0:
        return f"{n:.0f} B"
    digits = 2 if abs(n) < 10 else 1 if abs(n) < 100 else 0
    return f"{n:.{digits}f} {_UNITS[unit]}"


def _gib_at_most(n_bytes: float) -> str:
    """``n_bytes`` in GiB, rounded DOWN to three significant digits: a limit quoted to the user must
    itself be allowed (32 MiB -> "0.0312", 23.47 GiB -> "23.4")."""
    gib = n_bytes / (1 << 30)
    if gib <= 0:
        return "0"
    digits = max(0, 2 - math.floor(math.log10(gib)))
    return f"{math.floor(gib * 10**digits) / 10**digits:.{digits}f}"


class EvictionPolicy(str, enum.Enum):
    """Which unpinned blocks a full tier gives up first."""

    LRU = "lru"  # least recently used (with hit_reward_seconds: frequently hit blocks look more recent)
    LFU = "lfu"  # least frequently used
    FIFO = "fifo"  # oldest stored first
    MRU = "mru"  # most recently used first (scans that are never re-read)
    FILO = "filo"  # newest stored first
    SLRU = "slru"  # segmented LRU: a block hit twice is protected from one-hit blocks


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the key, the value, its source and what is
    allowed. ``key`` is the file key concerned (None when the problem is not one key's)."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# --------------------------------------------------------------------------------------------------
# Rules: how one key's value is read (from environment text, or from a file / dict / argument value)
# and what it admits. A rule raises `_Invalid` with the problem; the caller adds key, value and source.


class _Invalid(Exception):
    pass


@dataclass(frozen=True)
class _Rule:
    allowed: str  # what is allowed, in words, for error messages and the CLI
    from_text: Callable[[str], Any]  # an environment variable's text
    from_value: Callable[[Any], Any]  # a value from a file, from_dict, replace() or the constructor


def _boolean() -> _Rule:
    def from_text(text: str) -> bool:
        word = text.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise _Invalid("not a boolean")

    def from_value(value: Any) -> bool:
        # Files hold real booleans: a quoted "no" in YAML is far more likely a mistake than intent.
        if isinstance(value, bool):
            return value
        raise _Invalid(f"expected a boolean, got {type(value).__name__}")

    return _Rule(f"true or false (in the environment also {'/'.join(_TRUE_WORDS[1:])}"
                 f" or {'/'.join(_FALSE_WORDS[1:])})", from_text, from_value)


_INT_TEXT = re.compile(r"[+-]?\d+")
# Plain decimal notation only: float() would also take "nan", "inf", "1_0" and surrounding junk.
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _number(kind: type, lo: float | None = None, *, lo_open: bool = False, hi: float | None = None,
            unit: str = "") -> _Rule:
    """An int or a finite float in [lo, hi] (lo excluded when lo_open)."""
    noun = "an integer" if kind is int else "a number"
    if lo is not None and hi is not None:
        allowed = f"{noun} in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    elif lo is not None:
        allowed = f"{noun} {'>' if lo_open else '>='} {lo:g}"
    else:
        allowed = noun
    if unit:
        allowed += f" ({unit})"

    def in_range(number: Any) -> Any:
        if not math.isfinite(number):
            raise _Invalid("not a finite number")
        if lo is not None and (number <= lo if lo_open else number < lo):
            raise _Invalid("out of range")
        if hi is not None and number > hi:
            raise _Invalid("out of range")
        return number

    def from_text(text: str) -> Any:
        text = text.strip()
        pattern = _INT_TEXT if kind is int else _FLOAT_TEXT
        if not pattern.fullmatch(text):
            raise _Invalid(f"not {'an integer' if kind is int else 'a finite number'}")
        return in_range(kind(text))

    def from_value(value: Any) -> Any:
        if isinstance(value, str):
            # PyYAML reads `1e3` (no dot) as a string; accept numbers written as text in files too.
            return from_text(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(f"expected {noun}, got {type(value).__name__}")
        if kind is int and not isinstance(value, int):
            raise _Invalid("expected an integer")
        return in_range(kind(value))

    return _Rule(allowed, from_text, from_value)


def _choice(options: tuple[str, ...], convert: Callable[[str], Any] = str) -> _Rule:
    """One of `options`, matched case-insensitively, returned in its canonical spelling."""
    by_lower = {option.lower(): option for option in options}

    def from_text(text: str) -> Any:
        try:
            return convert(by_lower[text.strip().lower()])
        except KeyError:
            raise _Invalid("not one of the choices") from None

    def from_value(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            value = value.value  # str(EvictionPolicy.LRU) is "EvictionPolicy.LRU", not "lru"
        if not isinstance(value, str):
            raise _Invalid(f"expected a string, got {type(value).__name__}")
        return from_text(value)

    return _Rule("one of " + ", ".join(options) + " (case-insensitive)", from_text, from_value)


def _directories() -> _Rule:
    def normalise(paths: list[str]) -> tuple[str, ...]:
        # Absolute, so that a child process started in another working directory means the same dirs.
        out = tuple(os.path.abspath(os.path.expanduser(path)) for path in paths)
        duplicates = sorted({path for path in out if out.count(path) > 1})
        if duplicates:
            # Striping twice over one directory would also count its free space twice.
            raise _Invalid(f"directory listed twice: {', '.join(duplicates)}")
        return out

    def from_text(text: str) -> tuple[str, ...]:
        return normalise([piece.strip() for piece in text.split(";") if piece.strip()])

    def from_value(value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            return from_text(value)
        if isinstance(value, (list, tuple)):
            if not all(isinstance(item, str) and item.strip() for item in value):
                raise _Invalid("every entry must be a non-empty path string")
            return normalise([item.strip() for item in value])
        raise _Invalid(f"expected a list of directories, got {type(value).__name__}")

    return _Rule("directories: ';'-separated in the environment, a list or a ';'-separated string in a file",
                 from_text, from_value)


def _endpoint() -> _Rule:
    def from_text(text: str) -> str:
        text = text.strip()
        scheme, sep, rest = text.partition("://")
        if not sep or scheme not in ("ipc", "tcp"):
            raise _Invalid("not an ipc:// or tcp:// endpoint")
        if scheme == "ipc":
            if not rest:
                raise _Invalid("empty ipc path")
            if len(rest.encode()) > _MAX_IPC_PATH:
                raise _Invalid(f"ipc path longer than {_MAX_IPC_PATH} bytes (the socket path limit)")
            return text
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise _Invalid("tcp endpoint needs HOST:PORT")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise _Invalid("tcp port must be a number in 1..65535")
        return text

    def from_value(value: Any) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"expected a string, got {type(value).__name__}")
        return from_text(value)

    return _Rule(f"ipc://PATH (PATH at most {_MAX_IPC_PATH} bytes) or tcp://HOST:PORT (PORT in 1..65535)",
                 from_text, from_value)


def _key(default: Any, rule: _Rule, *, env: str | None = None, secret: bool = False) -> Any:
    """Declare one configuration key: a dataclass field that carries its rule (and its environment
    name when that is not ``FLEXKV_<FIELD NAME>``). A secret is never shown: not in repr, not by the CLI."""
    return dataclasses.field(default=default, repr=not secret, metadata={"rule": rule, "env": env, "secret": secret})


SECRET_SHOWN_AS = "***"


# --------------------------------------------------------------------------------------------------
# The configuration object


@dataclass(frozen=True)
class FlexKVConfig:
    """The validated configuration. Sizes are GiB (floats allowed); use the ``*_bytes`` properties.

    Every way of building one (the constructor, `from_dict`, `replace`, `load_config`) validates it, so
    holding a FlexKVConfig means holding a consistent configuration. Machine checks (memory, SSD dirs and
    free space) run only in ``load_config(check_resources=True)``.
    """

    enable: bool = _key(True, _boolean(), env="ENABLE_FLEXKV")
    cpu_cache_gb: float = _key(16.0, _number(float, 0, lo_open=True, unit="GiB"))
    ssd_cache_gb: float = _key(0.0, _number(float, 0, unit="GiB; 0 means no SSD tier"))
    ssd_cache_dir: tuple[str, ...] = _key(("/tmp/flexkv_ssd",), _directories())
    server_recv_port: str = _key("ipc:///tmp/flexkv_server", _endpoint())
    share_server: bool = _key(False, _boolean())
    eviction_policy: EvictionPolicy = _key(
        EvictionPolicy.LRU, _choice(tuple(p.value for p in EvictionPolicy), EvictionPolicy))
    evict_ratio: float = _key(0.05, _number(float, 0, lo_open=True, hi=1, unit="fraction of a tier freed"))
    evict_start_threshold: float = _key(1.0, _number(float, 0, lo_open=True, hi=1, unit="usage fraction"))
    hit_reward_seconds: float = _key(0.0, _number(float, 0, unit="seconds"))
    max_file_size_gb: float = _key(32.0, _number(float, 0, lo_open=True, unit="GiB"))
    ssd_io_threads: int = _key(4, _number(int, 1))
    log_level: str = _key("INFO", _choice(_LOG_LEVELS))
    enable_metrics: bool = _key(True, _boolean())
    metrics_port: int = _key(0, _number(int, 0, hi=65535, unit="serves the flexkv_* series at "
                                                             "http://NODE_ADDR:PORT/metrics; 0: not served"))
    instance_num: int = _key(1, _number(int, 1))
    instance_id: int = _key(0, _number(int, 0, unit="and < instance_num"))
    # Distributed reuse across nodes (flexkv_core.distributed; deploy/distributed/README.md).
    enable_distributed: bool = _key(False, _boolean())
    redis_host: str = _key("127.0.0.1", _Rule("a host name or IP address of the metadata Redis", str.strip, str))
    redis_port: int = _key(6379, _number(int, 1, hi=65535))
    redis_password: str | None = _key(None, _Rule("the Redis password (unset: none)", str,
                                                  lambda v: None if v is None else str(v)), secret=True)
    redis_db: int = _key(0, _number(int, 0))
    node_addr: str = _key("127.0.0.1", _Rule("this node's host name or IP address as peers reach it", str.strip, str))
    dist_bind_addr: str | None = _key(None, _Rule("the address this node's ports accept connections on (unset: "
                                                  "node_addr; * for every interface)", str.strip,
                                                  lambda v: None if v is None else str(v)))
    te_protocol: str = _key("tcp", _choice(("tcp", "rdma")))
    te_device: str | None = _key(None, _Rule("transfer-engine device names, e.g. mlx5_0 (unset for tcp)", str.strip,
                                                lambda v: None if v is None else str(v)))
    te_metadata: str = _key("P2PHANDSHAKE", _Rule("P2PHANDSHAKE or etcd://HOST:PORT", str.strip, str))
    te_port: int = _key(0, _number(int, 0, hi=65534, unit="first of 2 transfer-engine ports; 0: any free"))
    dist_lease_s: float = _key(10.0, _number(float, 0, lo_open=True, unit="seconds"))
    dist_snapshot_interval_s: float = _key(1.0, _number(float, 0, lo_open=True, unit="seconds"))
    dist_service_port: int = _key(0, _number(int, 0, hi=65535, unit="tcp port peers call; 0: any free"))
    dist_timeout_s: float = _key(5.0, _number(float, 0, lo_open=True, unit="seconds per remote call"))
    dist_verify: bool = _key(True, _boolean())

    def __post_init__(self) -> None:
        given = {spec.field: _Given(getattr(self, spec.field), f"argument {spec.field}", False)
                 for spec in _SPECS}
        # Normalise in place (list -> tuple, "lfu" -> EvictionPolicy.LFU, "debug" -> "DEBUG"): the
        # dataclass is frozen, so go through object.__setattr__, once, at construction.
        for name, value in _validate(given).items():
            object.__setattr__(self, name, value)

    @property
    def cpu_cache_bytes(self) -> int:
        return int(self.cpu_cache_gb * GiB)

    @property
    def ssd_cache_bytes(self) -> int:
        return int(self.ssd_cache_gb * GiB)

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_size_gb * GiB)

    @property
    def ssd_enabled(self) -> bool:
        return self.ssd_cache_bytes > 0

    def to_dict(self) -> dict[str, Any]:
        """Field name -> JSON-friendly value (enums as strings, directories as a list)."""
        return {spec.field: _plain(getattr(self, spec.field)) for spec in _SPECS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FlexKVConfig:
        """The inverse of `to_dict` (validated). Missing fields take their defaults."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"FlexKVConfig.from_dict expects a mapping, got {type(d).__name__}")
        _reject_unknown(d, [spec.field for spec in _SPECS], "FlexKVConfig.from_dict got unknown field")
        given = {spec.field: (_Given(d[spec.field], "from_dict", False) if spec.field in d
                              else _Given(spec.default, "default", False)) for spec in _SPECS}
        return cls(**_validate(given))

    def replace(self, **changes: Any) -> FlexKVConfig:
        """A validated copy with `changes` (field names) applied."""
        _reject_unknown(changes, [spec.field for spec in _SPECS], "FlexKVConfig.replace got unknown field")
        given = {spec.field: (_Given(changes[spec.field], f"replace({spec.field}=...)", False)
                              if spec.field in changes
                              else _Given(getattr(self, spec.field), "the config being replaced", False))
                 for spec in _SPECS}
        return FlexKVConfig(**_validate(given))


class _Spec(NamedTuple):
    field: str  # attribute of FlexKVConfig
    key: str  # key in a config file, and the name error messages use
    env: str  # environment variable
    rule: _Rule
    default: Any


def _make_specs() -> tuple[_Spec, ...]:
    specs = []
    for f in dataclasses.fields(FlexKVConfig):
        env = f.metadata["env"] or f"FLEXKV_{f.name.upper()}"
        key = env.lower().removeprefix("flexkv_")
        specs.append(_Spec(f.name, key, env, f.metadata["rule"], f.default))
    return tuple(specs)


_SPECS = _make_specs()
_BY_FIELD = {spec.field: spec for spec in _SPECS}


class _Given(NamedTuple):
    value: Any
    source: str  # "file PATH" | "env NAME" | "default" | "from_dict" | ...
    is_text: bool  # environment text (parsed from_text) rather than a typed value


def _validate(given: Mapping[str, _Given]) -> dict[str, Any]:
    """Parse and check every key, then the rules that tie keys together. Returns field -> value."""
    values: dict[str, Any] = {}
    for spec in _SPECS:
        g = given[spec.field]
        try:
            values[spec.field] = (spec.rule.from_text if g.is_text else spec.rule.from_value)(g.value)
        except _Invalid as exc:
            raise _error(spec, g, str(exc)) from None

    if values["instance_id"] >= values["instance_num"]:
        num = given["instance_num"]
        raise _error(_BY_FIELD["instance_id"], given["instance_id"],
                     f"must be < instance_num={values['instance_num']} ({num.source})",
                     allowed=f"an integer in [0, {values['instance_num'] - 1}]")
    if values["ssd_cache_gb"] > 0 and not values["ssd_cache_dir"]:
        size = given["ssd_cache_gb"]
        raise _error(_BY_FIELD["ssd_cache_dir"], given["ssd_cache_dir"],
                     f"no directory, but ssd_cache_gb={values['ssd_cache_gb']:.15g} ({size.source}) asks for an "
                     "SSD tier", allowed="at least one directory when ssd_cache_gb > 0")
    return values


def _error(spec: _Spec, given: _Given, problem: str, *, allowed: str | None = None) -> ConfigError:
    return ConfigError(f"{spec.key}={given.value!r} from {given.source}: {problem}; "
                       f"allowed: {allowed or spec.rule.allowed}", key=spec.key)


def _closest(name: str, known: list[str]) -> str | None:
    # Compare without case and without the FLEXKV_ prefix, so that FLEXKV_CPU_CACHE_GB written as a file
    # key still finds cpu_cache_gb.
    def bare(s: str) -> str:
        return s.lower().removeprefix("flexkv_")

    by_bare = {bare(k): k for k in known}
    match = difflib.get_close_matches(bare(name), list(by_bare), n=1, cutoff=0.6)
    return by_bare[match[0]] if match else None


def _reject_unknown(names: Mapping[str, Any], known: list[str], what: str) -> None:
    problems = []
    for name in names:
        if name in known:
            continue
        guess = _closest(str(name), known)
        hint = f"did you mean {guess}?" if guess else "known: " + ", ".join(known)
        problems.append(f"{what} {name}={names[name]!r} ({hint})")
    if problems:
        raise ConfigError("; ".join(problems), key=str(next(n for n in names if n not in known)))


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


# --------------------------------------------------------------------------------------------------
# Loading


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"{CONFIG_PATH_ENV}={path!r}: cannot read the config file ({exc.strerror})") from None

    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            # No telling suffix: sniff. JSON first, for its sharper errors; YAML reads the rest.
            try:
                data = json.loads(text)
            except ValueError:
                data = yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{CONFIG_PATH_ENV}={path!r}: cannot parse the config file: {detail}") from None

    if data is None:  # an empty YAML file
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{CONFIG_PATH_ENV}={path!r}: the config file must hold a mapping of keys to "
                          f"values, not a {type(data).__name__}")
    _reject_unknown(data, [spec.key for spec in _SPECS], f"config file {path}: unknown key")
    return data


def _reject_unknown_env(env: Mapping[str, str]) -> None:
    known = [spec.env for spec in _SPECS]
    unknown = {name: env[name] for name in env
               if name.startswith("FLEXKV_") and name not in known and name not in FOREIGN_ENV}
    if unknown:
        _reject_unknown(unknown, known, "unknown environment variable")


def _load(env: Mapping[str, str] | None) -> tuple[FlexKVConfig, dict[str, str]]:
    """The validated config and, per field, where its value came from."""
    env = os.environ if env is None else env
    _reject_unknown_env(env)
    path = env.get(CONFIG_PATH_ENV) or None  # an empty variable means "no file", as if unset
    from_file = _read_file(path) if path else {}

    given: dict[str, _Given] = {}
    for spec in _SPECS:
        if spec.key in from_file:
            given[spec.field] = _Given(from_file[spec.key], f"file {path}", False)
        elif spec.env in env:
            given[spec.field] = _Given(env[spec.env], f"env {spec.env}", True)
        else:
            given[spec.field] = _Given(spec.default, "default", False)
    values = _validate(given)

    for spec in _SPECS:
        if spec.key in from_file and spec.env in env:
            try:
                same = spec.rule.from_text(env[spec.env]) == values[spec.field]
            except _Invalid:
                same = False
            if not same:
                # The precedence is deliberate, but an ignored variable is a classic source of confusion.
                logger.warning("%s=%r is ignored: the config file %s sets %s=%r", spec.env, env[spec.env],
                               path, spec.key, _plain(values[spec.field]))

    cfg = FlexKVConfig(**values)
    logger.debug("flexkv config: %s", cfg)
    return cfg, {spec.field: given[spec.field].source for spec in _SPECS}


def load_config(env: Mapping[str, str] | None = None, *, check_resources: bool = True) -> FlexKVConfig:
    """Build the configuration from ``FLEXKV_CONFIG_PATH`` > ``FLEXKV_*`` variables in `env` (default
    ``os.environ``) > defaults. With `check_resources`, also check that this machine can hold it: the CPU
    cache fits in memory; each SSD directory exists (it is created if missing) and is writable, and their
    filesystems have room for ``ssd_cache_gb``. Raises ConfigError."""
    cfg, sources = _load(env)
    if check_resources:
        _check_machine(cfg, sources)
    return cfg


def explain_config(env: Mapping[str, str] | None = None) -> list[tuple[str, object, str]]:
    """(key, effective value, source) for every key, in declaration order; source is ``"file PATH"``,
    ``"env NAME"`` or ``"default"``. Raises ConfigError like `load_config` (without machine checks)."""
    cfg, sources = _load(env)
    return [(spec.key, getattr(cfg, spec.field), sources[spec.field]) for spec in _SPECS]


# --------------------------------------------------------------------------------------------------
# Checks against this machine


def _memory_limit() -> tuple[int, str]:
    """Bytes of memory this process may use, and what sets that limit."""
    limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    what = "the machine's memory"
    # In a container (Kubernetes pod) the cgroup limit is the real ceiling: a cache sized to the node
    # would be OOM-killed. Paths for cgroup v2, then v1; "max" or a huge number means no limit.
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < limit:
            limit, what = int(text), f"this container's memory limit ({path})"
        break
    return limit, what


def _shm_free() -> int:
    """Free bytes in /dev/shm (0 when it does not exist: the pool cannot be created at all then)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _own_file_bytes(directory: str) -> int:
    """Disk space already allocated to our SSD files in `directory` (space a warm restart reuses)."""
    total = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if fnmatch.fnmatch(entry.name, SSD_FILE_GLOB) and entry.is_file(follow_symlinks=False):
                # Allocated blocks, not st_size: a sparse file of N bytes frees far less than N.
                total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def _check_machine(cfg: FlexKVConfig, sources: Mapping[str, str]) -> None:
    if not cfg.enable:
        return  # a disabled cache allocates nothing, and must not stop the engine from starting

    limit, what = _memory_limit()
    if cfg.cpu_cache_bytes > limit:
        raise ConfigError(
            f"cpu_cache_gb={cfg.cpu_cache_gb:.15g} from {sources['cpu_cache_gb']}: more than {what} "
            f"({format_bytes(limit)}); allowed: a number > 0 and at most {_gib_at_most(limit)} (GiB)",
            key="cpu_cache_gb")
    # The CPU tier is a file in /dev/shm: a tmpfs smaller than the tier (Docker's default is 64 MiB)
    # would kill the engine with SIGBUS when the pages are touched; the pool refuses it too, but only
    # after the model has loaded.
    shm_free = _shm_free()
    if cfg.cpu_cache_bytes > shm_free:
        raise ConfigError(
            f"cpu_cache_gb={cfg.cpu_cache_gb:.15g} from {sources['cpu_cache_gb']}: {SHM_DIR} has only "
            f"{format_bytes(shm_free)} free for the CPU tier; allowed: at most {_gib_at_most(shm_free)} (GiB) "
            f"here, or enlarge {SHM_DIR} (docker --shm-size, a Kubernetes memory-backed emptyDir)",
            key="cpu_cache_gb")

    if not cfg.ssd_enabled:
        return
    dir_source = sources["ssd_cache_dir"]
    by_device: dict[int, list[str]] = {}
    for directory in cfg.ssd_cache_dir:
        try:
            os.makedirs(directory, exist_ok=True)
            # Really write: permission bits say nothing about read-only mounts, quotas or root squash.
            fd, probe = tempfile.mkstemp(prefix=".flexkv_probe_", dir=directory)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(
                f"ssd_cache_dir={directory!r} from {dir_source}: cannot create or write it "
                f"({exc.strerror or exc}); allowed: directories this process can create and write",
                key="ssd_cache_dir") from None
        by_device.setdefault(os.stat(directory).st_dev, []).append(directory)

    # Directories on one filesystem share its free space: count it once per filesystem.
    free = sum(shutil.disk_usage(dirs[0]).free for dirs in by_device.values())
    reusable = sum(_own_file_bytes(d) for d in cfg.ssd_cache_dir)
    if cfg.ssd_cache_bytes > free + reusable:
        available = free + reusable
        raise ConfigError(
            f"ssd_cache_gb={cfg.ssd_cache_gb:.15g} from {sources['ssd_cache_gb']}: only {format_bytes(available)} "
            f"available in ssd_cache_dir ({'; '.join(cfg.ssd_cache_dir)}): {format_bytes(free)} free plus "
            f"{format_bytes(reusable)} in existing {SSD_FILE_GLOB} files; allowed: a number >= 0 and at "
            f"most {_gib_at_most(available)} (GiB) here, or more directories", key="ssd_cache_gb")


# --------------------------------------------------------------------------------------------------
# Logging


_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_PROJECT_LOGGERS = ("flexkv_core", "flexkv_dynamo")


class _FlexKVHandler(logging.StreamHandler):
    """Our own stderr handler, recognisable so that configure_logging() never adds a second one."""


def configure_logging(cfg: FlexKVConfig) -> None:
    """Set the project's loggers to ``cfg.log_level``. Add a one-line-format stderr handler only when
    nobody has configured logging for them: a host application (vLLM, Dynamo) that installed a handler
    on the root logger or on our loggers keeps its handlers and formats, and gets no duplicate lines."""
    level = getattr(logging, cfg.log_level)
    host_configured_root = bool(logging.getLogger().handlers)
    for name in _PROJECT_LOGGERS:
        log = logging.getLogger(name)
        log.setLevel(level)
        if log.handlers or host_configured_root:
            continue
        handler = _FlexKVHandler()
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        log.addHandler(handler)


# --------------------------------------------------------------------------------------------------
# CLI: python -m flexkv_core.config


def _show(value: Any) -> str:
    """A value as one would write it in the environment."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return ";".join(value)
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flexkv_core.config",
        description="Print the effective FlexKV configuration and where each value comes from "
                    f"({CONFIG_PATH_ENV} file > FLEXKV_* environment > defaults). Exits 2 on a bad one.")
    parser.add_argument("--json", action="store_true", help="print JSON: key -> {value, source}")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the checks against this machine (memory, SSD directories and free "
                             "space; the check creates missing SSD directories)")
    args = parser.parse_args(argv)
    try:
        cfg, sources = _load(None)
        if not args.no_check:
            _check_machine(cfg, sources)
    except ConfigError as exc:
        sys.stderr.write(f"flexkv config error: {exc}\n")
        return 2

    secret = {f.name for f in dataclasses.fields(FlexKVConfig) if f.metadata.get("secret")}
    rows = [(spec.key, SECRET_SHOWN_AS if spec.field in secret and getattr(cfg, spec.field) is not None
             else getattr(cfg, spec.field), sources[spec.field]) for spec in _SPECS]
    if args.json:
        doc = {key: {"value": _plain(value), "source": source} for key, value, source in rows}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return 0
    table = [("key", "value", "source")] + [(key, _show(value), source) for key, value, source in rows]
    key_width = max(len(row[0]) for row in table)
    value_width = max(len(row[1]) for row in table)
    for key, value, source in table:
        sys.stdout.write(f"{key:<{key_width}}  {value:<{value_width}}  {source}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
