"""benchmarks/bench_decode_step.py on the CPU: the parts that need no GPU."""

import time

from benchmarks import bench_decode_step as B


def test_host_profile_of_decode_steps_names_the_host_work():
    """bench_decode_step's host profile: per step, the functions with the most own time and the
    backend's by cumulative time; a slow host function of the step shows up with its calls and
    time per step."""

    class _Ob:  # stands in for sglang.benchmark.one_batch: decode(ids, batch, runner)
        @staticmethod
        def decode(ids, batch, runner):
            _busy()
            return ids + 1, None

    def _busy():
        t = time.perf_counter()
        while time.perf_counter() - t < 0.002:
            pass

    ids, host = B._host_profile(0, None, None, _Ob, 5)
    assert ids == 5
    names = [e["fn"] for e in host["own"]]
    assert any(n.endswith(":_busy") for n in names), names
    busy = next(e for e in host["own"] if e["fn"].endswith(":_busy"))
    assert busy["calls"] == 1 and busy["cum_ms"] >= 2.0
    assert host["total_ms"] >= busy["own_ms"] > 0
