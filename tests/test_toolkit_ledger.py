"""The toolkit ledger: metadata, per-rank records, merging (DATA.md section 2), sharding, run_stage."""

import os

import pandas as pd
import pytest

from dataset_toolkits import ledger
from dataset_toolkits.stage import AssetError, Stage, run_stage


def _sha(i: int) -> str:
    return f"{i:064x}"


def _meta(root, n=6):
    df = pd.DataFrame({"sha256": [_sha(i) for i in range(n)], "file_identifier": [f"f{i}" for i in range(n)],
                       "aesthetic_score": [5.0] * n, "captions": [None] * n})
    df = ledger.ensure_flag_columns(str(root), df)
    ledger.write_metadata(str(root), df)
    return df


def test_records_tolerate_a_killed_writer(tmp_path):
    ledger.append_record(str(tmp_path), "voxelized", 0, _sha(1), {"voxelized": True, "num_voxels": 7},
                         ["voxelized", "num_voxels"])
    with open(tmp_path / "voxelized_0.csv", "a") as f:
        f.write(_sha(2)[:20])  # half-written line, no newline
    rec = ledger.read_records(str(tmp_path / "voxelized_0.csv"))
    assert list(rec["sha256"]) == [_sha(1)] and rec["num_voxels"].tolist() == [7]
    ledger.append_record(str(tmp_path), "voxelized", 0, _sha(3), {"voxelized": True, "num_voxels": 9},
                         ["voxelized", "num_voxels"])  # the partial line is terminated, not glued on
    rec = ledger.read_records(str(tmp_path / "voxelized_0.csv"))
    assert list(rec["sha256"]) == [_sha(1), _sha(3)]
    with pytest.raises(ValueError, match="lacks columns"):
        ledger.append_record(str(tmp_path), "voxelized", 0, _sha(4), {"voxelized": True}, ["voxelized", "num_voxels"])


def test_merge_semantics(tmp_path):
    root = str(tmp_path)
    _meta(root)
    os.makedirs(tmp_path / "features" / "dinov2_vitl14_reg")
    ledger.append_record(root, "downloaded", 0, _sha(0), {"local_path": "raw/a.glb"}, ["local_path"])
    ledger.append_record(root, "rendered", 1, _sha(0), {"rendered": True}, ["rendered"])
    ledger.append_record(root, "voxelized", 0, _sha(1), {"voxelized": True, "num_voxels": 123},
                         ["voxelized", "num_voxels"])
    ledger.append_record(root, "feature_dinov2_vitl14_reg", 0, _sha(2), {"feature_dinov2_vitl14_reg": True},
                         ["feature_dinov2_vitl14_reg"])
    ledger.append_record(root, "rendered", 0, _sha(99), {"rendered": True}, ["rendered"])  # unknown row
    ledger.append_failure(root, "rendered", 0, _sha(3), "unreadable file x.glb:\nboom")
    meta, counts = ledger.merge_records(root, ledger.read_metadata(root))
    m = meta.set_index("sha256")
    assert m.loc[_sha(0), "local_path"] == "raw/a.glb" and pd.isna(m.loc[_sha(1), "local_path"])
    assert m["rendered"].tolist() == [True, False, False, False, False, False]
    assert m.loc[_sha(1), "num_voxels"] == 123 and m["num_voxels"].dtype == "int64"
    assert m["feature_dinov2_vitl14_reg"].dtype == bool and m.loc[_sha(2), "feature_dinov2_vitl14_reg"]
    assert _sha(99) not in m.index
    assert counts["rendered"] == 1
    left = sorted(os.listdir(root))
    assert "rendered_0.csv" not in left and "failed_rendered_0.csv" in left
    assert len(os.listdir(tmp_path / "merged_records")) == 5
    fails = ledger.read_failures(root, "rendered")
    assert fails["reason"].tolist() == ["unreadable file x.glb: | boom"]
    ledger.write_metadata(root, meta)
    again = ledger.read_metadata(root)
    assert again["rendered"].dtype == bool and again["num_voxels"].tolist() == m["num_voxels"].tolist()
    assert "failed (not done): 1" in ledger.statistics_text(root, again)


def test_shard_partitions():
    df = pd.DataFrame({"sha256": [_sha(i) for i in range(10)]})
    parts = [ledger.shard(df, r, 3) for r in range(3)]
    assert sum(len(p) for p in parts) == 10
    assert pd.concat(parts)["sha256"].tolist() == df["sha256"].tolist()
    with pytest.raises(ValueError):
        ledger.shard(df, 3, 3)


def _process(root, row, ctx):
    if row["sha256"] == _sha(2):
        raise AssetError("no geometry")
    if row["sha256"] == _sha(3):
        raise ZeroDivisionError("bug")
    return {"voxelized": True, "num_voxels": int(row["sha256"], 16), "_warnings": ["w"]}


def _done_on_disk(root, row):
    return {"voxelized": True, "num_voxels": 0} if row["sha256"] == _sha(4) else None


def test_run_stage_records_failures_and_resumes(tmp_path):
    root = str(tmp_path)
    _meta(root)
    stage = Stage(name="voxelized", columns=("voxelized", "num_voxels"), process=_process,
                  check_done=_done_on_disk)
    c = run_stage(stage, root, progress=False)
    assert c == {"total": 6, "already_done": 0, "found_on_disk": 1, "skipped_failed": 0, "processed": 3,
                 "failed": 2, "warnings": 3}
    meta = ledger.read_metadata(root).set_index("sha256")
    assert meta["voxelized"].sum() == 4 and meta.loc[_sha(5), "num_voxels"] == 5
    reasons = ledger.read_failures(root, "voxelized").set_index("sha256")["reason"]
    assert reasons[_sha(2)] == "no geometry" and reasons[_sha(3)].startswith("ZeroDivisionError: bug")
    c = run_stage(stage, root, progress=False)  # resume: nothing redone, failures skipped
    assert c["already_done"] == 4 and c["skipped_failed"] == 2 and c["processed"] == 0
    c = run_stage(stage, root, progress=False, retry_failed=True)
    assert c["failed"] == 2


def test_run_stage_shards_by_rank(tmp_path):
    root = str(tmp_path)
    _meta(root, 7)
    stage = Stage(name="voxelized", columns=("voxelized", "num_voxels"),
                  process=lambda r, row, ctx: {"voxelized": True, "num_voxels": 1})
    c0 = run_stage(stage, root, rank=0, world_size=2, progress=False, merge=False)
    c1 = run_stage(stage, root, rank=1, world_size=2, progress=False, merge=False)
    assert (c0["processed"], c1["processed"]) == (3, 4)
    r0 = set(ledger.read_records(os.path.join(root, "voxelized_0.csv"))["sha256"])
    r1 = set(ledger.read_records(os.path.join(root, "voxelized_1.csv"))["sha256"])
    assert not r0 & r1 and len(r0 | r1) == 7
