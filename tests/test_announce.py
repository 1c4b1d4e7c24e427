"""When the connector announces our tiers before any request (`flexkv_dynamo.announce`), without an engine.

Seeing subscribers uses real ZMQ sockets (the kinds vLLM opens: a PUB that binds a wildcard tcp or an ipc
endpoint, or connects to a subscriber that binds). The timing of the rounds uses a fake clock: it is a
policy, checked as such; the end-to-end proof with real ``dynamo.vllm`` workers and Dynamo's router is
tests/test_dynamo_ops.py.
"""

from __future__ import annotations

import logging

import pytest
import zmq
from support import free_port, wait_for

from flexkv_dynamo.announce import ROUNDS_S, TICK_S, WAIT_S, Announcer, subscriber_watch


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.mark.parametrize("kind", ["tcp-bind", "ipc", "tcp-connect"])
def test_subscribers_of_the_events_socket_are_seen_as_they_connect_and_leave(ctx, kind, tmp_path):
    port = free_port()
    endpoint = {"tcp-bind": f"tcp://*:{port}", "ipc": f"ipc://{tmp_path}/ev",
                "tcp-connect": f"tcp://127.0.0.1:{port}"}[kind]
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    watch = subscriber_watch(endpoint)
    assert watch is not None
    if kind == "tcp-connect":  # vLLM connects to a concrete host; the subscriber binds
        sub.bind(endpoint)
        before = watch()
        pub.connect(endpoint)
    else:
        pub.bind(endpoint)
        before = watch()
        sub.connect(endpoint.replace("*", "127.0.0.1"))
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    assert not before
    one = wait_for(lambda: watch(), 10, "the subscriber's connection")
    assert len(one) == 1
    sub.close(linger=0)
    wait_for(lambda: not watch(), 10, "the connection to go")
    pub.close(linger=0)


@pytest.mark.parametrize("endpoint", ["tcp://*:0", "inproc://events", "ipc://@abstract", "udp://x:1"])
def test_endpoints_that_cannot_be_watched_leave_the_announcer_idle(endpoint):
    assert subscriber_watch(endpoint) is None
    idle = Announcer(None)
    assert not idle.waiting and not idle.holding and not idle.due()


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def run_until(announcer: Announcer, t: FakeTime, until: float) -> int:
    """Idle steps (as vLLM runs them while we wait) until ``until``; how many announced."""
    sent = 0
    while t.now < until:
        before = t.now
        announcer.idle_tick()
        sent += announcer.due()
        if t.now == before:  # it did not wait (nothing to wait for): vLLM's loop moves on anyway
            t.now += TICK_S
    return sent


def test_rounds_follow_each_new_subscriber_and_end_with_the_first_request():
    t = FakeTime()
    connections: set[int] = set()
    a = Announcer(lambda: set(connections), "tcp://*:1", clock=t.clock, sleep=t.sleep)
    assert a.waiting and a.holding  # the engine keeps stepping; the cache keeps its events queued
    assert run_until(a, t, t.now + 5) == 0  # nobody listens: nothing is sent into the void
    assert max(t.slept) <= TICK_S and sum(t.slept) == pytest.approx(5, abs=TICK_S)  # a slow tick, no spinning

    connections.add(7)  # Dynamo's relay connects
    start = t.now
    assert run_until(a, t, start + max(ROUNDS_S) + 1) == len(ROUNDS_S)
    assert not a.holding and a.waiting  # announced; still waiting for other subscribers until a request
    connections.add(8)  # another one (a `flexkv events` tool): rounds for it too
    assert run_until(a, t, t.now + max(ROUNDS_S) + 1) == len(ROUNDS_S)

    a.request_seen()  # from now on vLLM's GPU tier fills: never a Cleared again
    connections.add(9)
    assert not a.waiting and run_until(a, t, t.now + 5) == 0


def test_a_request_before_the_first_round_cancels_it_and_releases_the_queue():
    t = FakeTime()
    a = Announcer(lambda: {1}, "ipc:///x", clock=t.clock, sleep=t.sleep)
    a.idle_tick()  # the subscriber is seen, rounds are scheduled
    a.request_seen()
    t.now += max(ROUNDS_S) + 1
    assert not a.due() and not a.holding and not a.waiting  # events flow as usual with that request


def test_no_subscriber_within_the_wait_lets_the_engine_idle_with_a_warning(caplog):
    t = FakeTime()
    a = Announcer(lambda: set(), "tcp://*:2", clock=t.clock, sleep=t.sleep)
    with caplog.at_level(logging.WARNING, logger="flexkv_dynamo.announce"):
        run_until(a, t, t.now + WAIT_S + 1)
        assert not a.waiting
    assert "no subscriber connected to the KV-events endpoint tcp://*:2" in caplog.text
    assert not a.holding  # the first request publishes the queued events, as before
