"""The node side of a Ray slot: what runs on a node of the cluster for the head.
agent/cluster.py makes `SlotWorker` a Ray actor, one per slot; only that module imports Ray.

A worker starts by checking that its node holds the session's dataset with the head's
fingerprint (the one train.py reports as `data_fingerprint`), and says which GPUs or cores
it has. For each run it gets the candidate as data: the tracked files of its commit (a
tar) and the hashes of the fixed files taken at session start. It unpacks them into a
fresh folder of the node and makes the run exactly as the head makes a local one
(agent/runner.py `run_checked`: the fixed files checked, a mismatch being an integrity
violation, then train.py through the runner, in its sandbox), sending the device lock and
each stdout line back as they come (the live W&B run); then the outcome, the log and, for
an ok run, the checkpoint. `prepare_here` runs `python -m data prepare` on its node.

What this module must never do: run a candidate whose fixed files differ from the head's
hashes, keep a run's files for the next run, or decide or record anything (the head does).
"""

from __future__ import annotations

import dataclasses
import io
import os
import queue
import shutil
import socket
import sys
import tarfile
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from agent import child
from agent.runner import RunSpec, run_checked
from agent.slots import parse_devices
from agent.workspace import git
from data.cache import DataMissingError, cache_dir, load_meta, prepare_command
from data.shards import ShardError, check_whole

SCRATCH_ENV = "SPEEDLOOP_SCRATCH"  # where a node unpacks its runs (default: its temp folder)
PREPARE_TIMEOUT_S = 6 * 3600.0  # a FineWeb download on a slow link


class SlotWorker:
    """One slot on node `node`: on "cuda" the GPUs Ray gave this actor; on the CPU, with
    `cpu_group` (i, n), the i-th of n groups of the node's cores (as `--devices cpu:n` cuts
    them), else the node's whole CPU. `problem` says why the node cannot take runs."""

    def __init__(self, node: str, device: str, cpu_group: tuple[int, int] | None, data: str,
                 fingerprint: str):
        self.node, self.gpus, self.cores = node, (), ()
        self.problem = dataset_problem(node, data, fingerprint)
        if device == "cuda":
            import ray  # only ever imported on a node, where Ray runs this

            self.gpus = tuple(int(g) for g in ray.get_gpu_ids())
        elif cpu_group is not None:
            index, per_node = cpu_group
            try:
                self.cores = parse_devices(f"cpu:{per_node}", "cpu")[index].cores
            except ValueError as e:
                self.problem = self.problem or f"node {node}: {e}"

    def where(self) -> dict:
        """{"host", "gpus", "cores", "problem"}: its devices, and the one line that says why
        its node cannot take runs (None when it can)."""
        return {"host": socket.gethostname(), "gpus": self.gpus, "cores": self.cores,
                "problem": self.problem}

    def run(self, files: bytes, spec: RunSpec, expected: Mapping[str, str]
            ) -> Iterator[tuple[str, object]]:
        """The run `spec` describes (its paths are the head's) of the commit whose tracked
        files `files` holds: yields ("lock", {"path", "waited_s", "holder"}) once it holds
        its device lock, ("line", text) for each stdout line, then ("done", {"outcome":
        RunOutcome's fields, "log": bytes or None, "checkpoint": bytes or None})."""
        folder = Path(tempfile.mkdtemp(prefix="speedloop-run-", dir=scratch()))
        events: queue.Queue = queue.Queue()
        local = dataclasses.replace(
            spec, worktree=folder / "worktree", out_path=folder / "result.json",
            log_path=folder / "run.log", python=sys.executable, gpus=self.gpus,
            cores=self.cores, checkpoint=None if spec.checkpoint is None else folder / "ckpt.pt",
            on_lock=lambda lock: events.put(("lock", {
                "path": str(lock.path), "waited_s": lock.waited_s, "holder": lock.holder})),
            on_line=lambda line: events.put(("line", line)))  # fmt: skip
        # The run in a thread of its own, so that its lines go out while it runs.
        worker = threading.Thread(target=_run, args=(files, local, expected, events), daemon=True)
        try:
            worker.start()
            while True:
                kind, value = events.get()
                if kind == "error":
                    raise value
                if kind == "done":
                    break
                yield kind, value
            worker.join()
            ok = value.status == "ok" and local.checkpoint is not None
            yield "done", {"outcome": dataclasses.asdict(value),
                           "log": _read(local.log_path),
                           "checkpoint": _read(local.checkpoint) if ok else None}
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _run(files: bytes, spec: RunSpec, expected: Mapping[str, str], events: queue.Queue) -> None:
    try:
        unpack(files, Path(spec.worktree))
        events.put(("done", run_checked(spec, expected)))
    except BaseException as e:  # the runner's own failure: the head raises it, as locally
        events.put(("error", e))


def unpack(files: bytes, into: Path) -> None:
    """The tracked files of a commit, as the head's tar holds them, into the new folder
    `into`, in a git index of their own (the fixed-hash check lists the files from it).
    Links stay links; no member may land outside `into` (tarfile's "tar" filter)."""
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(files)) as tar:
        tar.extractall(into, filter="tar")
    git(into, "init", "-q")
    git(into, "add", "-A", "-f")  # -f: a file tracked although ignored is tracked here too


def scratch() -> Path:
    path = Path(os.environ.get(SCRATCH_ENV) or tempfile.gettempdir()) / "speedloop-ray"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None and path.is_file() else None


def dataset_problem(node: str, name: str, fingerprint: str) -> str | None:
    """Why this node cannot run on the dataset `name` with the head's `fingerprint`, in one
    line that names the node and the command that fixes it; None when it can."""
    force = ""
    try:
        found = load_meta(name).get("fingerprint")
        check_whole(name)  # every shard there and whole
        if found == fingerprint:
            return None
        why = (f"its dataset {name!r} has fingerprint {str(found)[:12]}, the head's "
               f"{fingerprint[:12]} (another corpus or tokenizer)")
        force = " --force"
    except DataMissingError:
        why = f"dataset {name!r} is not prepared in {cache_dir()}"
    except (ShardError, ValueError, KeyError) as e:
        why = f"dataset {name!r} is incomplete ({e})"
    command = prepare_command(name)
    return (f"node {node}: {why}: run `{command}{force}` there, or `python -m agent cluster "
            f"prepare {command.removeprefix('python -m data prepare ')}{force}` from the head "
            "for every node")


def prepare_here(args: Sequence[str]) -> dict:
    """`python -m data prepare ARGS` on this node, from this repository's root: {"host",
    "code" (None: over PREPARE_TIMEOUT_S), "last" (its last lines)}."""
    root = Path(__file__).resolve().parent.parent
    done = child.run_tool([sys.executable, "-m", "data", "prepare", *args], root,
                          PREPARE_TIMEOUT_S, merge=True)
    return {"host": socket.gethostname(), "code": done.code, "last": done.last_lines(2)}
