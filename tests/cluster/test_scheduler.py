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


# -- healing: placement by speed, stealing, speculation (with measured costs) ------------------------


class Costs:
    """What a SpeedBook would say: speeds, the last call's time per slice at speed 1, shipping costs."""

    def __init__(self, speeds: dict[str, float] | None = None, unit: float | None = 0.05,
                 latency: float = 0.001, rate: float = 1e9) -> None:
        self.speeds = speeds or {}
        self.unit = unit
        self.latency, self.rate = latency, rate

    def speed(self, worker: str) -> float:
        return self.speeds.get(worker, 1.0)

    def ship(self, worker: str, nbytes: int) -> float:
        return self.latency + nbytes / self.rate


def simulate(sched: Scheduler, slice_seconds: dict, latency: float = 0.0, computed: dict | None = None) -> dict:
    """Run the scheduler against workers that take ``slice_seconds`` each per slice (seconds, or a
    function of the slice's index), in order, with no round trip: the call's end, who ran what, and
    every (worker, slice, how, source) move. ``computed``: what a worker reports its slices took, if
    not the time they kept it (the rest is its link's)."""
    seconds = {w: t if callable(t) else (lambda i, t=t: t) for w, t in slice_seconds.items()}
    clock = 0.0
    queues: dict[str, list[int]] = {w: [] for w in slice_seconds}
    free_at = dict.fromkeys(slice_seconds, 0.0)
    events = []  # (time a slice ends, worker, slice)
    ran: dict[int, str] = {}
    moves = []

    def hand_out():
        for w, i in sched.assign(clock):
            start = max(free_at[w], clock + latency)
            free_at[w] = start + seconds[w](i)
            events.append((free_at[w], w, i, free_at[w] - start))
        moves.extend(sched.moves)
        sched.moves.clear()

    hand_out()
    for _ in range(100_000):  # (a scheduler that never ends the call fails the test, not hangs it)
        if sched.done_count == len(sched.keys):
            break
        pending = sorted(events)
        check = sched.next_check(clock)
        if check is not None and (not pending or check < pending[0][0]):
            clock = check
            hand_out()
            continue
        end, w, i, took = pending[0]
        events.remove(pending[0])
        clock = end
        if sched.done(w, i, clock, took if computed is None else computed[w]):
            ran[i] = w
        sched.dropped.clear()
        hand_out()
    assert sched.done_count == len(sched.keys), f"the call never ended: {sched.done_count} slices done"
    del queues
    return {"end": clock, "ran": ran, "moves": moves}


def test_cached_slices_are_shared_by_speed():
    k = keys(12)
    holders = {key: {"w0", "w1", "w2"} for key in k}
    sched = Scheduler(WORKERS, k, holders, window=100, costs=Costs({"w0": 1.0, "w1": 1.0, "w2": 0.5}))
    got = Counter(w for w, _ in sched.assign())
    assert got == {"w0": 5, "w1": 5, "w2": 2} or got == {"w0": 5, "w1": 4, "w2": 3}  # 12 * (1, 1, .5) / 2.5


def test_a_restarted_worker_gets_its_share_shipped_when_that_pays():
    k = keys(30)
    holders = {key: {"w0"} if i % 2 else {"w1"} for i, key in enumerate(k)}  # w2 restarted: caches nothing
    sched = Scheduler(WORKERS, k, holders, window=100, costs=Costs(), sizes=[1000] * 30)
    first = sched.assign()
    assert Counter(w for w, _ in first) == {"w0": 10, "w1": 10, "w2": 10}
    rebalanced = [m for m in sched.moves if m[2] == "rebalanced"]
    assert len(rebalanced) == 10 and {m[0] for m in rebalanced} == {"w2"}


def test_a_slice_too_big_to_be_worth_shipping_stays_with_its_holder():
    k = keys(30)
    holders = {key: {"w0"} if i % 2 else {"w1"} for i, key in enumerate(k)}
    # 50 ms of work a slice, 100 MB a slice at 1 GB/s: 0.1 s to ship, so waiting is cheaper.
    sched = Scheduler(WORKERS, k, holders, window=100, costs=Costs(), sizes=[100_000_000] * 30)
    assert Counter(w for w, _ in sched.assign()) == {"w0": 15, "w1": 15}


def test_without_costs_nothing_moves():
    k = keys(30)
    holders = {key: {"w0"} if i % 2 else {"w1"} for i, key in enumerate(k)}
    sched = Scheduler(WORKERS, k, holders, window=100, sizes=[1000] * 30)
    assert Counter(w for w, _ in run_to_end(sched)) == {"w0": 15, "w1": 15}


def test_speeds_1_to_2_split_the_call_1_to_2():
    k = keys(30)
    holders = {key: {"w0", "w1"} for key in k}
    sched = Scheduler(["w0", "w1"], k, holders, window=100, costs=Costs({"w0": 0.5, "w1": 1.0}))
    assert Counter(w for w, _ in sched.assign()) == {"w0": 10, "w1": 20}


def test_idle_workers_steal_a_slow_workers_queue_from_its_tail():
    k = keys(30)
    holders = {key: {WORKERS[i % 3]} for i, key in enumerate(k)}
    # Not told that w0 is slow: it learns it from w0's first slice taking 0.5 s.
    sched = Scheduler(WORKERS, k, holders, window=2, costs=Costs(), sizes=[1000] * 30)
    got = simulate(sched, {"w0": 0.5, "w1": 0.05, "w2": 0.05})
    assert sorted(got["ran"]) == list(range(30))
    stolen = [m for m in got["moves"] if m[2] == "stolen"]
    assert stolen and all(m[3] == "w0" and m[0] in ("w1", "w2") for m in stolen)
    alone = 30 * 0.05 / 2  # w1 and w2 alone
    assert got["end"] <= 1.3 * alone, got["end"]


