"""Translate ``dynamo.vllm --connector flexkv ...`` into arguments Dynamo 1.6.1 accepts.

Dynamo 1.6.1's ``dynamo.vllm`` refuses ``--connector`` for vLLM (any value, a ValueError pointing to
``--kv-transfer-config``), yet that is the command FlexKV users type. `translate` rewrites such a command
line, and nothing else:

* ``--connector flexkv`` becomes ``--kv-transfer-config`` naming our connector
  (`FLEXKV_TRANSFER_CONFIG`, with ``kv_load_failure_policy="recompute"`` so that a block we fail to load
  is recomputed instead of failing the request: vLLM's default is ``"fail"``);
* ``--connector flexkv nixl`` (either order) becomes vLLM's ``MultiConnector`` with NIXL first and FlexKV
  second: vLLM lets the first child that reports matched tokens load a request, and on a decode worker
  NIXL's remote prefill must win over a partial local hit. NIXL's ``kv_role`` follows
  ``--disaggregation-mode`` as Dynamo's own migration hint does (prefill: producer, decode: consumer);
* without ``--kv-events-config``, and unless ``DYNAMO_USE_FLEXKV`` is off, a KV-events config is added:
  Dynamo relays a worker's KV events to its router only when that config enables them (and prefix
  caching is on), and our tiers' events ride the same vLLM batches. The endpoint is
  ``tcp://*:$FLEXKV_KV_EVENTS_PORT``, else ``$KV_ENDPOINT``, else ``tcp://*:P`` on a free port.

Any other ``--connector`` value (``none``, ``nixl``, ``lmcache``, ...) is left exactly as it was, for
Dynamo to handle as before. ``DYN_CONNECTOR`` (Dynamo's environment form of ``--connector``) is read the
same way; when we translate, it is removed from the environment, since Dynamo rejects it too.

Everything here is a pure function of the argument list and an environment mapping (the free-port
probe is passed in), so it is tested without starting anything. The hook (`flexkv_dynamo.dynamo_hook`)
and ``python -m flexkv_dynamo.vllm`` apply the result to the process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "CONNECTOR_ENV",
    "EVENTS_PORT_ENV",
    "FLEXKV_TRANSFER_CONFIG",
    "KV_ENDPOINT_ENV",
    "LaunchArgsError",
    "LaunchPlan",
    "events_config_for",
    "events_endpoint_problem",
    "free_port_block",
    "requested_connectors",
    "transfer_config_for",
    "translate",
]

#: Our connector, as vLLM loads an out-of-tree connector (in the scheduler and in every worker).
FLEXKV_TRANSFER_CONFIG: Mapping[str, str] = {
    "kv_connector": "FlexKVConnector",
    "kv_connector_module_path": "flexkv_dynamo.connector",
    "kv_role": "kv_both",
}
#: vLLM's default ("fail") fails a request when a connector cannot deliver a block it promised; a cache
#: should recompute instead. vLLM 0.31's KVTransferConfig has the field; the scheduler reads the top level.
LOAD_FAILURE_POLICY = "recompute"

#: Dynamo's environment form of --connector (space separated, like the flag's values).
CONNECTOR_ENV = "DYN_CONNECTOR"
#: A full ZMQ endpoint for vLLM's KV-event publisher (the variable USAGE.md's loop sets).
KV_ENDPOINT_ENV = "KV_ENDPOINT"
#: A port for the KV-event publisher, ``tcp://*:PORT``. Consumed by the launcher (removed afterwards).
EVENTS_PORT_ENV = "FLEXKV_KV_EVENTS_PORT"
#: The hook's switch; the same name as dynamo_hook.HOOK_ENV (that module must not import this one at
#: interpreter start, so it keeps its own copy).
HOOK_ENV = "FLEXKV_DYNAMO_HOOK"
#: FLEXKV_* variables meant for the launcher only, removed from the worker's environment.
LAUNCH_ONLY_ENV = (EVENTS_PORT_ENV, HOOK_ENV)
#: Dynamo's environment form of --disaggregation-mode.
DISAGG_ENV = "DYN_VLLM_DISAGGREGATION_MODE"

#: The only connector FlexKV is combined with (prefill/decode disaggregation).
_COMBINABLE = frozenset({"nixl"})
#: NIXL's role per Dynamo disaggregation mode, as Dynamo 1.6.1 suggests it in its --connector error.
_NIXL_ROLE = {"prefill": "kv_producer", "decode": "kv_consumer"}


class LaunchArgsError(ValueError):
    """A command line we cannot translate; the message says what to change."""


@dataclass(frozen=True)
class LaunchPlan:
    """What to do to the process: the new argument list (without ``argv[0]``), and what to say."""

    args: list[str]
    connectors: tuple[str, ...]
    kv_transfer_config: dict[str, Any]
    kv_events_endpoint: str | None = None  # set when we added a --kv-events-config
    unset_env: tuple[str, ...] = ()  # variables to remove from the environment (DYN_CONNECTOR, ...)
    info: tuple[str, ...] = field(default=())  # lines for the log, INFO
    warnings: tuple[str, ...] = field(default=())  # lines for the log, WARNING


# ---- reading a command line ------------------------------------------------------------------------


def _option_name(arg: str) -> str | None:
    """The option an argument names as vLLM normalises it (``--kv_transfer_config.x=1`` ->
    ``kv-transfer-config``), or None for a value."""
    if not arg.startswith("--") or arg == "--":
        return None
    name = arg[2:].split("=", 1)[0].split(".", 1)[0]
    return name.replace("_", "-")


def _connector_spans(args: Sequence[str]) -> list[tuple[int, int, list[str]]]:
    """Every ``--connector`` in ``args`` as (start, end, values): ``args[start:end]`` is the option and
    its values. Like argparse's ``nargs="*"``: the values run to the next argument starting with '-'.
    Dynamo's parser takes the flag exactly (no abbreviations, no underscores)."""
    spans = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--connector="):
            spans.append((i, i + 1, [arg.split("=", 1)[1]]))
        elif arg == "--connector":
            j = i + 1
            while j < len(args) and not args[j].startswith("-"):
                j += 1
            spans.append((i, j, list(args[i + 1:j])))
            i = j
            continue
        i += 1
    return spans


