"""The device-trace summary's idle accounting (pure functions; no trace file needed)."""
from jaxserve.tools.trace_summary import idle_gaps, union_ns


def test_idle_gaps_sizes_and_neighbours():
    # kernels a [0, 10us), b [5us, 20us) overlapping; 2 ms idle; c; 50 us idle; d.
    evs = [(0, 10_000, "a"), (5_000, 20_000, "b"), (2_020_000, 2_030_000, "c"),
           (2_080_000, 2_090_000, "d")]
    g = idle_gaps(evs, top=5)
    assert g["counts"] == {"<10us": 0, "10-100us": 1, "0.1-1ms": 0, "1-10ms": 1, ">10ms": 0}
    assert abs(g["seconds"]["1-10ms"] - 2e-3) < 1e-12
    assert abs(g["seconds"]["10-100us"] - 5e-5) < 1e-12
    first = g["largest"][0]
    assert (first["after"], first["before"]) == ("b", "c")     # b ended last, not a
    assert abs(first["at_s"] - 20e-6) < 1e-12
    span = evs[-1][1] - evs[0][0]
    busy = union_ns([(s, e) for s, e, _ in evs])
    assert abs((span - busy) / 1e9 - sum(g["seconds"].values())) < 1e-12


def test_idle_gaps_empty():
    assert idle_gaps([], top=3) == {}
