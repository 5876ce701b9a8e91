"""Scale-out on the CPU (gloo): two "nodes" on one machine (two ``torchrun`` invocations joined by a
c10d rendezvous on 127.0.0.1) train what one process trains with the same global batch; a run
stopped on two processes resumes on one; an elastic restart resumes; a killed node stops the other
with a non-zero exit that names it; bad launches fail fast and write nothing."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_SS_VAE

from trellis.trainers import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TRELLIS_DIST_TIMEOUT": "10", "TRELLIS_RDZV_TIMEOUT": "20"}
TOL = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: str, **trainer_args) -> str:
    cfg = copy.deepcopy(TINY_SS_VAE)
    a = cfg["trainer"]["args"]
    # SGD: weights differ between layouts only by lr x (float rounding of the gradient all-reduce).
    a.update(max_steps=4, i_save=2, batch_split=1, grad_clip=None, i_log=1,
             optimizer={"name": "SGD", "args": {"lr": 0.1}})
    a.pop("batch_size_per_gpu")
    a["batch_size"] = 4
    a.update(trainer_args)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def env(**extra: str) -> dict:
    return {**os.environ, **ENV, **extra}


def train_args(cfg: str, out: str, data: str, *extra: str) -> list[str]:
    return [TRAIN, "--config", cfg, "--output_dir", out, "--data_dir", data, "--device", "cpu", *extra]


def one_process(cfg: str, out: str, data: str, *extra: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *train_args(cfg, out, data, *extra)], capture_output=True, text=True,
                       timeout=120, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def start_node(cfg: str, out: str, data: str, port: int, *extra: str, nproc: int = 1, host: bool = True,
               restarts: int = 0, run_id: str = "test", environ: dict | None = None) -> subprocess.Popen:
    """One "node": ``torchrun`` with a c10d rendezvous on 127.0.0.1:port (``host``: it holds the store)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", str(nproc),
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", run_id,
           "--rdzv_conf", f"is_host={int(host)},join_timeout=20", "--max-restarts", str(restarts),
           "--monitor-interval", "0.5", *train_args(cfg, out, data, *extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=environ or env(), start_new_session=True)


def finish(*procs: subprocess.Popen, timeout: float = 120) -> list[tuple[int, str]]:
    """Waits for every node; on a timeout kills them all and shows what each printed."""
    out = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                kill_node(q)
            texts = [q.communicate()[0] for q in procs]
            shown = "\n".join(f"--- node {i}:\n{t[-4000:]}" for i, t in enumerate(texts))
            raise AssertionError(f"the nodes did not finish within {timeout} s:\n{shown}") from None
        out.append((p.returncode, text))
    return out


def children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def kill_node(p: subprocess.Popen) -> None:
    """SIGKILL a torchrun agent and its workers (they run in sessions of their own)."""
    for pid in [p.pid, *children(p.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def weights(run_dir: str, step: int) -> dict[str, dict[str, torch.Tensor]]:
    return {k: torch.load(ckpt.model_file(run_dir, k, step), weights_only=True) for k in ("encoder", "decoder")}


def assert_close_weights(a: dict, b: dict, atol: float = TOL) -> None:
    for key in a:
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], atol=atol, rtol=1e-4, msg=f"{key}.{name}")


def misc(run_dir: str, step: int) -> dict:
    return torch.load(ckpt.misc_file(run_dir, step), weights_only=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, voxel_root):
    """One process, global batch 4, 4 SGD steps (12 assets: an epoch is 3 steps), saved at 2 and 4."""
    d = tmp_path_factory.mktemp("dist_ref")
    cfg = write_config(str(d / "config.json"))
    out = str(d / "one")
    one_process(cfg, out, voxel_root)
    return cfg, out


