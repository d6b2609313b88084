"""The open-episodes gauge: changes kept for the end of a batch add up to the same counts as
changes applied one by one, and a recount drops the kept changes (it has seen them)."""

from __future__ import annotations

from streams.episodes import Episodes

CAMPAIGNS = frozenset({"cart", "browse"})


def _values(episodes: Episodes) -> dict[str, int]:
    return {c: episodes.gauge.value(c) for c in sorted(CAMPAIGNS)}


def test_changes_published_per_batch_equal_changes_applied_one_by_one() -> None:
    moves = [
        (0, [], ["cart"]),
        (0, [], ["cart", "browse"]),
        (1, [], ["browse"]),
        (0, ["cart"], []),
        (1, ["browse"], ["cart", "unknown-campaign"]),
        (2, [], ["cart"]),  # a partition this worker does not own: not in the gauge
    ]
    now, later = Episodes(CAMPAIGNS), Episodes(CAMPAIGNS)
    for e in (now, later):
        e.gauge.reset({}, {0, 1})
    for partition, before, after in moves:
        now.note(partition, before, after)
        later.note_later(partition, before, after)
    assert _values(later) == {"browse": 0, "cart": 0}  # nothing published yet
    later.publish()
    assert _values(later) == _values(now) == {"browse": 1, "cart": 2}
    assert later.gauge.counts[2]["cart"] == now.gauge.counts[2]["cart"] == 1


def test_a_recount_drops_the_changes_it_has_seen() -> None:
    episodes = Episodes(CAMPAIGNS)
    episodes.gauge.reset({}, {0})
    episodes.note_later(0, [], ["cart"])
    episodes.recount([], {0})  # the table scan: no user has an open episode
    episodes.publish()
    assert _values(episodes) == {"browse": 0, "cart": 0}