def requested_connectors(args: Sequence[str], env: Mapping[str, str]) -> list[str] | None:
    """The connector list Dynamo would see (lowercased): the last ``--connector`` on the command line,
    else ``DYN_CONNECTOR``; None when neither is given. Cheap: the hook calls it in every
    ``dynamo.vllm`` process."""
    spans = _connector_spans(args)
    if spans:
        return [v.strip().lower() for v in spans[-1][2] if v.strip()]
    raw = env.get(CONNECTOR_ENV)
    if raw is None:
        return None
    return [v.lower() for v in raw.split() if v]


def _last_value(args: Sequence[str], option: str) -> str | None:
    """The value of the last ``--option V`` / ``--option=V`` (vLLM spelling, dashes or underscores)."""
    value = None
    for i, arg in enumerate(args):
        if _option_name(arg) != option or "." in arg.split("=", 1)[0]:
            continue
        if "=" in arg:
            value = arg.split("=", 1)[1]
        elif i + 1 < len(args):
            value = args[i + 1]
    return value


def _config_file_keys(args: Sequence[str]) -> dict[str, Any]:
    """Keys of vLLM's ``--config FILE.yaml`` (normalised to dashes); {} when absent or unreadable
    (vLLM reports a bad file itself)."""
    path = _last_value(args, "config")
    if not path:
        return {}
    try:
        import yaml
    except ImportError:
        return {}
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        log.debug("cannot read --config %s: %s", path, exc)
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k).replace("_", "-"): v for k, v in data.items()}


def _gives(args: Sequence[str], file_keys: Mapping[str, Any], option: str) -> bool:
    return any(_option_name(a) == option for a in args) or option in file_keys


