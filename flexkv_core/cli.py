"""The ``flexkv`` command: look at a running cache and at the configuration.

    flexkv status [--endpoint E] [--json] [--timeout S]   usage per tier, hits, bytes moved, and with
                                                          distributed reuse on: peers, blocks fetched and lent
    flexkv config [...]                                   the effective configuration (flexkv_core.config)

Each subcommand is a `Command` in `COMMANDS`: a name, a help line, a function adding its arguments and
a function running it (returning the exit code). Adding one is adding an entry; a tool that already has
its own ``main(argv) -> int`` is one `delegate(...)` line. Heavy imports belong inside ``run`` so that
``flexkv --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import format_bytes

DEFAULT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, list[str]], int]  # (parsed args, args passed through) -> exit code
    passthrough: bool = False  # hand unparsed arguments to `run` (for commands that own their parser)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(f"flexkv: {text}\n")


# --- flexkv status --------------------------------------------------------------------------------


def _status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", help="the cache service (default: FLEXKV_SERVER_RECV_PORT of the loaded "
                                      "configuration)")
    p.add_argument("--json", action="store_true", help="print the raw answer as JSON")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds to wait for an answer (default {DEFAULT_TIMEOUT_S:g})")


def _default_endpoint() -> str:
    from .config import load_config

    # Only the endpoint is needed: skip the machine checks (they would create missing SSD directories).
    return load_config(check_resources=False).server_recv_port


def _run_status(args: argparse.Namespace, _rest: list[str]) -> int:
    from .client import CacheClient, ServiceError, ServiceUnavailable

    try:
        endpoint = args.endpoint or _default_endpoint()
        client = CacheClient(endpoint, timeout_s=args.timeout)
    except ValueError as e:  # a bad endpoint or configuration (ConfigError is a ValueError)
        _err(str(e))
        return 2
    try:
        who = client.call("whoami")
        status = client.call("status")
        distributed = _distributed_view(client)
    except (ServiceUnavailable, ServiceError) as e:
        _err(str(e))
        return 1
    finally:
        client.close()
    if args.json:
        answer = {"endpoint": endpoint, "service": who, "status": status}
        if distributed is not None:
            answer["distributed"] = distributed
        _out(json.dumps(answer, indent=2, sort_keys=True, default=str))
    else:
        _out(format_status(endpoint, who, status))
        if distributed is not None:
            _out(format_distributed(distributed))
    return 0


def _distributed_view(client: Any) -> Any:
    """The node's ``distributed`` answer, or None when the cache takes no part in distributed reuse (its
    service has no such method)."""
    from .client import ServiceError

    try:
        return client.call("distributed")
    except ServiceError as e:
        if "unknown method" in e.error:
            return None
        raise


# --- rendering a status answer --------------------------------------------------------------------

_TIER_NAMES = ("cpu", "ssd", "remote")


def _human_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] * bool(days) + [f"{hours}h"] * bool(hours) + [f"{minutes}m"] * bool(minutes)
    return "".join(parts + [f"{secs}s"])


def _value(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if "bytes" in key:
        return format_bytes(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


#: Columns shown first when present; the others follow in the order the cache reported them.
_FIRST_COLUMNS = ("used_slots", "capacity_slots", "used%")


def _collect(status: Mapping[str, Any], path: str, rows: dict[str, dict[str, Any]],
             rest: dict[str, Any]) -> None:
    """Sort a (nested) status answer into per-tier rows and everything else.

    Per-tier numbers may come as ``{"used_slots": {"cpu": 3, ...}}`` (one map per quantity, the shape of
    `CacheMetrics.snapshot`) or as ``{"cpu": {"used_slots": 3, ...}}`` (one map per tier, possibly under
    a key like ``tiers``); other maps are walked into.
    """
    for key, value in status.items():
        if not isinstance(value, Mapping):
            rest[f"{path}{key}"] = value
        elif key in _TIER_NAMES:
            for k, v in value.items():
                if isinstance(v, Mapping):
                    rest[f"{path}{key}.{k}"] = v
                else:
                    rows.setdefault(key, {})[k] = v
        elif value and all(k in _TIER_NAMES for k in value):
            if all(isinstance(v, Mapping) for v in value.values()):
                _collect(value, f"{path}{key}.", rows, rest)
            else:
                for tier, v in value.items():
                    rows.setdefault(tier, {})[key] = v
        elif value and all(not isinstance(v, Mapping) for v in value.values()):
            rest[f"{path}{key}"] = value  # a flat map (bytes by direction, ...): one line
        else:
            _collect(value, f"{path}{key}.", rows, rest)


def format_status(endpoint: str, who: Mapping[str, Any], status: Any) -> str:
    """Human-readable status: the service, a table of the tiers, then whatever else the cache reported."""
    lines = []
    header = f"flexkv service {who.get('name', '?')!r} at {endpoint}, pid {who.get('pid', '?')}"
    started = who.get("started_at")
    if isinstance(started, (int, float)):
        header += f", up {_human_duration(time.time() - started)}"
    if who.get("share"):
        header += ", shared"
    lines.append(header)
    if not isinstance(status, Mapping):
        lines.append(f"status: {status}")
        return "\n".join(lines)

    rows: dict[str, dict[str, Any]] = {}
    rest: dict[str, Any] = {}
    _collect(status, "", rows, rest)
    # A tier with nothing in it and no capacity (no SSD configured, no remote peers) is noise in the table.
    idle = [t for t, row in rows.items() if not any(v for v in row.values() if isinstance(v, (int, float)))]
    for tier in idle:
        del rows[tier]
    for row in rows.values():
        used, cap = row.get("used_slots"), row.get("capacity_slots")
        if isinstance(used, (int, float)) and isinstance(cap, (int, float)) and cap:
            row["used%"] = f"{100 * used / cap:.1f}%"
    if rows:
        columns: list[str] = [c for c in _FIRST_COLUMNS if any(c in row for row in rows.values())]
        for row in rows.values():
            columns += [c for c in row if c not in columns]
        table = [["tier", *columns]]
        for tier in sorted(rows, key=lambda t: _TIER_NAMES.index(t) if t in _TIER_NAMES else 99):
            table.append([tier, *(_value(c, rows[tier].get(c, "-")) for c in columns)])
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for r in table:
            cells = (cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                     enumerate(zip(r, widths, strict=True)))
            lines.append("  ".join(cells).rstrip())
    if idle:
        lines.append(f"idle tiers: {', '.join(idle)}")
    for key, value in rest.items():
        if isinstance(value, Mapping):
            value = ", ".join(f"{k} {_value(key, v)}" for k, v in value.items())
        else:
            value = _value(key, value)
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


def format_distributed(view: Mapping[str, Any]) -> str:
    """The distributed-reuse part of ``flexkv status``: this node, its peers, what it fetched and lent."""
    stats = view.get("stats") or {}
    peers = list(view.get("peers") or [])
    redis = "connected" if view.get("connected") else "OFFLINE (serving local blocks only)"
    lines = [f"distributed: node {view.get('node_id')}, Redis {view.get('redis')} {redis}, "
             f"{view.get('held_blocks', 0)} blocks published",
             f"  peers: {len(peers)}" + (f" ({', '.join(peers)}), {view.get('peer_blocks', 0)} blocks between them"
                                         if peers else ""),
             f"  fetched: {stats.get('fetched_blocks', 0)} blocks ({format_bytes(stats.get('fetched_bytes', 0))}) "
             f"in {stats.get('grants', 0)} grants; failed {stats.get('failed_blocks', 0)}, checksum mismatches "
             f"{stats.get('checksum_mismatches', 0)}, lease aborts {stats.get('lease_aborts', 0)}",
             f"  lent: {stats.get('lent_blocks', 0)} blocks in {stats.get('exports', 0)} exports"]
    return "\n".join(lines)


# --- flexkv config --------------------------------------------------------------------------------


def delegate(name: str, help: str, module: str) -> Command:
    """A command that hands its arguments to ``module.main(argv) -> int`` (imported only when run)."""

    def run(_args: argparse.Namespace, rest: list[str]) -> int:
        return int(importlib.import_module(module).main(rest) or 0)

    return Command(name, help, lambda p: None, run, passthrough=True)


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("status", "show usage per tier, hits and bytes moved of a running cache",
                _status_arguments, _run_status),
        delegate("config", "show the effective configuration (file > FLEXKV_* environment > defaults)",
                 "flexkv_core.config"),
        delegate("serve", "hold this node's shared tiers for engines with FLEXKV_SHARE_SERVER=1",
                 "flexkv_core.shared.owner"),
    )
}


#: Packages that build on flexkv_core (flexkv_dynamo's `events`) add commands through this entry-point
#: group, so the core never imports them by name: ``NAME = "module:main"`` with ``main(argv) -> int``.
ENTRY_POINT_GROUP = "flexkv.commands"


def plugin_commands() -> list[Command]:
    from importlib.metadata import entry_points

    found = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        module = ep.value.split(":")[0]
        found.append(delegate(ep.name, f"{ep.name} (from {module}; see --help)", module))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexkv", description="FlexKV tiered KV cache tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in plugin_commands():
        COMMANDS.setdefault(cmd.name, cmd)
    for cmd in COMMANDS.values():
        # Passthrough commands own their options (--help included): ours must not swallow them.
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, add_help=not cmd.passthrough)
        cmd.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    cmd = COMMANDS[args.command]
    if rest and not cmd.passthrough:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return cmd.run(args, rest)


if __name__ == "__main__":
    sys.exit(main())
