"""The speed book: each worker's relative speed and link cost, learnt call after call."""

from __future__ import annotations

import pytest

from qjam_nb.cluster.speeds import LinkCost, SpeedBook


def learn_often(book: SpeedBook, per_slice: dict, times: int = 20) -> None:
    for _ in range(times):
        book.learn(per_slice)


def test_a_workers_first_call_is_not_its_speed():
    book = SpeedBook()
    book.learn({"a": (10, 0.05), "b": (10, 0.5)})  # b's first slices: importing numpy, say
    assert book.speed("b") == 1.0
    book.learn({"a": (10, 0.05), "b": (10, 0.5)})
    assert book.speed("b") < 0.7


def test_speeds_are_relative_to_the_fastest_worker():
    book = SpeedBook()
    learn_often(book, {"a": (10, 0.05), "b": (10, 0.10), "c": (5, 0.5)})
    assert book.speed("a") == 1.0
    assert book.speed("b") == pytest.approx(0.5, rel=0.01)
    assert book.speed("c") == pytest.approx(0.1, rel=0.02)
    assert book.unit == 0.05


def test_one_call_moves_a_speed_part_of_the_way_by_its_slices():
    book = SpeedBook()
    book.learn({"a": (4, 0.05), "b": (4, 0.05)})  # (the first call of each is not counted)
    book.learn({"a": (4, 0.05), "b": (4, 0.1)})  # one call, 4 slices each: b seemed 2x slower
    assert book.speed("b") == pytest.approx(0.75, rel=0.01)  # 8 slices' worth watched: 1 + 8/16 * (0.5 - 1)
    book = SpeedBook()
    book.learn({"a": (4, 0.05), "b": (4, 0.05)})
    book.learn({"a": (27, 0.05), "b": (2, 0.5)})  # b 10x slower: 2 slices, but 20 slices' worth of time
    assert book.speed("b") < 0.4


def test_an_unknown_worker_counts_as_the_median():
    book = SpeedBook()
    assert book.speed("new") == 1.0
    learn_often(book, {"a": (10, 0.05), "b": (10, 0.10), "c": (10, 0.10)})
    assert book.speed("new") == pytest.approx(0.5, rel=0.01)


def test_a_worker_that_recovers_is_measured_fast_again():
    book = SpeedBook()
    learn_often(book, {"a": (10, 0.05), "b": (10, 0.5)})
    assert book.speed("b") == pytest.approx(0.1, rel=0.02)
    learn_often(book, {"a": (10, 0.05), "b": (10, 0.05)}, times=6)
    assert book.speed("b") > 0.9


def test_a_worker_that_finished_nothing_weighs_half():
    book = SpeedBook()
    book.learn({"a": (10, 0.05), "b": (10, 0.05)})
    book.learn({"a": (10, 0.05), "b": (10, 0.05)})
    book.learn({"a": (10, 0.05), "b": (0, 5.0)})  # stopped: held a slice 5 s
    assert book.speed("b") == pytest.approx(0.5 * 1.0 + 0.5 * 0.01, rel=0.02)


def test_link_cost_learns_latency_and_rate_from_samples():
    link = LinkCost(0.002, 50e6)
    for _ in range(30):
        link.learn(0, 0.0003)
    assert link.latency == pytest.approx(0.0003, rel=0.01)
    for _ in range(30):
        link.learn(100 << 20, 0.0003 + (100 << 20) / 1e9)
    assert link.rate == pytest.approx(1e9, rel=0.05)
    assert link.seconds(0) == pytest.approx(0.0003, rel=0.01)


def test_forgetting_a_worker():
    book = SpeedBook()
    learn_often(book, {"a": (1, 0.05), "b": (1, 0.1)}, times=2)
    book.link("b")
    book.forget(["b"])
    assert "b" not in book.speeds and "b" not in book.links
