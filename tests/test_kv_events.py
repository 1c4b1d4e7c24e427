"""Our tiers' events as vLLM structs and on the wire (fast; no Dynamo).

vLLM's structs, encoder and publisher are the reference: `vllm_kv` imports vLLM once per session (it
takes many seconds on this machine), so tests that need no vLLM do not pay for it.
"""

from __future__ import annotations

import json
import threading
import time

import msgspec
import pytest
import zmq
from router_harness import vllm_block_hashes
from support import free_port, wait_for

from flexkv_core import events as core
from flexkv_core.layout import Tier
from flexkv_dynamo import events_cli
from flexkv_dynamo.kv_events import (
    check_int_block_hashes,
    encode_event_batch,
    engine_hash_to_int,
    event_frames,
    parse_seq,
    tier_events_enabled,
    to_vllm_events,
)
from flexkv_dynamo.publisher import KvEventPublisher, is_bind_endpoint, request_replay

BS = 16


@pytest.fixture(scope="session")
def vllm_kv():
    return pytest.importorskip("vllm.distributed.kv_events")


def tokens(start: int, n_blocks: int) -> list[int]:
    return list(range(start, start + n_blocks * BS))


def cpu_stored(hashes: list[int], parent: int | None, start: int, tier: Tier = Tier.CPU) -> core.BlockStored:
    return core.BlockStored(tier, hashes, parent, tokens(start, len(hashes)), BS)


# --- mapping -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tier", "medium"), [(Tier.CPU, "CPU_PINNED"), (Tier.SSD, "DISK")])
def test_stored_becomes_vllm_block_stored_with_dynamo_medium(vllm_kv, tier, medium):
    big = (1 << 64) - 1  # the full unsigned 64-bit range survives
    (out,) = to_vllm_events([cpu_stored([7, big], 5, 100, tier)], block_size=BS)
    assert type(out) is vllm_kv.BlockStored
    assert out.block_hashes == [7, big]
    assert out.parent_block_hash == 5
    assert out.token_ids == tokens(100, 2)
    assert out.block_size == BS
    assert out.medium == medium
    assert (out.lora_id, out.lora_name) == (None, None)


@pytest.mark.parametrize(("tier", "medium"), [(Tier.CPU, "CPU_PINNED"), (Tier.SSD, "DISK")])
def test_removed_becomes_vllm_block_removed_with_the_same_medium(vllm_kv, tier, medium):
    (out,) = to_vllm_events([core.BlockRemoved(tier, [3, 4])], block_size=BS)
    assert type(out) is vllm_kv.BlockRemoved
    assert (out.block_hashes, out.medium) == ([3, 4], medium)


def test_root_block_has_no_parent(vllm_kv):
    (out,) = to_vllm_events([cpu_stored([1], None, 0)], block_size=BS)
    assert out.parent_block_hash is None


def test_remote_cleared_and_empty_events_produce_nothing_and_order_is_kept(vllm_kv):
    events = [
        cpu_stored([1], None, 0),
        core.BlockStored(Tier.REMOTE, [2], 1, tokens(BS, 1), BS),  # another node's block: not ours to announce
        core.BlockRemoved(Tier.REMOTE, [2]),
        core.BlockRemoved(Tier.SSD, []),
        core.CacheCleared([Tier.CPU, Tier.SSD]),  # its Removed events already said everything
        core.BlockRemoved(Tier.CPU, [1]),
    ]
    out = to_vllm_events(events, block_size=BS)
    assert [(type(e).__name__, e.block_hashes, e.medium) for e in out] == [
        ("BlockStored", [1], "CPU_PINNED"),
        ("BlockRemoved", [1], "CPU_PINNED"),
    ]
    assert to_vllm_events([core.CacheCleared([Tier.CPU])], block_size=BS) == []


def test_stored_without_all_token_ids_is_refused(vllm_kv):
    # Upstream FlexKV sent token_ids=[]: Dynamo then indexes nothing. We fail loudly instead.
    bad = core.BlockStored(Tier.CPU, [1, 2], None, tokens(0, 1), BS)
    with pytest.raises(ValueError, match=r"2 blocks of 16 tokens carries 16 token ids, expected 32"):
        to_vllm_events([bad], block_size=BS)


