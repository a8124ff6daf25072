"""SingleFlight: one thread per key at a time, and no lock kept once nobody wants it."""

from __future__ import annotations

import threading
import time

import pytest

from syncer.registry.singleflight import SingleFlight


def test_one_thread_per_key_and_the_map_empties():
    flights: SingleFlight[str] = SingleFlight()
    inside = {"a": 0, "b": 0}
    most = {"a": 0, "b": 0}
    guard = threading.Lock()

    def work(key: str) -> None:
        with flights.lock(key):
            with guard:
                inside[key] += 1
                most[key] = max(most[key], inside[key])
            time.sleep(0.01)
            with guard:
                inside[key] -= 1

    threads = [threading.Thread(target=work, args=(k,)) for k in "ab" * 5]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == {"a": 1, "b": 1}
    assert len(flights) == 0  # every key dropped once its last user left


def test_different_keys_run_in_parallel_and_errors_release():
    flights: SingleFlight[str] = SingleFlight()
    with flights.lock("a"), flights.lock("b"):  # another key: not blocked
        assert len(flights) == 2
    with pytest.raises(RuntimeError), flights.lock("a"):
        raise RuntimeError("boom")
    assert len(flights) == 0
    with flights.lock("a"):  # usable again after the error
        pass