def test_two_nodes_match_one_process_and_resume_on_one(tmp_path, voxel_root, reference):
    cfg, ref = reference
    two = str(tmp_path / "two")
    port = free_port()
    a = start_node(cfg, two, voxel_root, port, "--set", "trainer.args.max_steps=2", host=True)
    b = start_node(cfg, two, voxel_root, port, "--set", "trainer.args.max_steps=2", host=False)
    for code, text in finish(a, b):
        assert code == 0, text[-3000:]
    assert_close_weights(weights(ref, 2), weights(two, 2))
    m = misc(two, 2)
    assert m["world_size"] == 2 and len(m["rng"]) == 2 and len(m["data_sampler_per_rank"]) == 2
    # Losses are averaged over ranks: rank 0 logs the global mean, as the single process does.
    with open(os.path.join(ref, "log.jsonl")) as f1, open(os.path.join(two, "log.jsonl")) as f2:
        l1, l2 = [json.loads(x) for x in f1][:2], [json.loads(x) for x in f2]
    assert [e["step"] for e in l2] == [1, 2]
    for e1, e2 in zip(l1, l2):
        assert e2["loss/loss"] == pytest.approx(e1["loss/loss"], rel=1e-5)
        assert e2["status/iou"] == pytest.approx(e1["status/iou"], rel=1e-5)
    # Stopped on two processes, resumed on one: the same weights and data position as never stopping.
    r = one_process(cfg, two, voxel_root)
    assert "resuming a 2-rank checkpoint on 1 rank" in r.stdout
    assert_close_weights(weights(ref, 4), weights(two, 4))
    assert misc(two, 4)["data_sampler"] == misc(ref, 4)["data_sampler"]


def test_two_nodes_of_two_processes_match_one_process(tmp_path, voxel_root, reference):
    cfg, ref = reference
    out = str(tmp_path / "four")
    port = free_port()
    # Also checks the DDP tuning knobs: many small buckets, gradients as views into them.
    e = env(TRELLIS_DDP_BUCKET_MB="0.01", TRELLIS_DDP_GRAD_VIEW="1")
    a = start_node(cfg, out, voxel_root, port, nproc=2, host=True, environ=e)
    b = start_node(cfg, out, voxel_root, port, nproc=2, host=False, environ=e)
    for code, text in finish(a, b):
        assert code == 0, text[-3000:]
    assert_close_weights(weights(ref, 4), weights(out, 4))
    m = misc(out, 4)
    assert m["world_size"] == 4 and len(m["rng"]) == 4
    assert m["data_sampler"] == {"epoch": 1, "idx": 1}  # global position 4 of epoch 1 = 1 sample per rank
    assert sorted(os.listdir(os.path.join(out, "ckpts"))) == sorted(os.listdir(os.path.join(ref, "ckpts")))


def test_elastic_restart_resumes_exactly(tmp_path, voxel_root, reference):
    cfg, ref = reference
    out = str(tmp_path / "elastic")
    port = free_port()
    # Rank 1 crashes at step 3 (once); torchrun restarts both nodes, which resume from step 2.
    e = env(TRELLIS_FAULT_AT_STEP="3", TRELLIS_FAULT_RANK="1", TRELLIS_FAULT_ONCE="1")
    a = start_node(cfg, out, voxel_root, port, host=True, restarts=1, environ=e)
    b = start_node(cfg, out, voxel_root, port, host=False, restarts=1, environ=e)
    (ca, ta), (cb, tb) = finish(a, b)
    assert ca == 0 and cb == 0, (ta + tb)[-4000:]
    assert "injected failure" in ta + tb
    assert "resumed from" in ta + tb and "at step 2" in ta + tb
    assert_close_weights(weights(ref, 4), weights(out, 4))
    m = misc(out, 4)
    assert m["data_sampler"]["epoch"] == 1 and m["data_sampler"]["idx"] * m["world_size"] == 4