def test_block_size_other_than_vllms_is_refused(vllm_kv):
    with pytest.raises(ValueError, match=r"block_size 16, but vLLM's block size is 32"):
        to_vllm_events([cpu_stored([1], None, 0)], block_size=32)


def test_non_core_event_is_refused(vllm_kv):
    with pytest.raises(TypeError, match="not a flexkv_core cache event"):
        to_vllm_events([vllm_kv.AllBlocksCleared()], block_size=BS)


# --- hashes ------------------------------------------------------------------------------------------


def test_engine_hash_to_int_is_the_int_vllm_puts_in_its_events(vllm_kv):
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    hashes = vllm_block_hashes(tokens(0, 3), BS)
    assert len(hashes) == 3 and all(isinstance(h, bytes) and len(h) == 32 for h in hashes)
    assert [engine_hash_to_int(h) for h in hashes] == [maybe_convert_block_hash(h) for h in hashes]
    # The core may hold the converted ints already: converting again changes nothing.
    assert [engine_hash_to_int(engine_hash_to_int(h)) for h in hashes] == [maybe_convert_block_hash(h) for h in hashes]


def test_engine_hash_to_int_rejects_what_is_not_a_u64_hash():
    with pytest.raises(ValueError, match="-1 is not an unsigned 64-bit int"):
        engine_hash_to_int(-1)
    with pytest.raises(ValueError, match="is not an unsigned 64-bit int"):
        engine_hash_to_int(1 << 64)
    with pytest.raises(TypeError, match="str"):
        engine_hash_to_int("abc")  # type: ignore[arg-type]


def test_vllm_bytes_hashes_are_refused_with_the_variable_named():
    check_int_block_hashes({})
    check_int_block_hashes({"VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES": "1"})
    with pytest.raises(ValueError, match="VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0 makes vLLM publish block hashes as bytes"):
        check_int_block_hashes({"VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES": "0"})
    with pytest.raises(ValueError, match="VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES='yes' is not an int"):
        check_int_block_hashes({"VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES": "yes"})


# --- DYNAMO_USE_FLEXKV ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "enabled"),
    [(None, True), ("", True), ("1", True), ("true", True), ("True", True), ("on", True),
     ("0", False), ("false", False), ("FALSE", False), (" off ", False), ("no", False)],
)
def test_tier_events_enabled_by_default_and_off_with_0_or_false(value, enabled):
    env = {} if value is None else {"DYNAMO_USE_FLEXKV": value}
    assert tier_events_enabled(env) is enabled


def test_tier_events_enabled_names_a_bad_value():
    with pytest.raises(ValueError, match=r"DYNAMO_USE_FLEXKV='maybe'"):
        tier_events_enabled({"DYNAMO_USE_FLEXKV": "maybe"})


# --- wire format ---------------------------------------------------------------------------------------


def sample_events(vllm_kv) -> list:
    return to_vllm_events(
        [cpu_stored([11, 12], 10, 0), cpu_stored([13], 12, 2 * BS, Tier.SSD), core.BlockRemoved(Tier.CPU, [11])],
        block_size=BS,
    )


@pytest.mark.parametrize("dp_rank", [0, 3, None])
def test_payload_is_byte_identical_to_vllms_event_batch(vllm_kv, dp_rank):
    events = sample_events(vllm_kv)
    ours = encode_event_batch(events, data_parallel_rank=dp_rank, ts=1234.5)
    theirs = msgspec.msgpack.encode(vllm_kv.KVEventBatch(ts=1234.5, events=events, data_parallel_rank=dp_rank))
    assert ours == theirs
    decoded = msgspec.msgpack.Decoder(vllm_kv.KVEventBatch).decode(ours)
    assert (decoded.ts, decoded.events, decoded.data_parallel_rank) == (1234.5, events, dp_rank)


def test_frames_are_topic_big_endian_seq_payload():
    frames = event_frames("kv-events", 258, b"payload")
    assert frames == [b"kv-events", b"\x00\x00\x00\x00\x00\x00\x01\x02", b"payload"]
    assert parse_seq(frames[1]) == 258
    with pytest.raises(ValueError, match="8 bytes, got 3"):
        parse_seq(b"abc")


def test_bind_or_connect_follows_vllms_rule():
    assert is_bind_endpoint("tcp://*:5557")
    assert is_bind_endpoint("ipc:///tmp/kv")
    assert is_bind_endpoint("inproc://kv")
    assert not is_bind_endpoint("tcp://127.0.0.1:5557")
    assert not is_bind_endpoint("tcp://worker-3:5557")


