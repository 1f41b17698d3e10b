"""The state a restarted daemon takes over: replay, torn tails, compaction, corruption."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest

from scachefs import state
from scachefs.state import FileRecord, NodeRecord, StateError, StateLog


@pytest.fixture
def log() -> Iterator[StateLog]:
    fd = state.create_memfd("test-state")
    log = StateLog(fd)
    yield log
    log.close()
    os.close(fd)


def node(nodeid: int, nlookup: int = 1, name: bytes = b"f") -> NodeRecord:
    return NodeRecord(nodeid, 1, nlookup, 0o100644, 64769, nodeid + 1000, name, b"\x01" * 12)


def test_a_fresh_state_is_not_initialized_until_started(log: StateLog) -> None:
    assert not log.initialized()
    with pytest.raises(StateError):
        log.load()
    log.start(45, 0x1234, True)
    snap = log.load()
    assert (snap.proto_minor, snap.flags, snap.passthrough, snap.generation) == (45, 0x1234,
                                                                                 True, 0)
    assert snap.nodes == {} and snap.files == {} and snap.dirs == {}


def test_records_replay_to_the_latest_state(log: StateLog) -> None:
    log.start(45, 0, False)
    log.append(*state.node_record(node(5)))
    log.append(*state.node_record(node(6)))
    log.append(*state.node_record(node(5, nlookup=3, name=b"renamed")))
    log.append(*state.gone(state.NODE_GONE, 6))
    log.append(*state.file_record(FileRecord(9, 5, os.O_RDWR, state.FILE_PASSTHROUGH, 2)))
    log.append(*state.file_record(FileRecord(10, 5, os.O_RDONLY, state.FILE_LAYER, 0)))
    log.append(*state.gone(state.FILE_GONE, 10))
    log.append(*state.dir_record(11, 1))
    log.set_next_fh(12)
    snap = StateLog(log.fd).load()  # a successor maps the same memfd
    assert snap.nodes == {5: node(5, nlookup=3, name=b"renamed")}
    assert snap.files == {9: FileRecord(9, 5, os.O_RDWR, state.FILE_PASSTHROUGH, 2)}
    assert snap.dirs == {11: 1} and snap.next_fh == 12


def test_a_torn_record_ends_the_log_there(log: StateLog) -> None:
    log.start(45, 0, False)
    log.append(*state.node_record(node(5)))
    end_of_first = log._end
    log.append(*state.node_record(node(6)))
    # The daemon died in the middle of writing the second record.
    base = state.HEADER_SIZE + log._active * state.REGION_SIZE
    log._map[base + end_of_first + 30] ^= 0xFF
    snap = StateLog(log.fd).load()
    assert set(snap.nodes) == {5}


def test_compaction_keeps_the_live_tables_and_drops_the_history(log: StateLog) -> None:
    log.start(45, 0, False)
    for i in range(1000):
        log.append(*state.node_record(node(100 + i % 10, nlookup=i)))
    before = StateLog(log.fd).load()
    records = [state.node_record(n) for n in before.nodes.values()]
    log.compact(records)
    after = StateLog(log.fd).load()
    assert after.nodes == before.nodes
    log.append(*state.gone(state.NODE_GONE, 100))  # appends go to the new region
    assert 100 not in StateLog(log.fd).load().nodes


def test_records_left_from_an_older_epoch_are_never_replayed(log: StateLog) -> None:
    log.start(45, 0, False)
    for i in range(50):
        log.append(*state.node_record(node(i + 2)))
    log.compact([state.node_record(node(2))])  # region 1, epoch 2
    log.compact([state.node_record(node(3))])  # region 0 again, epoch 3: old records behind
    snap = StateLog(log.fd).load()
    assert set(snap.nodes) == {3}


def test_generation_and_cause_survive(log: StateLog) -> None:
    log.start(45, 0, False)
    assert log.begin_generation("crashed: killed by SIGKILL", 1234) == 1
    assert log.begin_generation("upgrade", 5678) == 2
    snap = StateLog(log.fd).load()
    assert (snap.generation, snap.restarts, snap.cause, snap.last_restart_ns) == (
        2, 2, "upgrade", 5678)


def test_random_corruption_never_yields_a_record_that_was_not_written(log: StateLog) -> None:
    log.start(45, 0, False)
    written = [node(i + 2, nlookup=i) for i in range(40)]
    for n in written:
        log.append(*state.node_record(n))
    rng = random.Random(7)
    base = state.HEADER_SIZE
    for _ in range(200):
        offset = base + rng.randrange(0, log._end)
        old = log._map[offset]
        log._map[offset] = old ^ (1 << rng.randrange(8))
        try:
            snap = StateLog(log.fd).load()
        except StateError:
            pass
        else:
            # Whatever survives is a prefix of what was written, record for record.
            assert list(snap.nodes.values()) == written[:len(snap.nodes)]
        log._map[offset] = old


def test_the_compaction_threshold_follows_the_live_tables_across_takeovers(
        log: StateLog) -> None:
    """Issue 17 item 4: a successor's threshold used to be 4x the log it replayed."""
    log.start(45, 0, False)
    for takeover in range(4):
        for i in range(100_000):  # churn: the same few nodes again and again (~10 MiB)
            log.append(*state.node_record(node(2 + i % 8, nlookup=i + 1)))
        assert log.needs_compaction(), takeover
        assert len(log.load().nodes) == 8  # a successor replays the log ...
        assert log.needs_compaction(), takeover  # ... and still compacts it at once
        log.compact([state.node_record(node(2 + i)) for i in range(8)])
        assert not log.needs_compaction()


def test_a_full_region_is_compacted_by_the_write_that_fills_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17 item 4: a full region never turns into an error for the request."""
    from scachefs.takeover import Journal

    monkeypatch.setattr(state, "REGION_SIZE", 1 << 20)
    fd = state.create_memfd("test-state")
    small = StateLog(fd)
    try:
        small.start(45, 0, False)
        journal = Journal(small)

        class Tables:  # what a compaction reads of the file system: its live tables
            table: list[object] = []
            files: dict[int, object] = {}
            dirs: dict[int, object] = {}

        journal.fs = Tables()  # type: ignore[assignment]
        for i in range(100_000):  # ~7 MiB of records through a 1 MiB region
            journal._append(*state.node_record(node(2 + i % 4, nlookup=i + 1)))
        assert not journal.failed
        snap = small.load()
        assert {n.nodeid: n.nlookup for n in snap.nodes.values()} == {
            2 + i % 4: i + 1 for i in range(100_000 - 4, 100_000)}
    finally:
        small.close()
        os.close(fd)
