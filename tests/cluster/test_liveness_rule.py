"""The liveness rule on its own, with a clock the test turns: who is busy, who is condemned, and when."""

from __future__ import annotations

from qjam_nb.executors.liveness import MISSES, Liveness
from qjam_nb.transport.base import CpuState, parse_stat

BEAT = 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def started(traffic: int = 0) -> tuple[Liveness, Clock]:
    clock = Clock()
    live = Liveness(BEAT, clock)
    live.start()
    assert live.verdict("w", traffic, False, never) is None  # the first look starts its silence
    return live, clock


def cpu(state: str, ticks: int):
    return lambda: CpuState(state, ticks)


def never(*_):
    raise AssertionError("the CPU is sampled only after a beat of silence")


def test_a_worker_heard_from_is_never_sampled_nor_condemned():
    live, clock = started()
    for traffic in range(1, 50):
        clock.now += 0.9 * BEAT
        assert live.verdict("w", traffic, False, never) is None


def test_silence_with_cpu_standing_still_condemns_after_the_bound_not_before():
    live, clock = started()
    clock.now += 0.5 * BEAT
    assert live.verdict("w", 0, False, never) is None
    verdicts = []
    while clock.now < 100.0 + MISSES * BEAT + 0.01:
        clock.now += 0.5 * BEAT
        verdicts.append((clock.now - 100.0, live.verdict("w", 0, False, cpu("T", 7))))
    condemned = [t for t, v in verdicts if v]
    assert condemned and condemned[0] >= MISSES * BEAT
    assert all(v is None for t, v in verdicts if t < MISSES * BEAT)
    assert "stopped" in next(v for _, v in verdicts if v)


def test_a_worker_burning_cpu_in_silence_is_busy_for_as_long_as_it_burns():
    live, clock = started()
    ticks = 0
    for _ in range(40):  # 20 beats of silence, its CPU time growing
        clock.now += 0.5 * BEAT
        ticks += 50
        assert live.verdict("w", 0, False, cpu("R", ticks)) is None
    # Then it stops using CPU: condemned once the bound has passed since its CPU time last grew.
    stood_still = clock.now
    verdict = None
    while verdict is None and clock.now - stood_still < 2 * MISSES * BEAT:
        clock.now += 0.5 * BEAT
        verdict = live.verdict("w", 0, False, cpu("S", ticks))
    assert verdict and clock.now - stood_still >= MISSES * BEAT - 0.5 * BEAT


def test_a_runnable_worker_waiting_for_a_core_is_not_condemned():
    """On a loaded host a worker may wait for a core, its CPU time standing still: state R is not hung."""
    live, clock = started()
    for _ in range(4 * MISSES):
        clock.now += 0.5 * BEAT
        assert live.verdict("w", 0, False, cpu("R", 7)) is None


def test_traffic_starts_the_silence_again():
    live, clock = started()
    clock.now += (MISSES - 0.5) * BEAT
    assert live.verdict("w", 0, False, cpu("S", 1)) is None
    clock.now += 0.4 * BEAT
    assert live.verdict("w", 1, False, never) is None  # a byte came
    clock.now += (MISSES - 0.5) * BEAT
    assert live.verdict("w", 1, False, cpu("S", 1)) is None


def test_bytes_waiting_unread_are_not_silence():
    """The master itself was busy (a long reduce): what a worker sent meanwhile waits in its pipe."""
    live, clock = started()
    clock.now += 10 * MISSES * BEAT
    assert live.verdict("w", 0, False, never, waiting=lambda: True) is None
    clock.now += MISSES * BEAT - 0.1
    assert live.verdict("w", 0, False, cpu("S", 1), waiting=lambda: False) is None


def test_a_half_read_frame_condemns_whatever_the_cpu_says():
    live, clock = started()
    clock.now += MISSES * BEAT
    verdict = live.verdict("w", 0, True, never)
    assert verdict and "mid-way" in verdict


def test_unreadable_cpu_time_condemns_only_after_twice_the_bound():
    live, clock = started()
    clock.now += MISSES * BEAT + 0.1
    assert live.verdict("w", 0, False, lambda: None) is None
    clock.now += MISSES * BEAT
    verdict = live.verdict("w", 0, False, lambda: None)
    assert verdict and "could not be read" in verdict


def test_checks_come_twice_a_beat():
    live, clock = started()
    assert not live.due()
    clock.now += 0.5 * BEAT
    assert live.due() and not live.due()


def test_proc_stat_lines_are_read_as_the_kernel_writes_them():
    line = "4242 (python3 (odd) name) T 1 4242 4242 0 -1 4194560 100 0 0 0 123 45 0 0 20 0 3 0 99 0 0"
    assert parse_stat(line) == CpuState("T", 168)
    assert parse_stat("garbage") is None