# --- publisher over real sockets ------------------------------------------------------------------------


def subscriber(endpoint: str, *, bind: bool = False) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    (sock.bind if bind else sock.connect)(endpoint)
    return sock


def publish_until_received(publish, sock: zmq.Socket, timeout: float = 5.0) -> list[bytes]:
    """PUB drops what it sends before the subscription arrives: keep publishing until one gets through."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        publish()
        if sock.poll(50):
            return sock.recv_multipart()
    raise AssertionError("subscriber received nothing")


def test_subscriber_gets_vllm_decodable_batches_in_sequence(vllm_kv):
    events = sample_events(vllm_kv)
    decoder = msgspec.msgpack.Decoder(vllm_kv.KVEventBatch)
    with KvEventPublisher("tcp://127.0.0.1:0", topic="kv-events", bind=True) as pub:
        sub = subscriber(pub.endpoint)
        try:
            first = publish_until_received(lambda: pub.publish(events), sub)
            for _ in range(5):
                pub.publish(events, dp_rank=2)
            received = [first] + [sub.recv_multipart() for _ in range(5)]
        finally:
            sub.close()
    seqs = [parse_seq(f[1]) for f in received]
    assert seqs == list(range(seqs[0], seqs[0] + 6))  # consecutive, no gap, from the first received
    assert all(f[0] == b"kv-events" and len(f) == 3 for f in received)
    batches = [decoder.decode(f[2]) for f in received]
    assert all(b.events == events for b in batches)
    assert batches[0].data_parallel_rank == 0  # the publisher's rank when none is given, as vLLM does
    assert {b.data_parallel_rank for b in batches[1:]} == {2}


def test_first_sequence_number_is_0_and_replay_returns_missed_batches(vllm_kv):
    decoder = msgspec.msgpack.Decoder(vllm_kv.KVEventBatch)
    batches = [to_vllm_events([cpu_stored([100 + i], None, i * BS)], block_size=BS) for i in range(4)]
    with KvEventPublisher("tcp://127.0.0.1:0", bind=True, replay_endpoint="tcp://127.0.0.1:0", buffer_steps=3) as pub:
        # Nobody subscribes: every batch is missed, and the replay buffer keeps the last 3.
        assert [pub.publish(events) for events in batches] == [0, 1, 2, 3]
        got = request_replay(pub.replay_endpoint, 0)
        assert [b.seq for b in got] == [1, 2, 3]
        assert [decoder.decode(b.payload).events for b in got] == batches[1:]
        assert {b.topic for b in got} == {b"kv-events"}
        assert [b.seq for b in request_replay(pub.replay_endpoint, 3)] == [3]
        assert request_replay(pub.replay_endpoint, 4) == []


def test_our_replay_client_speaks_vllms_replay_protocol_and_payloads_match_vllms(vllm_kv, tmp_path):
    # vLLM's own publisher: ipc endpoints bind, as tcp://*:P would.
    vllm_pub = vllm_kv.ZmqEventPublisher(
        data_parallel_rank=0,
        endpoint=f"ipc://{tmp_path}/pub",
        replay_endpoint=f"ipc://{tmp_path}/replay",
        topic="kv-events",
    )
    events = sample_events(vllm_kv)
    sub = subscriber(f"ipc://{tmp_path}/pub")
    try:
        topic, seq, payload = publish_until_received(
            lambda: vllm_pub.publish(vllm_kv.KVEventBatch(ts=time.time(), events=events)), sub
        )
        ts = msgspec.msgpack.decode(payload)[0]
        assert payload == encode_event_batch(events, data_parallel_rank=0, ts=ts)
        assert (topic, len(seq)) == (b"kv-events", 8)
        replayed = wait_for(lambda: request_replay(f"ipc://{tmp_path}/replay", 0), 5, "vLLM's replay")
        assert [b.seq for b in replayed] == list(range(len(replayed)))
        assert parse_seq(seq) in [b.seq for b in replayed]
    finally:
        sub.close()
        vllm_pub.shutdown()


def test_concrete_host_endpoint_connects_to_a_binding_subscriber(vllm_kv):
    port = free_port()
    sub = subscriber(f"tcp://127.0.0.1:{port}", bind=True)
    try:
        with KvEventPublisher(f"tcp://127.0.0.1:{port}") as pub:
            frames = publish_until_received(lambda: pub.publish(sample_events(vllm_kv)), sub)
        assert msgspec.msgpack.Decoder(vllm_kv.KVEventBatch).decode(frames[2]).events == sample_events(vllm_kv)
    finally:
        sub.close()


def test_second_publisher_on_a_taken_port_names_the_endpoint():
    with KvEventPublisher("tcp://127.0.0.1:0", bind=True) as pub:
        with pytest.raises(OSError, match=f"cannot bind KV-event socket to {pub.endpoint}"):
            KvEventPublisher(pub.endpoint, bind=True)


def test_publish_after_close_is_an_error():
    pub = KvEventPublisher("tcp://127.0.0.1:0", bind=True)
    pub.close()
    with pytest.raises(RuntimeError, match="is closed"):
        pub.publish([])


# --- events CLI --------------------------------------------------------------------------------------------


def run_cli_while_publishing(pub: KvEventPublisher, events: list, argv: list[str]) -> int:
    result: list[int] = []
    cli = threading.Thread(target=lambda: result.append(events_cli.main(argv)))
    cli.start()
    deadline = time.monotonic() + 10
    while cli.is_alive() and time.monotonic() < deadline:
        pub.publish(events)  # until the CLI's subscription is in place and it has its --count
        cli.join(0.05)
    cli.join(5)
    assert result, "events CLI did not finish"
    return result[0]


def test_cli_prints_what_was_published(vllm_kv, capsys):
    events = sample_events(vllm_kv)
    with KvEventPublisher("tcp://127.0.0.1:0", bind=True) as pub:
        argv = ["--endpoint", pub.endpoint, "--count", "3", "--json", "--timeout", "10"]
        assert run_cli_while_publishing(pub, events, argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and len({line["seq"] for line in lines}) == 1  # one whole batch
    assert [{k: v for k, v in line.items() if k != "seq"} for line in lines] == [
        {"dp_rank": 0, "type": "BlockStored", "medium": "CPU_PINNED", "tier": "host", "blocks": 2,
         "first_hash": 11, "parent": 10, "tokens": 2 * BS, "block_size": BS},
        {"dp_rank": 0, "type": "BlockStored", "medium": "DISK", "tier": "disk", "blocks": 1,
         "first_hash": 13, "parent": 12, "tokens": BS, "block_size": BS},
        {"dp_rank": 0, "type": "BlockRemoved", "medium": "CPU_PINNED", "tier": "host", "blocks": 1, "first_hash": 11},
    ]


def test_cli_text_output_flags_what_dynamo_would_drop(vllm_kv, capsys):
    bad = [
        vllm_kv.BlockStored(block_hashes=[1, 2], parent_block_hash=None, token_ids=[], block_size=BS,
                            lora_id=None, medium="CPU_PINNED", lora_name=None),
        vllm_kv.BlockRemoved(block_hashes=[5], medium="SSD"),
        vllm_kv.BlockRemoved(block_hashes=[b"\x01" * 32], medium="GPU"),  # VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0
    ]
    with KvEventPublisher("tcp://127.0.0.1:0", bind=True) as pub:
        assert run_cli_while_publishing(pub, bad, ["--endpoint", pub.endpoint, "--count", "3"]) == 0
    first, second, third = capsys.readouterr().out.splitlines()
    assert "BlockStored medium=CPU_PINNED(host) blocks=2 first=1 parent=None tokens=0" in first
    assert "0 token ids for 2 blocks" in first
    assert "BlockRemoved medium=SSD(dropped) blocks=1 first=5" in second
    assert "medium 'SSD' is unknown to Dynamo" in second
    assert "BlockRemoved medium=GPU(device) blocks=1" in third
    assert "block hashes are bytes, not ints: Dynamo drops the whole batch" in third


def test_cli_times_out_with_status_1_when_count_is_not_reached(capsys):
    with KvEventPublisher("tcp://127.0.0.1:0", bind=True) as pub:
        assert events_cli.main(["--endpoint", pub.endpoint, "--count", "1", "--timeout", "0.3"]) == 1
    assert "timeout: 0 of 1 events" in capsys.readouterr().err
