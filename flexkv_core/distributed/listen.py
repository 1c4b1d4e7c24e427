"""Which address a node's ports accept connections on, and how that is enforced for the transfer engine.

A node opens two kinds of ports for its peers: the export service (ZMQ, `CacheService`), which binds
the listen address itself, and the transfer engine's handshake and data ports. Mooncake's transfer
engine (0.3.13) binds those to every interface (``0.0.0.0`` and ``*``) whatever it is told, and has no
setting to change that. Its helper process therefore attaches a socket filter (classic BPF,
``SO_ATTACH_FILTER``: no privilege needed) to each of its own wildcard listening sockets, right after
the engine started: packets addressed to anything but the listen address are dropped before TCP sees
them, so a connection to the port at another address of the machine is never established (the filter
is inherited by the connections it accepts). ``/proc/net/tcp`` still shows those sockets on
``0.0.0.0``: `listening_sockets` lists them, `connectable` checks what actually answers.

The listen address is ``FLEXKV_DIST_BIND_ADDR``, by default ``FLEXKV_NODE_ADDR`` (the address peers are
told). ``*`` (or ``0.0.0.0`` / ``::``) asks for every interface: behind NAT, where the advertised
address is not one of this machine's.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass

log = logging.getLogger(__name__)

__all__ = ["Listener", "connectable", "listen_address", "listening_sockets", "restrict_listeners"]

WILDCARDS = ("*", "0.0.0.0", "::", "[::]")
_TCP_LISTEN = "0A"

# Classic BPF (linux/filter.h): the few opcodes the filter needs.
_LD_B_ABS, _LD_W_ABS, _RSH_K, _JEQ_K, _RET_K = 0x30, 0x20, 0x74, 0x15, 0x06
_NET = 0xFFF00000  # SKF_NET_OFF: offsets from the network (IP) header
_SO_ATTACH_FILTER = 26


def listen_address(bind_addr: str | None, node_addr: str) -> str | None:
    """The IP address the node's ports accept connections on; None for every interface."""
    addr = node_addr if bind_addr is None else bind_addr
    if addr in WILDCARDS:
        return None
    try:
        return str(ipaddress.ip_address(addr.strip("[]")))
    except ValueError:  # a host name: the address it resolves to here
        return socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)[0][4][0]


@dataclass(frozen=True)
class Listener:
    """A listening TCP socket of a process."""

    address: str  # as bound: "0.0.0.0", "::", "127.0.0.1", ...
    port: int
    inode: int
    fd: int | None  # in that process, when it is ours to see

    @property
    def wildcard(self) -> bool:
        return ipaddress.ip_address(self.address).is_unspecified


def _hex_address(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc prints IPv6 addresses as four host-order 32-bit words.
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def listening_sockets(pid: int | str = "self") -> list[Listener]:
    """The listening TCP sockets (IPv4 and IPv6) that process ``pid`` holds, from /proc."""
    fds: dict[int, int] = {}  # socket inode -> fd
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            fds[int(target[8:-1])] = int(name)
    found = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:  # no IPv6 on this machine
            continue
        for row in rows:
            cols = row.split()
            if cols[3] != _TCP_LISTEN or int(cols[9]) not in fds:
                continue
            address, port = cols[1].split(":")
            found.append(Listener(_hex_address(address), int(port, 16), int(cols[9]), fds[int(cols[9])]))
    return found


def _filter_program(address: str) -> list[tuple[int, int, int, int]]:
    """Accept a packet (IPv4 or IPv6) only when its destination is ``address``."""
    ip = ipaddress.ip_address(address)
    words = struct.unpack("!4I", ip.packed) if ip.version == 6 else ()
    accept, drop = (_RET_K, 0, 0, 0xFFFFFFFF), (_RET_K, 0, 0, 0)
    ipv4 = [(_LD_W_ABS, 0, 0, _NET + 16), (_JEQ_K, 0, 1, int(ip) if ip.version == 4 else 0), accept, drop]
    if ip.version == 4:
        ipv6 = [drop]
    else:
        ipv6 = []
        for k, word in enumerate(words):  # destination address: bytes 24..39 of the IPv6 header
            remaining = 2 * (3 - k)  # instructions left before "accept" after this pair
            ipv6 += [(_LD_W_ABS, 0, 0, _NET + 24 + 4 * k), (_JEQ_K, 0, remaining + 1, word)]
        ipv6 += [accept, drop]
    # version = first byte >> 4; IPv4 falls through to its block, anything else jumps past it
    head = [(_LD_B_ABS, 0, 0, _NET), (_RSH_K, 0, 0, 4), (_JEQ_K, 0, len(ipv4), 4)]
    return head + ipv4 + ipv6


def _attach(fd: int, program: list[tuple[int, int, int, int]]) -> None:
    code = b"".join(struct.pack("HBBI", *ins) for ins in program)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(program), ctypes.addressof(buf))
    sock = socket.socket(fileno=os.dup(fd))  # ours to close; the option lands on the shared socket
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    finally:
        sock.close()


def restrict_listeners(address: str) -> list[Listener]:
    """Make this process's wildcard listening sockets accept connections to ``address`` only (see the
    module docs). Returns the sockets restricted."""
    program = _filter_program(address)
    done = []
    for listener in listening_sockets():
        if listener.wildcard and listener.fd is not None:
            _attach(listener.fd, program)
            done.append(listener)
    return done


def connectable(address: str, port: int, timeout_s: float) -> bool:
    """Whether a TCP connection to ``address:port`` is established within ``timeout_s``."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        try:
            s.connect((address, port))
        except OSError:  # refused, or dropped by a filter (a timeout)
            return False
        return True
