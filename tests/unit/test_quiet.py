"""Logs a peer can provoke: one line per key and period, the held-back ones counted."""

from veil.runtime.quiet import Quieter


def test_one_line_per_key_and_period_says_how_many_were_held_back():
    now = [0.0]
    q = Quieter(period=10, clock=lambda: now[0])
    assert q.allow("10.0.0.1") == 0  # the first: written
    assert [q.allow("10.0.0.1") for _ in range(5)] == [None] * 5  # a retry loop: held back
    assert q.allow("10.0.0.2") == 0  # another peer is its own key
    now[0] = 10.0
    assert q.allow("10.0.0.1") == 5  # the next period: written, with the count
    assert q.allow("10.0.0.1") is None
    assert Quieter.suffix(5) == " (5 more like it held back)" and Quieter.suffix(0) == ""


def test_memory_stays_bounded_whatever_the_number_of_peers():
    q = Quieter(period=10, clock=lambda: 0.0, max_keys=3)
    for i in range(100):
        assert q.allow(f"10.0.{i}.1") == 0
    assert len(q._last) == 3
    assert q.allow("10.0.99.1") is None  # the newest are remembered
    assert q.allow("10.0.0.1") == 0  # the oldest were forgotten: written again
