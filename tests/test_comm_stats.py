"""CommStats: the counters count every collective, the per-call log keeps only the last LOG_SIZE."""
import tracemalloc

from sf2dist.comm import LOG_SIZE, CommStats


def record_many(stats: CommStats, count: int, offset: int = 0) -> None:
    for i in range(offset, offset + count):
        stats.record("all_reduce" if i % 2 else "all_gather", 1000 + i, 0.5)


def test_log_keeps_the_last_calls_and_counters_count_all_of_them():
    stats = CommStats()
    count = 3 * LOG_SIZE + 5
    record_many(stats, count)
    assert len(stats.log) == LOG_SIZE
    assert list(stats.log) == [("all_reduce" if i % 2 else "all_gather", 1000 + i) for i in range(count - LOG_SIZE, count)]
    snapshot = stats.snapshot()
    odd = range(1, count, 2)
    even = range(0, count, 2)
    assert snapshot["all_reduce"] == {"calls": len(odd), "bytes": sum(1000 + i for i in odd), "seconds": 0.5 * len(odd)}
    assert snapshot["all_gather"] == {"calls": len(even), "bytes": sum(1000 + i for i in even), "seconds": 0.5 * len(even)}
    stats.reset()
    assert len(stats.log) == 0 and stats.snapshot() == {}
    record_many(stats, 3)
    assert list(stats.log) == [("all_gather", 1000), ("all_reduce", 1001), ("all_gather", 1002)]


def test_memory_stays_bounded_however_many_calls_are_recorded():
    stats = CommStats()
    tracemalloc.start()
    try:
        record_many(stats, 2 * LOG_SIZE)  # the log is full, of entries made while tracing
        full, _ = tracemalloc.get_traced_memory()
        record_many(stats, 50 * LOG_SIZE, offset=2 * LOG_SIZE)  # 200k more calls
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A list would have grown by 200k tuples (over 10 MB); the full log only replaces entries.
    assert after - full < 16 * 1024, f"recording 200k more calls grew memory by {after - full} bytes"
    assert len(stats.log) == LOG_SIZE
    assert sum(kind["calls"] for kind in stats.snapshot().values()) == 52 * LOG_SIZE
