"""Process-group helpers. Everything works without ``torch.distributed`` being initialised
(one process, rank 0 of 1).

Start-up (``init_process_group``) and failure reporting are built so that no rank waits forever:

* Rendezvous. Under ``torchrun`` the agents have already agreed on the world; the workers join
  through ``env://``. Started by hand (``--num_nodes/--node_rank/--master_addr/--master_port``),
  rank 0 hosts a TCP store, every rank registers its rank and world size there, and rank 0 checks
  that all ranks came, none twice, all with the same world size, within ``TRELLIS_RDZV_TIMEOUT``
  seconds (default 300); otherwise every rank stops with an error that names the missing or
  conflicting ranks.
* Collectives time out after ``TRELLIS_DIST_TIMEOUT`` seconds (default 1800).
* ``check_same_job`` all-gathers a fingerprint of the resolved config and code; a node started
  with another config or code version is named, on every rank.
* ``roll_call`` runs after a communication failure: every surviving rank checks in at the store
  for a few seconds; the ranks that do not are named (with node and host) in the error message.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """A start-up or communication failure of the job (not a bug in one rank's code)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def node_rank(self) -> int:
        """The node of this rank: torchrun's GROUP_RANK, else ``rank // local_world_size``."""
        if "GROUP_RANK" in os.environ:
            return int(os.environ["GROUP_RANK"])
        return self.rank // max(1, self.local_world_size)


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be positive")
    return value


def default_timeout() -> datetime.timedelta:
    """Collective timeout: ``TRELLIS_DIST_TIMEOUT`` seconds (default 1800). A dead rank ends the
    job with an error after this long instead of hanging forever."""
    return datetime.timedelta(seconds=_seconds("TRELLIS_DIST_TIMEOUT", 1800))


def rendezvous_timeout() -> datetime.timedelta:
    """How long ranks wait for each other at start-up: ``TRELLIS_RDZV_TIMEOUT`` seconds (default 300)."""
    return datetime.timedelta(seconds=_seconds("TRELLIS_RDZV_TIMEOUT", 300))


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def restart_count() -> int:
    """How many times torchrun (``--max-restarts``) or SLURM (requeue) restarted this job. torchrun
    counts per node (a node restarted because another failed keeps 0), so after ``check_same_job``
    this is the largest count of any rank."""
    counts = [_JOB_RESTARTS]
    for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        if os.environ.get(name, "").isdigit():
            counts.append(int(os.environ[name]))
    return max(counts)


# The job's store (for the roll call) and every rank's (node, host), set by init / check_same_job.
_STORE: Any = None
_PEERS: list[dict[str, Any]] = []
_JOB_RESTARTS = 0


def init_process_group(info: DistInfo, master_addr: str, master_port: int) -> None:
    """Initialises the default group (gloo on CPU, NCCL on CUDA) when world_size > 1.

    Raises ``DistributedError`` (on every rank, within the rendezvous timeout) when the ranks
    cannot meet: unreachable master, a missing rank, two ranks with one id, different world sizes.
    """
    global _STORE
    if info.world_size <= 1 or dist.is_initialized():
        return
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"timeout": default_timeout()}
    if backend == "nccl":
        kwargs["device_id"] = info.device
    if under_torchrun() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # The agents' store outlives restarts: keys of the previous round are still there, so this
        # round's process group gets a fresh prefix that every rank agrees on.
        store = _connect(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info, is_master=False)
        _STORE = dist.PrefixStore(f"trellis/round{_agree_round(store, info)}", store)
        dist.init_process_group(backend=backend, store=dist.PrefixStore("pg", _STORE), rank=info.rank,
                                world_size=info.world_size, **kwargs)
        return
    if under_torchrun():  # rank 0's worker hosts a fresh store each round
        dist.init_process_group(backend=backend, init_method="env://", rank=info.rank,
                                world_size=info.world_size, **kwargs)
        _STORE = _connect(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info, is_master=False)
        return
    os.environ.setdefault("MASTER_ADDR", master_addr)
    os.environ.setdefault("MASTER_PORT", str(master_port))
    store = _connect(master_addr, master_port, info, is_master=info.rank == 0)
    _register(store, info, f"{master_addr}:{master_port}")
    _STORE = store
    dist.init_process_group(backend=backend, store=dist.PrefixStore("pg", store), rank=info.rank,
                            world_size=info.world_size, **kwargs)


def _connect(addr: str, port: int, info: DistInfo, is_master: bool) -> Any:
    timeout = rendezvous_timeout()
    try:
        return dist.TCPStore(addr, port, is_master=is_master, timeout=timeout, wait_for_workers=False)
    except (RuntimeError, OSError) as e:  # DistNetworkError / DistStoreError are RuntimeErrors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if is_master:
            raise DistributedError(f"rank 0 cannot open the rendezvous store on port {port}: {first} "
                                   "(is the port taken? choose another --master_port)") from None
        raise DistributedError(
            f"rank {info.rank} cannot reach the master at {addr}:{port} within "
            f"{timeout.total_seconds():.0f} s ({first}); is node 0 running, and are --master_addr / "
            "--master_port (or the torchrun rendezvous endpoint) right?") from None


