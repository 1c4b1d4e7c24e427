"""A real Dynamo 1.6.1 KV router fed by our KV-event publisher, for tests (no engine, no mocks).

The pieces, as ``dynamo.vllm`` + ``dynamo.frontend --router-mode kv`` wire them (FIELD_NOTES §4):

    our KvEventPublisher (PUB, binds)  ->  dynamo.llm.KvEventPublisher relay (SUB, connects)
        -> Dynamo event plane (zmq or NATS)  ->  dynamo.llm.KvRouter  ->  get_overlap_scores(tokens)

Our publisher plays the vLLM worker's publisher. The worker is a served endpoint registered with
``register_model`` (no model files), discovery is a file store (or etcd), the event plane zmq (or NATS).
Dynamo's runtime lives on an asyncio loop in a background thread so that tests stay synchronous.

`RouterProbe` is a KvRouter alone, on the endpoint real ``dynamo.vllm`` workers serve: what a (re)started
frontend's router knows. Also here: starting throwaway etcd and NATS servers on free loopback ports.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support import free_port, patched_environ, wait_for

from flexkv_dynamo.publisher import KvEventPublisher


@dataclass(frozen=True)
class Overlap:
    """One worker's row of ``KvRouter.get_overlap_scores``: matched prefix blocks per tier.

    ``host`` and ``disk`` are what our tiers add beyond the device prefix (Dynamo's
    ``*_extension_blocks``); Dynamo's own ``host_pinned_blocks`` / ``disk_blocks`` are cumulative
    (device + host, device + host + disk), kept here as ``cumulative_host`` / ``cumulative_disk``.
    """

    device: int
    host: int
    disk: int
    cumulative_host: int
    cumulative_disk: int

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Overlap:
        return cls(
            device=row["device_blocks"],
            host=row["host_pinned_extension_blocks"],
            disk=row["disk_extension_blocks"],
            cumulative_host=row["host_pinned_blocks"],
            cumulative_disk=row["disk_blocks"],
        )

    @property
    def tiers(self) -> tuple[int, int, int]:
        return (self.device, self.host, self.disk)


NO_OVERLAP = Overlap(0, 0, 0, 0, 0)


class _DynamoLoop:
    """Dynamo's runtime lives on an asyncio loop in a background thread; tests stay synchronous."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="dynamo-loop", daemon=True)
        self._thread.start()

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the runtime's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


async def _scores(router: Any, tokens: Sequence[int]) -> dict[str, Any]:
    # Dynamo's awaitables bind to the loop running when they are created: create them there.
    return await router.get_overlap_scores(list(tokens))


class RouterProbe(_DynamoLoop):
    """A KvRouter of our own on the endpoint real workers serve (``dynamo.vllm``: dynamo.backend.generate),
    built as a (re)started frontend builds its router: it learns the workers' blocks from their events and,
    for what happened before it started, from the workers' local indexers."""

    def __init__(self, endpoint: str, block_size: int, *, discovery: str = "file", event_plane: str = "zmq") -> None:
        super().__init__()
        self.block_size = block_size

        async def start() -> None:
            from dynamo.llm import KvRouter, KvRouterConfig
            from dynamo.runtime import DistributedRuntime

            self.runtime = DistributedRuntime(asyncio.get_running_loop(), discovery, "tcp", event_plane=event_plane)
            self.router = KvRouter(self.runtime.endpoint(endpoint), block_size, KvRouterConfig())

        try:
            self.call(start())
        except BaseException:
            self._stop_loop()
            raise

    def overlaps(self, tokens: Sequence[int]) -> dict[int, Overlap]:
        """Each worker's overlap for ``tokens`` (by worker id; workers the router knows no block of for them
        show all zeros)."""
        rows = self.call(_scores(self.router, tokens))["workers"]
        return {row["worker_id"]: Overlap.from_row(row) for row in rows}

    def close(self) -> None:
        async def stop() -> None:
            self.runtime.shutdown()
            await asyncio.sleep(0.2)

        try:
            if getattr(self, "runtime", None) is not None:
                self.call(stop(), timeout=10)
        finally:
            self._stop_loop()