def test_killed_node_stops_the_other_and_is_named(tmp_path, voxel_root):
    cfg = write_config(str(tmp_path / "config.json"), max_steps=100000, i_save=0, i_log=5)
    out = str(tmp_path / "kill")
    port = free_port()
    a = start_node(cfg, out, voxel_root, port, host=True)
    b = start_node(cfg, out, voxel_root, port, host=False)
    log = os.path.join(out, "log.jsonl")
    deadline = time.monotonic() + 60
    while not (os.path.isfile(log) and os.path.getsize(log) > 0):
        assert time.monotonic() < deadline and a.poll() is None and b.poll() is None, "training did not start"
        time.sleep(0.2)
    # Node b holds rank 1 (node a hosts the rendezvous and was the first to join); kill it whole.
    kill_node(b)
    t0 = time.monotonic()
    (code, text), = finish(a, timeout=60)
    elapsed = time.monotonic() - t0
    b.communicate()
    assert code != 0
    assert elapsed < 45, f"the surviving node took {elapsed:.0f} s to stop"
    assert "distributed failure" in text, text[-3000:]
    assert "lost rank 1 (node 1" in text or "store" in text, text[-3000:]


def test_nodes_with_different_configs_are_named(tmp_path, voxel_root, reference):
    cfg, _ = reference
    out = str(tmp_path / "mismatch")
    port = free_port()
    a = start_node(cfg, out, voxel_root, port, host=True)
    b = start_node(cfg, out, voxel_root, port, "--set", "trainer.args.seed=7", host=False)
    for code, text in finish(a, b):
        assert code != 0
        assert "not started alike" in text and "rank 1 (node 1" in text and "config" in text, text[-3000:]
    assert not os.path.exists(os.path.join(out, "ckpts")) and not os.path.exists(os.path.join(out, "config.json"))


def hand_node(cfg: str, out: str, data: str, port: int, num_nodes: int, node_rank: int,
              rdzv_timeout: str = "5") -> subprocess.Popen:
    """A node started by hand with the original flags (one process)."""
    cmd = [sys.executable, *train_args(cfg, out, data, "--num_nodes", str(num_nodes), "--node_rank", str(node_rank),
                                       "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", str(port))]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(TRELLIS_RDZV_TIMEOUT=rdzv_timeout), start_new_session=True)


def test_hand_started_nodes_train_and_bad_layouts_fail_fast(tmp_path, voxel_root, reference):
    cfg, ref = reference
    # Two nodes started by hand (--num_nodes/--node_rank/--master_addr/--master_port): same weights.
    out = str(tmp_path / "hand")
    port = free_port()
    procs = [hand_node(cfg, out, voxel_root, port, 2, r, rdzv_timeout="30") for r in (0, 1)]
    for code, text in finish(*procs):
        assert code == 0, text[-3000:]
    assert_close_weights(weights(ref, 4), weights(out, 4))

    # Unreachable master: a clear error within the rendezvous timeout.
    bad = str(tmp_path / "bad")
    t0 = time.monotonic()
    (code, text), = finish(hand_node(cfg, bad, voxel_root, free_port(), 2, 1, rdzv_timeout="3"), timeout=60)
    assert code != 0 and "cannot reach the master at 127.0.0.1" in text, text[-3000:]
    assert time.monotonic() - t0 < 40
    # A master whose second node never comes.
    (code, text), = finish(hand_node(cfg, bad, voxel_root, free_port(), 2, 0, rdzv_timeout="3"), timeout=60)
    assert code != 0 and "rank(s) 1 of 2 never joined" in text, text[-3000:]
    # Nodes that disagree on the world size: both stop, naming it.
    port = free_port()
    procs = [hand_node(cfg, bad, voxel_root, port, 2, 0), hand_node(cfg, bad, voxel_root, port, 3, 1)]
    for code, text in finish(*procs, timeout=60):
        assert code != 0 and "the master expects 2" in text, text[-3000:]
    assert not os.path.exists(os.path.join(bad, "ckpts"))


FAKE_SRUN = """#!/bin/bash
# Test stand-in for srun: drops srun's options, runs the command once per node (SLURM_NNODES), in parallel.
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
pids=()
for _ in $(seq "$SLURM_NNODES"); do "$@" & pids+=($!); done
code=0
for p in "${pids[@]}"; do wait "$p" || code=$?; done
exit $code
"""
FAKE_SCONTROL = """#!/bin/bash
# Test stand-in for scontrol: every node is 127.0.0.1; requeues are written to $SCONTROL_LOG.
if [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; echo 127.0.0.1; exit 0; fi
echo "$@" >> "$SCONTROL_LOG"
"""


