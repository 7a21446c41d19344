"""--low-memory keeps peak RSS under 0.5 GB above the interpreter baseline on a ~1 GB bf16 file.

Measured by benchmarks/memory.py in a fresh child process (VmHWM - VmRSS after imports)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import memory  # noqa: E402


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_low_memory_peak_rss_on_1gb_file(tmp_path):
    r = memory.measure(size_gb=1.0, width=4096, fmt="block", workdir=str(tmp_path))
    print(f"peak RSS above baseline: {r['above_baseline_bytes'] / 1e6:.0f} MB "
          f"(baseline {r['baseline_bytes'] / 1e6:.0f} MB) for {r['input_bytes'] / 1e9:.2f} GB input")
    assert r["input_bytes"] >= 1e9
    assert r["layers"] == 30
    assert r["above_baseline_bytes"] < 0.5e9
