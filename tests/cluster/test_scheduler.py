"""The pure Scheduler: which slice runs where, with no workers and no I/O."""

from __future__ import annotations

from collections import Counter

from qjam_nb.cluster.scheduler import Scheduler

WORKERS = ["w0", "w1", "w2"]


def keys(n: int) -> list[str]:
    return [f"k{i}" for i in range(n)]


def run_to_end(sched: Scheduler) -> list[tuple[str, int]]:
    """Assign and finish tasks, oldest first, until nothing is left; returns every assignment."""
    placed: list[tuple[str, int]] = []
    pending = sched.assign()
    while pending:
        placed += pending
        for worker, index in pending:
            assert sched.done(worker, index)
        pending = sched.assign()
    return placed


def test_uncached_slices_spread_evenly_lowest_index_first():
    sched = Scheduler(WORKERS, keys(6), {}, window=4)
    first = sched.assign()
    assert first == [("w0", 0), ("w1", 1), ("w2", 2), ("w0", 3), ("w1", 4), ("w2", 5)]


def test_a_first_call_gives_every_worker_a_fair_share():
    sched = Scheduler(WORKERS, keys(30), {}, window=2)
    placed = run_to_end(sched)
    assert sorted(index for _, index in placed) == list(range(30))
    assert Counter(worker for worker, _ in placed) == {"w0": 10, "w1": 10, "w2": 10}
    assert sched.done_count == 30


def test_window_limits_tasks_in_flight():
    sched = Scheduler(["w0", "w1"], keys(20), {}, window=3)
    first = sched.assign()
    assert len(first) == 6
    assert Counter(w for w, _ in first) == {"w0": 3, "w1": 3}
    assert sched.assign() == []  # both windows full
    worker, index = first[0]
    assert sched.done(worker, index)
    assert sched.assign() == [(worker, 6)]  # one finished, one more goes out, to that worker


def test_cached_slices_go_to_their_holder():
    k = keys(8)
    holders = {k[i]: {"w1"} for i in range(8) if i % 2} | {k[i]: {"w2"} for i in range(8) if not i % 2}
    sched = Scheduler(WORKERS, k, holders, window=10)
    placed = run_to_end(sched)
    assert {index: worker for worker, index in placed} == {i: "w1" if i % 2 else "w2" for i in range(8)}


def test_idle_worker_does_not_steal_cached_slices():
    k = keys(6)
    sched = Scheduler(WORKERS, k, {key: {"w0"} for key in k}, window=2)
    placed = run_to_end(sched)
    assert {worker for worker, _ in placed} == {"w0"}


def test_a_slice_cached_on_several_workers_goes_to_the_first_one():
    sched = Scheduler(WORKERS, ["a"], {"a": {"w2", "w1"}}, window=4)
    assert sched.assign() == [("w1", 0)]


def test_holders_that_are_not_in_the_call_do_not_count():
    sched = Scheduler(["w0", "w1"], ["a", "b"], {"a": {"gone"}, "b": {"w1"}}, window=4)
    assert sorted(sched.assign()) == [("w0", 0), ("w1", 1)]


def test_mixed_call_uses_cache_and_spreads_the_rest():
    k = keys(6)
    holders = {k[0]: {"w0"}, k[1]: {"w0"}, k[2]: {"w0"}}
    sched = Scheduler(["w0", "w1"], k, holders, window=4)
    placed = run_to_end(sched)
    by_index = {index: worker for worker, index in placed}
    assert [by_index[i] for i in (0, 1, 2)] == ["w0", "w0", "w0"]
    assert [by_index[i] for i in (3, 4, 5)] == ["w1", "w1", "w1"]


def test_lost_worker_slices_are_placed_again():
    sched = Scheduler(["w0", "w1"], keys(6), {}, window=2)
    first = sched.assign()
    assert first == [("w0", 0), ("w1", 1), ("w0", 2), ("w1", 3)]
    assert sched.done("w1", 1)
    back = sched.lost("w0")
    assert back == [0, 2]
    assert sched.alive == {"w1"}
    assert sched.done("w1", 3)
    placed = run_to_end(sched)
    # w1 ends up running every unfinished slice, including the ones w0 had.
    assert sorted(index for _, index in placed) == [0, 2, 4, 5]
    assert {worker for worker, _ in placed} == {"w1"}
    assert sched.done_count == 6


