"""The chaos suite's measuring tools: the sliding-second count, the harness's own stalls, the
quiet-hours and cap check, and the rebalance pause."""

from __future__ import annotations

import ctypes
import time

from tests.chaos.harness import Pulse, StallWatch, max_in_window, policy_breaches, unmeasured


def test_the_busiest_second_is_half_open() -> None:
    paced = [i * 0.0625 for i in range(40)]  # 16/s, exact in binary: 16 in [t, t + 1)
    assert max_in_window(paced) == 16
    assert max_in_window([*paced, 0.5]) == 17


def test_requests_stamped_right_after_a_stall_are_not_measured() -> None:
    stalls = [(10.0, 11.2)]  # the process did not run from 10.0 to 11.2
    stamps = [9.9, 11.2, 11.21, 11.3, 11.44, 11.46, 12.0]
    assert unmeasured(stamps, stalls) == {1, 2, 3, 4}  # within 0.25 s of its end
    assert unmeasured(stamps, []) == set()


def test_the_watch_records_a_stall_of_its_process() -> None:
    watch = StallWatch()
    watch.start()
    try:
        time.sleep(0.1)
        # hold the interpreter for 0.6 s: a C call made through PyDLL keeps the GIL, so no
        # other thread of the process runs (as when the process gets no CPU)
        hold = ctypes.PyDLL(None).usleep
        hold.argtypes = [ctypes.c_uint]
        hold(600_000)
        time.sleep(0.1)
    finally:
        watch.halt()
        watch.join(2)
    assert any(end - start >= 0.5 for start, end in watch.stalls), watch.stalls


def test_texts_in_quiet_hours_and_past_a_cap_are_counted() -> None:
    from processors.core.campaign import parse_campaigns

    campaigns = parse_campaigns(
        {
            "caps": [{"max": 1, "per": "4h"}],
            "quiet_hours": {"from": "20:00", "to": "09:00", "action": "defer"},
            "campaigns": [
                {
                    "id": "c",
                    "trigger": {"type": "event", "event": "purchase"},
                    "message": {"template": "hi"},
                }
            ],
        }
    )
    zones = {"u1": "UTC", "u2": "UTC"}
    noon, hour = 1_709_294_400_000, 3_600_000  # 2024-03-01 12:00 UTC
    fine = [("u1", "c", noon), ("u1", "c", noon + 4 * hour), ("u2", "c", noon)]
    assert policy_breaches(campaigns, zones, fine) == (0, 0)
    assert policy_breaches(campaigns, zones, [*fine, ("u2", "c", noon + 9 * hour)]) == (1, 0)
    assert policy_breaches(campaigns, zones, [*fine, ("u2", "c", noon + hour)]) == (0, 1)


def test_a_pause_is_the_longest_gap_ending_after_the_change() -> None:
    from processors.settings import Settings

    pulse = Pulse(Settings.load(profile="dev"), {"worker": []})
    pulse.stamps["worker"] = [1000, 1500, 2000, 9000, 9500, 10_000]  # ms
    assert pulse.longest_gap("worker", 2.5, 12.0) == 7.0  # 2.0 -> 9.0 s, across the change
    assert pulse.longest_gap("worker", 9.2, 12.0) == 2.0  # nothing since 10.0 s, up to 12.0
    assert pulse.longest_gap("worker", 0.5, 1.9) == 0.5
    assert pulse.written("worker", 2.0) == 3
