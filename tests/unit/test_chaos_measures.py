"""The chaos suite's measuring tools: the sliding-second count and the harness's own stalls."""

from __future__ import annotations

import ctypes
import time

from tests.chaos.harness import StallWatch, max_in_window, unmeasured


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
