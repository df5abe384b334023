"""``leanopt speed``: the bookkeeping of the optimizer-step benchmark (a tiny parameter set)."""

from __future__ import annotations

import pytest

from leanopt import _native
from leanopt.bench.speed import KERNELS, PATTERNS, format_patterns, format_table, run_patterns, run_speed


def test_speed_rows_floor_and_ratios():
    # by their exact specs: "leanopt sgd-sai" would also match its compiled row, whose compilation takes seconds
    result = run_speed("tiny", only=["torch-adamw-fused", "leanopt:sgd-sai"], steps=2, warmup=1, repeats=1, threads=1,
                       log=lambda s: None)
    rows = {r["name"]: r for r in result["rows"]}
    adamw, sai = rows["torch AdamW (fused)"], rows["leanopt sgd-sai (default)"]
    # bytes a step must move, per fp32 parameter: p read+write, g read, state read+write
    assert adamw["floor_bytes_per_param"] == pytest.approx(4 * (3 + 2 * 2))
    assert sai["floor_bytes_per_param"] == pytest.approx(4 * (3 + 2 * 1), rel=0.01)
    assert adamw["state_bytes_per_param_byte"] == pytest.approx(2.0)
    assert adamw["ratio_to_fused_adamw"] == pytest.approx(1.0)
    for r in (adamw, sai):
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        # the median of per-step ratios (each step against the bandwidth measured before it)
        assert r["ratio_to_floor"] == pytest.approx(r["median_ms"] / r["floor_ms"], rel=0.5)
        assert r["bandwidth_best_gbs"] >= r["bandwidth_copy_gbs"] > 0
        assert r["peak_extra_frac"] is not None and r["peak_extra_frac"] >= 0
    table = format_table(result)
    assert "torch AdamW (fused)" in table and "x floor" in table


def test_unknown_model_or_filter():
    with pytest.raises(ValueError, match="unknown model"):
        run_speed("gpt5")
    with pytest.raises(ValueError, match="no implementation"):
        run_speed("tiny", only=["nothing-like-this"])


@pytest.mark.skipif(not _native.enabled() or _native._compiler() is None, reason="the probes are C kernels")
def test_memory_traffic_patterns():
    result = run_patterns(steps=2, threads=1, nbytes=4 * 2**20)
    rows = {r["pattern"]: r for r in result["rows"]}
    assert set(rows) == set(PATTERNS) | set(KERNELS)
    # bytes per float32 element: each pass reads its distinct tensors and writes its outputs
    assert rows["AdamW; Adam family without mask: pgmv->pmv"]["bytes_per_elem"] == 4 * (4 + 3)
    assert rows["Adam family with mask, C kernel: gmv->mv, pmv->pv"]["bytes_per_elem"] == 4 * (3 + 2 + 3 + 2)
    assert rows["Adam family with mask, compiled: gmv->, pgmv->pmv"]["passes"] == 2
    assert rows["C kernel: AlphaAdam (async mask)"]["bytes_per_elem"] == 40  # its passes' bytes
    for r in rows.values():
        assert r["ns_per_elem"] > 0 and r["best_bandwidth_gbs"] > 0
        # x floor: the pattern's time against floor bytes at the best streaming bandwidth
        floor_ns = r["floor_bytes_per_elem"] / r["best_bandwidth_gbs"]
        assert r["ratio_to_floor"] == pytest.approx(r["ns_per_elem"] / floor_ns, rel=0.5)
    assert "x floor" in format_patterns(result)