def _prefix_caching_on(args: Sequence[str], file_keys: Mapping[str, Any]) -> bool:
    """Dynamo turns prefix caching on unless told otherwise; the last flag wins."""
    state = file_keys.get("enable-prefix-caching", True)
    for arg in args:
        name = _option_name(arg)
        if name == "enable-prefix-caching":
            state = True if "=" not in arg else arg.split("=", 1)[1].lower() not in ("0", "false", "no")
        elif name == "no-enable-prefix-caching":
            state = False
    return bool(state)


def _data_parallel_size(args: Sequence[str], file_keys: Mapping[str, Any]) -> int:
    """vLLM publishes rank r's events on port + r: reserve that many ports."""
    raw: Any = file_keys.get("data-parallel-size", 1)
    for i, arg in enumerate(args):
        if _option_name(arg) == "data-parallel-size" or arg == "-dp":
            if "=" in arg:
                raw = arg.split("=", 1)[1]
            elif i + 1 < len(args):
                raw = args[i + 1]
        elif arg.startswith("-dp="):
            raw = arg[4:]
    try:
        return max(1, int(raw))
    except (TypeError, ValueError):
        return 1  # vLLM rejects it with a better message


# ---- building the configs --------------------------------------------------------------------------


def transfer_config_for(connectors: Sequence[str], *, disaggregation_mode: str | None = None) -> dict[str, Any]:
    """The ``--kv-transfer-config`` for a connector list naming flexkv (alone or with nixl)."""
    names = list(dict.fromkeys(connectors))  # keep order, drop repeats
    if "flexkv" not in names:
        raise LaunchArgsError(f"--connector {' '.join(connectors)} does not name flexkv")
    others = [n for n in names if n != "flexkv"]
    bad = [n for n in others if n not in _COMBINABLE]
    if bad:
        raise LaunchArgsError(
            f"--connector {' '.join(connectors)}: flexkv can be combined with nixl only (for prefill/decode "
            f"disaggregation), not with {', '.join(bad)}; for another combination pass --kv-transfer-config "
            "with vLLM's MultiConnector yourself")
    flexkv = dict(FLEXKV_TRANSFER_CONFIG)
    if not others:
        return {**flexkv, "kv_load_failure_policy": LOAD_FAILURE_POLICY}
    nixl_role = _NIXL_ROLE.get((disaggregation_mode or "").lower(), "kv_both")
    return {
        "kv_connector": "MultiConnector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": LOAD_FAILURE_POLICY,
        # NIXL first: on a decode worker its remote prefill must win over a partial hit of ours.
        "kv_connector_extra_config": {"connectors": [{"kv_connector": "NixlConnector", "kv_role": nixl_role},
                                                     flexkv]},
    }


def events_config_for(endpoint: str) -> dict[str, Any]:
    """A ``--kv-events-config`` Dynamo's relay listens to (it replaces ``*`` by 127.0.0.1 and connects)."""
    return {"publisher": "zmq", "topic": "kv-events", "endpoint": endpoint, "enable_kv_cache_events": True}


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port_block(count: int = 1, *, low: int = 20000, high: int = 32000) -> int:
    """A TCP port P in [low, high) such that P .. P+count-1 are free on all interfaces (vLLM binds
    ``tcp://*:P+rank``).

    The default range lies below the kernel's ephemeral range (32768 and up), so an outgoing connection
    never takes one of these ports before its user binds it, and Dynamo's system ports (which must be
    below 32768) can come from here too. The scan starts at a random port so that two launchers on one
    machine rarely pick the same block. Free when probed: another process may take it before vLLM binds
    it, which then fails loudly."""
    import random  # here, not at module level: every dynamo.vllm start imports this module, few need a port

    if count < 1 or not 0 < low < high <= 65536:
        raise ValueError(f"free_port_block: bad count {count} or port range [{low}, {high})")
    last = high - count  # highest usable first port
    start = random.randrange(low, max(low, last) + 1)
    for base in [*range(start, last + 1), *range(low, start)]:
        if all(_port_is_free(base + k) for k in range(count)):
            return base
    raise OSError(f"found no {count} consecutive free TCP ports in [{low}, {high})")