class RouterHarness(_DynamoLoop):
    """Dynamo runtime + one registered worker + relay + KvRouter, and our publisher feeding the relay."""

    def __init__(self, *, block_size: int, discovery: str = "file", event_plane: str = "zmq", namespace: str = "flexkvtest"):
        super().__init__()
        self.block_size = block_size
        self.discovery = discovery
        self.event_plane = event_plane
        self.namespace = namespace
        self.publisher = KvEventPublisher("tcp://127.0.0.1:0", bind=True)
        self._probe = 0
        try:
            self.call(self._start())
        except BaseException:
            self.close()
            raise

    async def _start(self) -> None:
        from dynamo.llm import (
            KvEventPublisher as DynamoRelay,
        )
        from dynamo.llm import (
            KvRouter,
            KvRouterConfig,
            ModelInput,
            ModelType,
            WorkerType,
            register_model,
        )
        from dynamo.runtime import DistributedRuntime

        self.runtime = DistributedRuntime(asyncio.get_running_loop(), self.discovery, "tcp", event_plane=self.event_plane)
        self.endpoint = self.runtime.endpoint(f"{self.namespace}.worker.generate")

        async def generate(request: Any) -> Any:  # never called: routing is only queried
            yield {"token_ids": []}

        self._serving = asyncio.ensure_future(self.endpoint.serve_endpoint(generate))
        await register_model(
            ModelInput.Tokens,
            ModelType.Chat | ModelType.Completions,
            self.endpoint,
            "flexkv-test-model",
            "flexkv-test-model",
            worker_type=WorkerType.Aggregated,
            kv_cache_block_size=self.block_size,
            skip_model_assets=True,
        )
        # What dynamo.vllm does for a worker with --kv-events-config: relay vLLM's ZMQ events.
        self.relay = DynamoRelay(
            self.endpoint,
            kv_block_size=self.block_size,
            zmq_endpoint=self.publisher.endpoint,
            zmq_topic="",
            enable_local_indexer=True,
        )
        self.router = KvRouter(self.endpoint, self.block_size, KvRouterConfig())

    def overlap(self, tokens: Sequence[int]) -> Overlap:
        """This worker's overlap for ``tokens`` (all zero while the router knows no block of it)."""
        rows = self.call(_scores(self.router, tokens))["workers"]
        assert len(rows) <= 1, f"expected one worker, router reports {rows}"
        return Overlap.from_row(rows[0]) if rows else NO_OVERLAP

    def wait_overlap(self, tokens: Sequence[int], expected: Overlap | tuple[int, int, int], timeout: float = 10.0) -> Overlap:
        """Poll until the router reports ``expected`` (an Overlap, or (device, host, disk)) for ``tokens``."""
        def matches() -> Overlap | None:
            got = self.overlap(tokens)
            want = got.tiers if isinstance(expected, tuple) else got
            return got if want == expected else None

        try:
            return wait_for(matches, timeout, f"overlap {expected}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; router now reports {self.overlap(tokens)}") from None

    def sync(self, timeout: float = 15.0) -> None:
        """Return once a probe published now has reached the router.

        A probe is a one-block GPU prefix of its own tokens. Events travel in order, so once the
        router shows a probe it has processed every batch published before it: this is how a test
        asserts that an event changed *nothing*. At start-up it also waits out PUB/SUB's slow joiner
        (batches sent before the relay's subscription is in place are lost), resending probes.
        """
        from vllm.distributed.kv_events import BlockStored

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._probe += 1
            tokens = [10_000_000 + self._probe * self.block_size + i for i in range(self.block_size)]
            probe = BlockStored(
                block_hashes=[(1 << 63) + self._probe], parent_block_hash=None, token_ids=tokens,
                block_size=self.block_size, lora_id=None, medium="GPU", lora_name=None,
            )
            self.publisher.publish([probe])
            try:
                wait_for(lambda t=tokens: self.overlap(t).device == 1, 1.0, "probe")
                return
            except AssertionError:
                continue
        raise AssertionError(f"the router never saw a probe published on {self.publisher.endpoint} within {timeout}s")

    def close(self) -> None:
        async def stop() -> None:
            for name in ("relay",):
                obj = getattr(self, name, None)
                if obj is not None:
                    obj.shutdown()
            serving = getattr(self, "_serving", None)
            if serving is not None:
                serving.cancel()
            runtime = getattr(self, "runtime", None)
            if runtime is not None:
                runtime.shutdown()
            await asyncio.sleep(0.2)  # let the runtime's tasks see the cancellation

        try:
            if self.loop.is_running():
                self.call(stop(), timeout=10)
        finally:
            self.publisher.close()
            self._stop_loop()


def vllm_block_hashes(token_ids: Sequence[int], block_size: int, *, seed: str | None = None) -> list[bytes]:
    """The chained block hashes vLLM gives a plain-text request (``request.block_hashes``, sha256).

    ``seed`` is the engine's PYTHONHASHSEED, from which vLLM derives the first block's parent
    (``python -m dynamo.vllm`` sets it to "0" when it is unset); None: this process's own.
    """
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils

    with patched_environ({} if seed is None else {"PYTHONHASHSEED": seed}):
        kv_cache_utils.init_none_hash(sha256)
    hashes: list[bytes] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = kv_cache_utils.hash_block_tokens(sha256, parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


# --- throwaway etcd and NATS servers -----------------------------------------------------------------


@dataclass
class Servers:
    etcd_url: str
    nats_url: str


def missing_server_binaries() -> list[str]:
    return [name for name in ("etcd", "nats-server") if shutil.which(name) is None]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _etcd_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as resp:
            return b'"true"' in resp.read()
    except OSError:
        return False


def _nats_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(5) == b"INFO "
    except OSError:
        return False


@contextmanager
def etcd_and_nats(workdir: Path, timeout: float = 20.0) -> Iterator[Servers]:
    """Start etcd and nats-server (JetStream) on free 127.0.0.1 ports; stop them on exit."""
    client, peer, nats = free_port(), free_port(), free_port()
    etcd_url = f"http://127.0.0.1:{client}"
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for name, argv in (
            ("etcd", [
                "etcd", "--name", "flexkvtest", "--data-dir", str(workdir / "etcd"),
                "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"flexkvtest=http://127.0.0.1:{peer}",
            ]),
            ("nats", ["nats-server", "-a", "127.0.0.1", "-p", str(nats), "-js", "-sd", str(workdir / "nats")]),
        ):
            log = open(workdir / f"{name}.log", "wb")  # closed in finally
            logs.append(log)
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        wait_for(lambda: _etcd_healthy(etcd_url), timeout, f"etcd on {etcd_url} (log: {workdir / 'etcd.log'})", 0.1)
        wait_for(lambda: _nats_ready(nats), timeout, f"nats-server on port {nats} (log: {workdir / 'nats.log'})", 0.1)
        yield Servers(etcd_url=etcd_url, nats_url=f"nats://127.0.0.1:{nats}")
    finally:
        for proc in procs:
            _stop(proc)
        for log in logs:
            log.close()
