"""The benchmark scripts run end to end in their CPU smoke mode (their GPU numbers come from the device)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_attention_smoke(tmp_path):
    out = tmp_path / "att.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_attention.py"), "--smoke",
         "--roofline", "--kernel-time", "--kernel-breakdown", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "roofline at the measured copy rate" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["backend"] for r in rows} >= {"torch", "torch_seq"}
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in rows)
    assert {r["case"] for r in rows} >= {"swin8_shells_C768", "full_2k-8k_C1024", "cross_4k_x_1374"}