def test_sbatch_template_runs_nodes_requeues_and_resumes(tmp_path, voxel_root, reference):
    cfg, ref = reference
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    out, log = str(tmp_path / "slurm_run"), str(tmp_path / "scontrol.log")
    slurm = {"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[1-2]",
             "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "1", "PYTHON": sys.executable, "RDZV_PORT": str(free_port()),
             "MAX_RESTARTS": "0", "SCONTROL_LOG": log}
    cmd = ["bash", os.path.join(ROOT, "slurm", "train.sbatch"), cfg, out, voxel_root, "--device", "cpu",
           "--set", "trainer.args.i_print=1"]
    # First start: rank 1 dies at step 3 -> the job fails and requeues itself.
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=env(**slurm, TRELLIS_FAULT_AT_STEP="3", TRELLIS_FAULT_RANK="1"))
    assert r.returncode != 0
    with open(log) as f:
        assert f.read().split() == ["requeue", "4242"]
    assert ckpt.find_latest(out) == 2
    # The requeued start (SLURM_RESTART_COUNT=1) resumes from step 2 and matches the uninterrupted run.
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=env(**{**slurm, "SLURM_RESTART_COUNT": "1", "RDZV_PORT": str(free_port())}))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    assert_close_weights(weights(ref, 4), weights(out, 4))
    with open(log) as f:
        assert f.read().split() == ["requeue", "4242"]  # no second requeue


def _fake_trainer(n: int, per_gpu: int, world: int, sampler_cls=None):
    from types import SimpleNamespace

    from trellis.datasets.samplers import ResumableSampler

    ds = list(range(n))
    sampler = (sampler_cls or ResumableSampler)(ds, 0, world, shuffle=True, seed=3)
    return SimpleNamespace(sampler=sampler, dataset=ds, batch_size_per_gpu=per_gpu,
                           dist=SimpleNamespace(world_size=world, is_main=False))


@pytest.mark.parametrize("n", [10, 11, 12, 13])
def test_global_batches_do_not_depend_on_the_world_size(n):
    """The global batch of every step (the union of the ranks' batches) is the same for 1, 2 and 4
    ranks, across epochs: epochs hold whole global batches of the unpadded order."""
    from trellis.datasets.samplers import ResumableSampler
    from trellis.trainers.base import Trainer

    global_batch = 4

    def steps(world: int, epochs: int = 3) -> list[list[int]]:
        per = global_batch // world
        ranks = [ResumableSampler(list(range(n)), r, world, shuffle=True, seed=3) for r in range(world)]
        k = Trainer.epoch_steps(_fake_trainer(n, per, world))
        out = []
        for epoch in range(epochs):
            orders = [s.epoch_indices(epoch) for s in ranks]
            for i in range(k):
                out.append(sorted(x for o in orders for x in o[i * per:(i + 1) * per]))
        return out

    one = steps(1)
    assert len(one) == 3 * (n // global_batch)
    assert steps(2) == one and steps(4) == one


def test_data_position_rescales_to_another_world_size():
    from trellis.trainers.base import Trainer
    from trellis.trainers.checkpoint import CheckpointError

    t = _fake_trainer(12, 1, 4)
    assert Trainer._rescale_data_state(t, {"epoch": 2, "idx": 2}, 2, "misc.pt") == {"epoch": 2, "idx": 1}
    t = _fake_trainer(12, 4, 1)
    assert Trainer._rescale_data_state(t, {"epoch": 0, "idx": 1}, 4, "misc.pt") == {"epoch": 0, "idx": 4}
    t = _fake_trainer(12, 1, 3)
    with pytest.raises(CheckpointError, match="does not split evenly over 3 ranks"):
        Trainer._rescale_data_state(t, {"epoch": 0, "idx": 1}, 2, "misc.pt")
