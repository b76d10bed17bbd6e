"""Benchmark runs on the nodes of a Ray cluster: `python -m agent run --cluster ray`.

The session runs on the head (the machine that runs `python -m agent`), connected to a
running cluster the usual way: `RAY_ADDRESS`, else the cluster this machine is part of
(`ray.init(address="auto")`). Each slot of the session is a Ray actor on one node
(agent/cluster_node.py `SlotWorker`): on GPUs, K of them (`--gpus K`), as many slots as
every node has K GPUs; on the CPU, one slot per node holding its whole CPU, or with
`--devices cpu:N` N per node, each pinned to its share of the node's cores. A slot is named
by its node and devices ("10.0.0.5/gpu0", "10.0.0.5/cpu1"), so the ledger, the judge's
blocking by slot and `status` take it as they take a local one, and a resume on the same
machines gets the same names.

A run goes to its slot as data: the tracked files of the candidate's commit (a tar of the
slot's worktree on the head) and the fixed files' hashes. The node checks and runs it and
streams the device lock and train.py's stdout lines back (the live W&B run, early
stopping on the node with the rule the head pickled); the head writes the log, the result
and the checkpoint where a local run leaves them. The ledger, the acceptance checks (the
checkpoints are scored on the head's own device), the profile and every decision stay on
the head. A worker or node that dies mid-run loses that run only: it is "lost" (discarded,
never counted, run again elsewhere) and its slot retired; the session goes on with the
others.

What this module must never do: import Ray when it is imported (the GPU machines and users
without the `cluster` extra run everything else without it), record or decide anything on
a node, or let a run whose worker died count for or against anyone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from agent import child, integrity
from agent.config import SessionConfig, SessionStop
from agent.runner import RunOutcome, RunSpec
from agent.slots import Slot
from bench.locks import DeviceLock

START_TIMEOUT_S = 300.0  # for every slot's actor to start and check its node
POLL_S = 0.2  # how often a wait on a node looks whether the session is stopping


def ray_module():
    """Ray, or SessionStop saying how to install it (it is an optional extra)."""
    try:
        import ray
    except ImportError:
        raise SessionStop("--cluster ray needs Ray, which is an optional extra: "
                          "pip install '.[cluster]'") from None
    return ray


def check(config: SessionConfig) -> None:
    """Before a cluster session is made or resumed: Ray is installed, --devices is one a
    cluster takes, and the cluster answers."""
    ray_module()
    if config.device == "cuda" and config.devices not in (None, "all"):
        raise SessionStop(f"--devices {config.devices}: with --cluster ray every GPU of the "
                          "cluster is a slot (--gpus K per slot); leave --devices out")
    if config.device == "cpu" and config.devices is not None and \
            not re.fullmatch(r"cpu:[1-9][0-9]*", config.devices):
        raise SessionStop(f"--devices {config.devices}: with --cluster ray on the CPU give "
                          "cpu:N (N slots per node) or leave it out (one per node)")
    connect()


def connect():
    """Ray, connected to the cluster: RAY_ADDRESS, else the one this machine is part of."""
    ray = ray_module()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "auto"
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as e:
            raise SessionStop(f"--cluster ray: no Ray cluster answers at {address} ({e}); start "
                              "one (`ray start --head`) or set RAY_ADDRESS") from None
    return ray


def slots(config: SessionConfig) -> list[Slot]:
    """The session's slots: an actor per slot, on every alive node of the cluster, each
    checked to hold the dataset (one line naming the nodes that do not, SessionStop)."""
    from agent.cluster_node import SlotWorker
    from data.cache import load_meta

    ray = connect()
    data = config.dataset()
    fingerprint = load_meta(data)["fingerprint"]  # the head's: preflight checked it is here
    worker = ray.remote(SlotWorker)
    planned = []  # (node ip, the slot's name without its GPUs, the actor)
    for node in (n for n in ray.nodes() if n["Alive"]):
        ip, have = node["NodeManagerAddress"], node["Resources"]
        on_node = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
            node["NodeID"], soft=False)
        for name, group, options in _slots_of_node(config, ip, have):
            actor = worker.options(scheduling_strategy=on_node, max_restarts=0,
                                   **options).remote(ip, config.device, group, data, fingerprint)
            planned.append((ip, name, actor))
    if not planned:
        need = f"{config.gpus} GPU(s) on one node" if config.device == "cuda" else "a CPU"
        raise SessionStop(f"--cluster ray: no node of the cluster has {need} for a slot "
                          "(`ray status` lists what it has)")
    actors = [actor for _, _, actor in planned]
    try:
        where = _started(ray, actors)
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        raise
    problems = list(dict.fromkeys(w["problem"] for w in where if w["problem"]))  # per node
    if problems:
        for actor in actors:
            ray.kill(actor)
        raise SessionStop("; ".join(problems))
    return [Slot(name + ",".join(map(str, w["gpus"])), config.device,
                 remote=RemoteSlot(actor, ip, w)) for (ip, name, actor), w in zip(planned, where)]


def _slots_of_node(config: SessionConfig, ip: str, have: Mapping[str, float]
                   ) -> list[tuple[str, tuple[int, int] | None, dict]]:
    """(name, CPU group, actor resources) of each slot node `ip` makes (a GPU slot's name
    gets its GPUs once they are known)."""
    if config.device == "cuda":
        return [(f"{ip}/gpu", None, {"num_gpus": config.gpus, "num_cpus": 0})
                for _ in range(int(have.get("GPU", 0) // config.gpus))]
    cpus = int(have.get("CPU", 0))
    if config.devices is None:
        return [(f"{ip}/cpu", None, {"num_cpus": cpus})] if cpus else []
    per_node = int(config.devices.removeprefix("cpu:"))
    if cpus < per_node:
        return []
    return [(f"{ip}/cpu{i}", (i, per_node), {"num_cpus": cpus // per_node})
            for i in range(per_node)]


def _started(ray, actors: list) -> list[dict]:
    """Each actor's `where()`, once all have started; SessionStop when they cannot."""
    calls = [actor.where.remote() for actor in actors]
    ready, _ = ray.wait(calls, num_returns=len(calls), timeout=START_TIMEOUT_S)
    if len(ready) < len(calls):
        raise SessionStop(f"--cluster ray: {len(calls) - len(ready)} of {len(calls)} slots did "
                          f"not start within {START_TIMEOUT_S:.0f} s: the cluster's devices are "
                          "taken (another session?); `ray status` shows what holds them")
    try:
        return ray.get(calls)
    except ray.exceptions.RayError as e:
        raise SessionStop(f"--cluster ray: a slot's worker could not start: {_last_line(e)} "
                          "(does every node have this repository and its Python "
                          "environment?)") from None