def events_endpoint_problem(endpoint: str) -> str | None:
    """Why vLLM's KV-event endpoint ``endpoint`` cannot deliver events to Dynamo's relay, or None.

    vLLM's publisher binds a ``tcp://`` endpoint only when it holds ``*`` or ``::`` (and always binds
    ``ipc://``); any other host makes it *connect*. Dynamo's relay always connects (to the same endpoint,
    ``*`` read as 127.0.0.1). Two connecting sockets never meet: no events flow and nobody says so.
    We refuse such an endpoint rather than rewrite it: the only rewrite that works, ``tcp://*:PORT``,
    listens on every interface, which someone who wrote 127.0.0.1 did not ask for."""
    if not endpoint.startswith("tcp://") or "*" in endpoint or "::" in endpoint:
        return None
    port = endpoint.rsplit(":", 1)[-1]
    return (f"vLLM binds a tcp:// KV-events endpoint only when its host is '*', so with a host it connects, and "
            f"Dynamo's relay connects too: nobody would listen and the router would get no events from this "
            f"worker; use tcp://*:{port} (vLLM listens, the relay reads it at 127.0.0.1:{port}) or ipc://PATH "
            "(this node only)")


def _user_events_endpoint(args: Sequence[str], file_keys: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The ``--kv-events-config`` the user gave (command line over ``--config`` file) as a dict, or None when
    it is not readable JSON (vLLM reports that), and where it came from."""
    raw: Any = _last_value(args, "kv-events-config")
    where = "--kv-events-config"
    if raw is None:
        raw, where = file_keys.get("kv-events-config"), "kv-events-config in the --config file"
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raw = None
    return (raw if isinstance(raw, dict) else None), where


def _events_endpoint(env: Mapping[str, str], dp_size: int, pick_port: Callable[[int], int]) -> tuple[str, str]:
    """(endpoint, where it came from)."""
    endpoint = env.get(KV_ENDPOINT_ENV, "").strip()
    raw_port = env.get(EVENTS_PORT_ENV, "").strip()
    if raw_port:
        try:
            port = int(raw_port)
        except ValueError:
            raise LaunchArgsError(f"{EVENTS_PORT_ENV}={raw_port!r} is not a port number") from None
        if not 0 < port < 65536:
            raise LaunchArgsError(f"{EVENTS_PORT_ENV}={raw_port!r} is not a port number (1-65535)")
        return f"tcp://*:{port}", EVENTS_PORT_ENV
    if endpoint:
        if not endpoint.startswith(("tcp://", "ipc://")):
            raise LaunchArgsError(f"{KV_ENDPOINT_ENV}={endpoint!r} is not a ZMQ endpoint (tcp://*:PORT or ipc://PATH)")
        problem = events_endpoint_problem(endpoint)
        if problem:
            raise LaunchArgsError(f"{KV_ENDPOINT_ENV}={endpoint!r}: {problem}")
        if endpoint.endswith(":0"):
            raise LaunchArgsError(f"{KV_ENDPOINT_ENV}={endpoint!r}: port 0 cannot be used, Dynamo's relay needs "
                                  "the real port; name one or leave the variable unset for a free one")
        return endpoint, KV_ENDPOINT_ENV
    return f"tcp://*:{pick_port(dp_size)}", "a free port"


# ---- the translation -------------------------------------------------------------------------------


def translate(args: Sequence[str], env: Mapping[str, str] | None = None, *,
              pick_port: Callable[[int], int] = free_port_block,
              default_connectors: Sequence[str] | None = None) -> LaunchPlan | None:
    """The plan for a ``dynamo.vllm`` argument list (``sys.argv[1:]``), or None to leave it alone.

    None unless the connector list (``--connector``, else ``DYN_CONNECTOR``, else
    ``default_connectors``) names flexkv. ``default_connectors`` applies only when the command line has
    neither ``--connector`` nor ``--kv-transfer-config``. Raises `LaunchArgsError` when the command
    cannot mean anything sensible (flexkv plus ``--kv-transfer-config``; flexkv with a connector other
    than nixl; a bad ``KV_ENDPOINT``/``FLEXKV_KV_EVENTS_PORT``/``DYNAMO_USE_FLEXKV``).
    """
    env = os.environ if env is None else env
    args = list(args)
    file_keys = _config_file_keys(args)
    given_transfer = _gives(args, file_keys, "kv-transfer-config")
    connectors = requested_connectors(args, env)
    if connectors is None and default_connectors is not None and not given_transfer:
        connectors = [c.lower() for c in default_connectors]
    if not connectors or "flexkv" not in connectors:
        return None
    spelled = " ".join(connectors)
    if given_transfer:
        raise LaunchArgsError(
            f"--connector {spelled} and --kv-transfer-config both choose the KV connector: give one of them "
            f"(--connector {spelled} stands for --kv-transfer-config "
            f"'{json.dumps(transfer_config_for(connectors), separators=(',', ':'))}')")

    disagg = _last_value(args, "disaggregation-mode") or env.get(DISAGG_ENV)
    transfer = transfer_config_for(connectors, disaggregation_mode=disagg)

    # Drop every --connector (argparse keeps the last; the earlier ones are overridden anyway).
    new_args: list[str] = []
    i = 0
    spans = {start: end for start, end, _ in _connector_spans(args)}
    while i < len(args):
        if i in spans:
            i = spans[i]
            continue
        new_args.append(args[i])
        i += 1
    new_args += ["--kv-transfer-config", json.dumps(transfer, separators=(",", ":"))]

    unset = [CONNECTOR_ENV] if CONNECTOR_ENV in env else []
    info = [f"--connector {spelled}: using --kv-transfer-config {json.dumps(transfer, separators=(',', ':'))}"]
    warnings: list[str] = []
    if "nixl" in connectors:
        info.append(f"kv_load_failure_policy={LOAD_FAILURE_POLICY} applies to the whole MultiConnector: a NIXL "
                    "transfer that fails is recomputed locally as well")

    from .kv_events import tier_events_enabled  # light (msgspec); raises on a bad DYNAMO_USE_FLEXKV

    try:
        tiers_on = tier_events_enabled(env)
    except ValueError as exc:
        raise LaunchArgsError(str(exc)) from None
    endpoint = None
    if _gives(args, file_keys, "kv-events-config"):
        user_events, where = _user_events_endpoint(args, file_keys)
        problem = events_endpoint_problem(str((user_events or {}).get("endpoint", "")))
        if problem and user_events and user_events.get("enable_kv_cache_events"):
            raise LaunchArgsError(f"{where} endpoint {user_events['endpoint']!r}: {problem}")
        if isinstance(user_events, dict) and not user_events.get("enable_kv_cache_events"):
            warnings.append("--kv-events-config does not set enable_kv_cache_events: the KV router gets no events "
                            "from this worker (neither GPU blocks nor FlexKV tiers)")
    elif not tiers_on:
        info.append("DYNAMO_USE_FLEXKV=0 and no --kv-events-config: KV events are not enabled for this worker")
    elif not _prefix_caching_on(args, file_keys):
        warnings.append("prefix caching is disabled: Dynamo relays no KV events, so the KV router cannot see "
                        "this worker's GPU or FlexKV blocks")
    else:
        endpoint, source = _events_endpoint(env, _data_parallel_size(args, file_keys), pick_port)
        new_args += ["--kv-events-config", json.dumps(events_config_for(endpoint), separators=(",", ":"))]
        info.append(f"KV events enabled for the router on {endpoint} (from {source}; set KV_ENDPOINT or "
                    f"{EVENTS_PORT_ENV}, or pass --kv-events-config, to choose)")
    # Launch settings, not cache settings: flexkv_core's configuration refuses FLEXKV_* names it does not
    # know, and the connector reads it in this process and its children.
    unset += [name for name in LAUNCH_ONLY_ENV if name in env]
    return LaunchPlan(args=new_args, connectors=tuple(connectors), kv_transfer_config=transfer,
                      kv_events_endpoint=endpoint, unset_env=tuple(unset), info=tuple(info),
                      warnings=tuple(warnings))