def _wait_key(store: Any, keys: list[str], seconds: float) -> list[str]:
    """Polls ``keys`` for up to ``seconds``; returns those still missing."""
    deadline = time.monotonic() + seconds
    missing = list(keys)
    while True:
        missing = [k for k in missing if not store.check([k])]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.05)


def _agree_round(store: Any, info: DistInfo) -> int:
    """A number unique to this round of the job, agreed by all ranks through a store that may hold
    the keys of earlier rounds. Each rank says hello with a random token; rank 0 takes a new number
    and publishes it with the tokens it read; a rank accepts the number that carries its own token
    (so it can only come from this round's rank 0) and acknowledges it."""
    seconds = rendezvous_timeout().total_seconds()
    deadline = time.monotonic() + seconds
    token = os.urandom(8).hex()
    store.set(f"trellis/hello/{info.rank}", token)
    if info.rank == 0:
        gen = store.add("trellis/generation", 1)
        while True:
            tokens = [store.get(f"trellis/hello/{r}").decode() if store.check([f"trellis/hello/{r}"]) else ""
                      for r in range(info.world_size)]
            tokens[0] = token
            store.set("trellis/current", json.dumps({"gen": gen, "tokens": tokens}))
            missing = [r for r in range(1, info.world_size) if not store.check([f"trellis/ack/{gen}/{r}"])]
            if not missing:
                return gen
            if time.monotonic() > deadline:
                raise DistributedError(f"rank(s) {', '.join(map(str, missing))} of {info.world_size} did not start "
                                       f"within {seconds:.0f} s (TRELLIS_RDZV_TIMEOUT)")
            time.sleep(0.05)
    while True:
        if store.check(["trellis/current"]):
            current = json.loads(store.get("trellis/current").decode())
            if len(current["tokens"]) > info.rank and current["tokens"][info.rank] == token:
                store.set(f"trellis/ack/{current['gen']}/{info.rank}", "1")
                return int(current["gen"])
        if time.monotonic() > deadline:
            raise DistributedError(f"rank {info.rank}: rank 0 did not start within {seconds:.0f} s (TRELLIS_RDZV_TIMEOUT)")
        time.sleep(0.05)


def _register(store: Any, info: DistInfo, where: str) -> None:
    """Hand-started jobs: every rank registers; rank 0 checks the roll and says go or abort."""
    seconds = rendezvous_timeout().total_seconds()
    me = f"{info.rank}:{info.world_size}:{socket.gethostname()}"
    if store.add(f"trellis/join/{info.rank}", 1) > 1:
        store.set("trellis/abort", f"two processes claimed rank {info.rank} (second one on {socket.gethostname()}); "
                                   "check --node_rank and --num_gpus on every node")
    if info.rank == 0:
        store.set(f"trellis/who/{info.rank}", me)
        store.set("trellis/world", str(info.world_size))
        keys = [f"trellis/who/{r}" for r in range(info.world_size)]
        deadline = time.monotonic() + seconds
        missing = keys
        while missing and time.monotonic() < deadline and not store.check(["trellis/abort"]):
            missing = _wait_key(store, missing, 0.5)
        if store.check(["trellis/abort"]):
            raise DistributedError(store.get("trellis/abort").decode())
        if missing:
            ranks = [k.rsplit("/", 1)[1] for k in missing]
            msg = (f"rank(s) {', '.join(ranks)} of {info.world_size} never joined the master at {where} "
                   f"within {seconds:.0f} s; start every node (--num_nodes {{N}} --node_rank {{i}}) "
                   "or raise TRELLIS_RDZV_TIMEOUT")
            store.set("trellis/abort", msg)
            raise DistributedError(msg)
        for k in keys:
            r, w, host = store.get(k).decode().split(":", 2)
            if int(w) != info.world_size:
                msg = (f"rank {r} (host {host}) was started for a world of {w} processes but the master expects "
                       f"{info.world_size}; give every node the same --num_nodes and --num_gpus")
                store.set("trellis/abort", msg)
                raise DistributedError(msg)
        store.set("trellis/go", "1")
        return
    # Not rank 0: compare world sizes as soon as rank 0 has published its own, then wait for go / abort.
    if _wait_key(store, ["trellis/world"], seconds):
        raise DistributedError(f"rank {info.rank}: the master at {where} never published the job layout "
                               f"within {seconds:.0f} s")
    master_world = int(store.get("trellis/world").decode())
    if master_world != info.world_size or info.rank >= master_world:
        msg = (f"rank {info.rank} (host {socket.gethostname()}) was started for a world of {info.world_size} "
               f"processes but the master expects {master_world}; give every node the same --num_nodes and --num_gpus")
        store.set("trellis/abort", msg)
        raise DistributedError(msg)
    # Registered only after the check: a mismatch is found here, before rank 0 could see it, stop and
    # take the store (and this rank's chance to say what is wrong) down with it.
    store.set(f"trellis/who/{info.rank}", me)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if store.check(["trellis/abort"]):
            raise DistributedError(store.get("trellis/abort").decode())
        if store.check(["trellis/go"]):
            return
        time.sleep(0.05)
    raise DistributedError(f"rank {info.rank}: the master at {where} did not start the job within {seconds:.0f} s")