class RemoteSlot:
    """A slot's actor, as the head sees it: `run` makes a run there, `dead` says why its
    worker died (None while it lives)."""

    def __init__(self, actor, node: str, where: Mapping):
        self.actor, self.node, self.where = actor, node, dict(where)
        self.dead: str | None = None

    def describe(self) -> str:
        if self.where["gpus"]:
            return f"node {self.node}, GPU {','.join(map(str, self.where['gpus']))}"
        cores = self.where["cores"]
        return f"node {self.node}, " + (f"cores {','.join(map(str, cores))}" if cores
                                         else "its whole CPU")

    def run(self, spec: RunSpec, expected: Mapping[str, str]) -> RunOutcome:
        """The run of the commit checked out in `spec.worktree`, made on the node; its log,
        result and checkpoint land at `spec`'s paths on the head. A worker that dies makes
        the run "lost" (or "oom" when Ray's memory monitor killed it)."""
        ray = ray_module()
        sent = dataclasses.replace(spec, on_lock=None, on_line=None)  # they stay here
        started = time.monotonic()
        stream = self.actor.run.remote(archive(spec.worktree), sent, dict(expected))
        try:
            done = _follow(ray, stream, spec, self.node)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.NodeDiedError, ray.exceptions.LocalRayletDiedError,
                ray.exceptions.ObjectLostError, ray.exceptions.OutOfMemoryError) as e:
            self.dead = _last_line(e)
            self.close()  # an actor that merely stopped answering must not run on
            # Ray's memory monitor kills the worker of a node that runs out of memory,
            # and says so only in words.
            oom = isinstance(e, ray.exceptions.OutOfMemoryError) or "low on memory" in str(e)
            error = f"the worker of node {self.node} died mid-run: {self.dead}"
            spec.log_path.parent.mkdir(parents=True, exist_ok=True)
            spec.log_path.write_text(f"[runner] {error}\n")
            return RunOutcome("oom" if oom else "lost", None, error,
                              time.monotonic() - started, str(spec.log_path), None)
        return _land(done, spec)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            ray_module().kill(self.actor)