def test_lost_holder_slices_go_to_another_holder_or_the_pool():
    k = keys(4)
    holders = {k[0]: {"w0", "w1"}, k[1]: {"w0"}, k[2]: {"w1"}, k[3]: {"w0"}}
    sched = Scheduler(["w0", "w1"], k, holders, window=1)
    assert sched.assign() == [("w0", 0), ("w1", 2)]
    assert sorted(sched.lost("w0")) == [0, 1, 3]
    assert sched.assign() == []  # w1's window is full
    assert sched.done("w1", 2)
    # Slice 0 is still cached on w1, so it goes first; 1 and 3 come from the pool.
    assert run_to_end(sched) == [("w1", 0), ("w1", 1), ("w1", 3)]


def test_result_from_a_lost_worker_is_stale():
    sched = Scheduler(["w0", "w1"], keys(2), {}, window=4)
    sched.assign()
    sched.lost("w0")
    assert not sched.done("w0", 0)
    assert not sched.done("w1", 0)  # not re-assigned yet
    assert sched.assign() == [("w1", 0)]
    assert sched.done("w1", 0)
    assert not sched.done("w1", 0)  # a duplicate result counts once
    assert sched.lost("w0") == []  # losing it twice changes nothing


def test_pinned_mode_gives_task_i_to_worker_i():
    sched = Scheduler(WORKERS, [None, None, None], {}, window=4, pinned=True)
    assert sorted(sched.assign()) == [("w0", 0), ("w1", 1), ("w2", 2)]
    assert sched.assign() == []


def test_pinned_mode_does_not_let_a_fast_worker_run_twice():
    sched = Scheduler(["w0", "w1"], [None, None], {}, window=4, pinned=True)
    first = sched.assign()
    assert sched.done("w0", 0)
    assert sched.assign() == []
    assert ("w1", 1) in first


def test_pinned_task_of_a_lost_worker_runs_elsewhere():
    sched = Scheduler(["w0", "w1"], [None, None], {}, window=4, pinned=True)
    sched.assign()
    assert sched.lost("w1") == [1]
    assert sched.done("w0", 0)
    assert sched.assign() == [("w0", 1)]


def test_the_window_follows_how_long_slices_take():
    sched = Scheduler(["a", "b"], [None] * 200, {}, window=4)
    for _ in range(20):
        sched.observe(0.0001)  # tiny slices: stream them
    assert sched.window == 64
    for _ in range(40):
        sched.observe(1.0)  # long slices: one or two at a time, so the last ones go to whoever is free
    assert sched.window == 2
    for _ in range(100):
        sched.observe(0.002)
    assert sched.window == 10  # 20 ms of work queued


def test_a_queued_slice_whose_key_was_guessed_wrong_is_placed_by_its_true_key():
    s = Scheduler(["a", "b"], ["k0", "k1", "k2"], {"k0": ("a",), "k1": ("a",), "k2": ("b",)}, window=1)
    assert s.assign() == [("a", 0), ("b", 2)]  # slice 1 waits in a's queue
    s.rekey(1, "new", None)  # cached nowhere under its true key: any worker may take it
    assert s.done("b", 2)
    assert s.assign() == [("b", 1)]


def test_a_slice_in_flight_under_a_wrong_key_is_taken_back_and_handed_out_again():
    s = Scheduler(["a", "b"], ["k0", "k1"], {"k0": ("a",), "k1": ("b",)}, window=4)
    assert sorted(s.assign()) == [("a", 0), ("b", 1)]
    s.rekey(0, "new", "a")
    assert not s.done("a", 0)  # the answer under the old key no longer counts
    assert s.assign() == [("a", 0)]  # out again (a is the least busy, and lowest)
    assert s.done("a", 0)