def test_a_copy_of_a_late_slice_runs_elsewhere_and_the_first_result_wins():
    k = keys(9)
    holders = {key: {WORKERS[i % 3]} for i, key in enumerate(k)}
    costs = Costs()
    sched = Scheduler(WORKERS, k, holders, window=2, costs=costs, sizes=[1000] * 9)
    # w0 stops (SIGSTOP): it never finishes anything.
    got = simulate(sched, {"w0": 1e9, "w1": 0.05, "w2": 0.05})
    assert sorted(got["ran"]) == list(range(9))
    assert "w0" not in got["ran"].values()
    copies = [m for m in got["moves"] if m[2] == "speculative"]
    assert copies and all(m[3] == "w0" for m in copies)
    assert got["end"] < 1.0


def test_a_uniform_cluster_neither_steals_nor_copies_tiny_slices():
    k = keys(200)
    holders = {key: {WORKERS[i % 3]} for i, key in enumerate(k)}
    sched = Scheduler(WORKERS, k, holders, window=8, costs=Costs(unit=1e-5, latency=2e-4), sizes=[80] * 200)
    got = simulate(sched, {"w0": 1e-5, "w1": 1.1e-5, "w2": 0.9e-5}, latency=1e-4)
    assert got["moves"] == []
    assert {i: w for i, w in got["ran"].items()} == {i: WORKERS[i % 3] for i in range(200)}


def test_a_slice_stretched_by_the_machine_does_not_make_a_straggler():
    k = keys(90)
    holders = {key: {WORKERS[i % 3]} for i, key in enumerate(k)}
    sched = Scheduler(WORKERS, k, holders, window=2, costs=Costs(unit=1e-3, latency=2e-4), sizes=[80] * 90)
    # w0 was descheduled during its second slice (slice 3): 10 ms instead of 1 ms. Its mean is then
    # 4 times the others', its median is theirs: 9 ms late, with nothing worth shipping.
    got = simulate(sched, {"w0": lambda i: 0.01 if i == 3 else 1e-3, "w1": 1e-3, "w2": 1e-3})
    assert got["moves"] == []
    assert got["ran"] == {i: WORKERS[i % 3] for i in range(90)}


def test_microsecond_slices_twice_as_slow_do_not_make_a_straggler():
    k = keys(400)
    holders = {key: {"w0"} if i % 2 else {"w1"} for i, key in enumerate(k)}
    sched = Scheduler(["w0", "w1"], k, holders, window=8, costs=Costs(unit=1e-6, latency=2e-4), sizes=[80] * 400)
    # w0 computes a slice in 2.5 us, w1 in 1 us; w0's results come every 3 ms (a busy machine), so the
    # call lasts past LATE. A ratio of microseconds measures the machine: only a stall moves w0's slices.
    got = simulate(sched, {"w0": 3e-3, "w1": 1e-5}, computed={"w0": 2.5e-6, "w1": 1e-6})
    assert got["moves"] == []


def test_the_first_result_of_a_copied_slice_counts_once_and_drops_the_other():
    k = keys(2)
    sched = Scheduler(["w0", "w1"], k, {k[0]: {"w0"}, k[1]: {"w1"}}, window=2, costs=Costs(), sizes=[10, 10])
    assert sorted(sched.assign(0.0)) == [("w0", 0), ("w1", 1)]
    assert sched.done("w1", 1, 0.05, 0.05)
    assert sched.assign(1.0) == [("w1", 0)]  # slice 0 is late on w0: a copy on w1
    assert sched.moves == [("w1", 0, "speculative", "w0")]
    assert sched.done("w1", 0, 1.06, 0.05)
    assert sched.dropped == [("w0", 0)]
    assert not sched.done("w0", 0, 2.0, 2.0)  # the late original: ignored
    assert sched.done_count == 2


def test_a_lost_worker_whose_slice_has_a_copy_running_is_not_placed_again():
    k = keys(2)
    sched = Scheduler(["w0", "w1"], k, {k[0]: {"w0"}, k[1]: {"w1"}}, window=2, costs=Costs(), sizes=[10, 10])
    sched.assign(0.0)
    assert sched.done("w1", 1, 0.05, 0.05)
    assert sched.assign(1.0) == [("w1", 0)]
    assert sched.lost("w0") == []
    assert sched.assign(1.0) == []
    assert sched.done("w1", 0, 1.06, 0.05)


def test_what_a_call_measured_of_each_worker():
    k = keys(4)
    sched = Scheduler(["w0", "w1"], k, {}, window=2, costs=Costs())
    sched.assign(0.0)
    assert sched.done("w0", 0, 0.1, 0.1)
    assert sched.done("w0", 2, 0.2, 0.1)
    assert sched.done("w1", 1, 0.3, 0.3)
    # w1's slice 3 has run since 0.3 and it is 1.5 now: longer than its average, so it counts.
    m = sched.measured(1.5)
    assert m["w0"] == (2, 0.1)
    assert m["w1"][0] == 1 and abs(m["w1"][1] - (0.3 + 1.2) / 2) < 1e-9
