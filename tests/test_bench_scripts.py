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


def test_bench_train_kernel_kinds_idle(monkeypatch):
    """The profile summary of bench_train: busy time merges overlapping kernels, idle stretches are
    the holes between them, longest first, with the kernels on either side."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_train

    # (name, kind, ms, (start us, end us)): a 10 us hole after 'b', a 2 us hole after 'c'
    events = [("a", "matmul", 0.010, (0.0, 10.0)), ("b", "attention", 0.008, (2.0, 20.0)),
              ("in_b", "other", 0.001, (5.0, 6.0)), ("c", "matmul", 0.010, (30.0, 40.0)),
              ("d", "matmul", 0.005, (42.0, 47.0))]
    monkeypatch.setattr(bench_train, "_kernel_events", lambda prof: iter(events))
    text = bench_train.kernel_kinds(None)
    assert "GPU busy 0.04 ms, idle 0.01 ms" in text  # 20 + 10 + 5 us busy in a 47 us span
    assert "0-5 us: 1 (0.00 ms); 5-50 us: 1 (0.01 ms); 50+ us: 0 (0.00 ms)" in text
    gaps = [line for line in text.splitlines() if line.startswith("  ")]
    assert "10.0 us" in gaps[0] and "b -> c" in gaps[0]
    assert "2.0 us" in gaps[1] and "c -> d" in gaps[1]


def test_bench_train_inductor_bandwidth_summary(tmp_path):
    """The sums of Inductor's bandwidth report keep the last call of each compiled graph."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_train

    def section(graph, rows):
        body = "".join(f"{ms:.3f}ms    \t{gb:.3f} GB \t {gb / ms * 1e3:7.2f}GB/s \t 50.00% \t {name}\n"
                       for ms, gb, name in rows)
        return (f"====================\nTRITON KERNELS BANDWIDTH INFO ({graph})\n{body}"
                f"SUMMARY ({graph})\n1.00ms   \t 1.00 GB\t 1000.00GB/s\n\n")

    report = tmp_path / "bw.txt"
    report.write_text(section("/tmp/fwd.py", [(9.0, 9.0, "old")])  # replaced by the later call
                      + section("/tmp/fwd.py", [(0.5, 1.0, "triton_poi_a"), (0.5, 1.0, "triton_poi_a")])
                      + section("/tmp/bwd.py", [(2.0, 6.0, "triton_red_b")]))
    text = bench_train.inductor_bandwidth_summary(str(report), copy_tbs=4.0)
    rows = {line.split()[0]: line.split() for line in text.splitlines()[1:4]}
    assert rows["0"][1:] == ["2", "1.00", "2.00", "2.00", "0.50"]
    assert rows["1"][1:] == ["1", "2.00", "6.00", "3.00", "1.50"]
    assert rows["all"][1:] == ["3", "3.00", "8.00", "2.67", "2.00"]