def _follow(ray, stream, spec: RunSpec, node: str) -> dict:
    """The events of a run on `node`, handed to `spec`'s callbacks as they come, until its
    "done"; raises child.Cancelled when the session stops meanwhile (its worker ends with
    the session's)."""
    on_line = spec.on_line
    while True:
        ready, _ = ray.wait([stream], timeout=POLL_S)
        if child.cancelled():
            raise child.Cancelled(f"the run on node {node} was left: the session is stopping")
        if not ready:
            continue
        kind, value = ray.get(next(stream))
        if kind == "done":
            return value
        if kind == "lock" and spec.on_lock is not None:
            spec.on_lock(DeviceLock(Path(value["path"]), value["waited_s"], value["holder"]))
        elif kind == "line" and on_line is not None:
            try:
                on_line(value)
            except Exception:  # a watcher's failure must not touch the run
                on_line = None


def _land(done: Mapping, spec: RunSpec) -> RunOutcome:
    """The node's outcome, with its log, result and checkpoint written at `spec`'s paths."""
    outcome = RunOutcome(**{**done["outcome"], "log_path": str(spec.log_path)})
    for path, data in ((spec.log_path, done["log"]), (spec.checkpoint, done["checkpoint"])):
        if path is not None and data is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(data)
    if outcome.result is not None:
        Path(spec.out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(spec.out_path).write_text(json.dumps(outcome.result))
    return outcome


def archive(worktree: Path) -> bytes:
    """The tracked files of `worktree` (checked out at a candidate's commit) as a tar:
    exactly what the fixed-hash check reads there, links as links."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in integrity.tracked(worktree):
            tar.add(Path(worktree) / path, arcname=path, recursive=False)
    return buffer.getvalue()


def prepare(args: list[str], say: Callable[[str], None] = print) -> int:
    """`python -m data prepare ARGS` on every alive node of the cluster at once (one Ray
    task each, taking no CPU from a session's slots); a line per node. Exit status: 0 when
    every node has the dataset, 1 otherwise."""
    from agent.cluster_node import prepare_here

    ray = connect()
    task = ray.remote(num_cpus=0)(prepare_here)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    calls = [task.options(scheduling_strategy=ray.util.scheduling_strategies.
                          NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(args)
             for n in nodes]
    failed = 0
    for node, call in zip(nodes, calls):
        try:
            done = ray.get(call)
            word = {0: "done", None: "timed out"}.get(done["code"], f"failed (exit "
                                                                     f"{done['code']})")
        except ray.exceptions.RayError as e:  # the node could not even start the command
            done, word = {"host": "?", "last": _last_line(e)}, "failed"
        failed += word != "done"
        say(f"node {node['NodeManagerAddress']} ({done['host']}): {word}: {done['last']}")
    return 1 if failed else 0


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