def check_same_job(info: DistInfo, fingerprint: dict[str, str]) -> None:
    """All-gathers ``fingerprint`` (e.g. ``{"config": sha, "code": sha, "version": v}``) with each
    rank's node and host; raises ``ValueError`` on every rank, naming the ranks that differ from
    rank 0, when any entry differs. Also records the peers for ``roll_call``."""
    global _PEERS, _JOB_RESTARTS
    mine = {"rank": info.rank, "node": info.node_rank, "host": socket.gethostname(),
            "world_size": info.world_size, "fingerprint": dict(fingerprint), "restarts": restart_count()}
    peers = all_gather_object(mine)
    _PEERS = peers
    _JOB_RESTARTS = max(p["restarts"] for p in peers)
    ref = peers[0]
    bad = []
    for p in peers[1:]:
        keys = [k for k in sorted(set(ref["fingerprint"]) | set(p["fingerprint"]))
                if ref["fingerprint"].get(k) != p["fingerprint"].get(k)]
        if keys or p["world_size"] != ref["world_size"]:
            what = ", ".join(f"{k} {p['fingerprint'].get(k)} vs {ref['fingerprint'].get(k)}" for k in keys)
            if p["world_size"] != ref["world_size"]:
                what = f"world size {p['world_size']} vs {ref['world_size']}" + (f", {what}" if what else "")
            bad.append(f"rank {p['rank']} (node {p['node']}, host {p['host']}): {what}")
    if bad:
        raise ValueError("the ranks of this job were not started alike (compared with rank 0 on host "
                         f"{ref['host']}): " + "; ".join(bad) +
                         ". Start every node with the same config, --set overrides and code version.")


def describe_rank(r: int) -> str:
    for p in _PEERS:
        if p["rank"] == r:
            return f"rank {r} (node {p['node']}, host {p['host']})"
    return f"rank {r}"


def roll_call(info: DistInfo, seconds: float | None = None) -> list[int] | None:
    """After a communication failure: checks this rank in at the store and waits up to ``seconds``
    (default ``min(10, TRELLIS_DIST_TIMEOUT / 2)``) for the others. Returns the ranks that never
    checked in (dead or hung), or None when the store itself (on the master node) is unreachable."""
    if _STORE is None:
        return None
    if seconds is None:
        seconds = min(10.0, default_timeout().total_seconds() / 2)
    prefix = "trellis/alive"  # the store is private to this round of the job
    try:
        _STORE.set_timeout(datetime.timedelta(seconds=max(1.0, seconds)))
        _STORE.set(f"{prefix}/{info.rank}", "1")
        missing = _wait_key(_STORE, [f"{prefix}/{r}" for r in range(info.world_size)], seconds)
    except (RuntimeError, OSError):
        return None
    return [int(k.rsplit("/", 1)[1]) for k in missing]


def is_comm_failure(e: BaseException) -> bool:
    """Whether ``e`` looks like a failed collective (a peer died, hung or the network broke)."""
    if isinstance(e, DistributedError):
        return False
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "Timed out waiting",
        "Socket Timeout", "connection refused", "Broken pipe"))


def explain_comm_failure(info: DistInfo, e: BaseException) -> str:
    """One message for a failed collective, naming the ranks that stopped answering."""
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    missing = roll_call(info)
    if missing is None:
        who = "the node that holds the job's store (the master / rendezvous host) is unreachable: it died or the network broke"
    elif missing:
        who = "lost " + ", ".join(describe_rank(r) for r in missing) + ": it exited, was killed or hangs"
    else:
        who = "every rank still answers; a collective failed or timed out (see TRELLIS_DIST_TIMEOUT)"
    return f"[rank {info.rank}] distributed failure: {who}. The job stops; restart it to resume from the newest checkpoint. ({first})"


def destroy_process_group() -> None:
    global _STORE, _PEERS, _JOB_RESTARTS
    if dist.is_initialized():
        dist.destroy_process_group()
    _STORE, _PEERS, _JOB_RESTARTS = None, [], 0


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (returns a new tensor; ``t`` is unchanged)."""
    if not dist.is_initialized():
        return t.clone()
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return t.clone()
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
