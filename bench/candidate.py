"""The candidate's processes, as the trusted side sees them: a trainer and a forward worker,
each a sandboxed `python -m bench.worker` that the harness talks to over a Unix socket.

The harness owns everything about them: it starts them in their sandboxes, sends the
trainer every batch it trains on, freezes it (SIGSTOP on every process of its sandbox,
through bench/proctree.py) while an evaluation runs, and reads back only weights files and
logits. Their output is passed on to the harness's stderr with a prefix (`[train]`,
`[forward]`), never parsed.

What this module must never do: import the research surface, unpickle or execute anything
a worker sends (bench/wire.py reads data only; weights are read with torch's weights_only
loader), or let one worker reach the other's socket or files.
"""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from bench import proctree, wire
from bench.sandbox import Sandbox

TAIL_LINES = 20
# OpenMP threads that wait by sleeping, not spinning: with a neighbour on the machine, a
# spinning thread whose sibling lost its core burns the time the sibling needs, and an
# evaluation at 2 threads beside one busy process took 15-42 s instead of ~3 s
# (bench/RESULTS.md). The harness sets the same for itself (train.py).
OMP_WAIT_POLICY = "PASSIVE"
ACCEPT_POLL_S = 0.2


class WorkerFailed(RuntimeError):
    """A worker died or broke the protocol; the message has the tail of its output."""


class WorkerUsageError(ValueError):
    """The worker refused the run's settings (a kernel backend that cannot run here)."""


class Worker:
    """One sandboxed worker process and its connection."""

    role = "worker"

    def __init__(self, sandbox: Sandbox, worktree: Path, argv: list[str], *,
                 read_only=(), writable=(), gpu: bool = False, nproc: int = 1, threads: int = 0):
        self.dir = Path(tempfile.mkdtemp(prefix=f"speedloop-{self.role}-"))
        self.socket_path = self.dir / "sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket_path))
        listener.listen(1)
        launch = [sys.executable, "-m", "bench.worker"]
        if nproc > 1:
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      f"--nproc_per_node={nproc}", "-m", "bench.worker"]
        argv = [*launch, self.role, "--socket", str(self.socket_path), "--threads", str(threads),
                *argv]
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
        env["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.proc = sandbox.popen(argv, worktree, read_only=(self.dir, *read_only),
                                  writable=tuple(writable), gpu=gpu, env=env)
        self._pumps = [threading.Thread(target=self._pump, args=(stream,), daemon=True)
                       for stream in (self.proc.stdout, self.proc.stderr)]
        for pump in self._pumps:
            pump.start()
        # Accepted at the first message, not here: the harness starts every worker before
        # it waits for any, so their interpreters and imports start up side by side.
        self._listener, self._sock = listener, None
        self.frozen: list[int] = []

    @property
    def sock(self) -> socket.socket:
        """The worker's connection, waited for on first use."""
        if self._sock is None:
            try:
                self._sock = self._accept(self._listener)
            finally:
                self._listener.close()
        return self._sock

    def _pump(self, stream) -> None:
        """Pass the worker's output on to our stderr, line by line, prefixed."""
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            self.tail.append(line)
            print(f"[{self.role}] {line}", file=sys.stderr, flush=True)
        stream.close()

    def _accept(self, listener: socket.socket) -> socket.socket:
        listener.settimeout(ACCEPT_POLL_S)
        while True:
            try:
                conn, _ = listener.accept()
                conn.settimeout(None)
                return conn
            except TimeoutError:
                if self.proc.poll() is not None:
                    raise self.failure("exited before it connected") from None

    def failure(self, what: str) -> WorkerFailed:
        code = self.proc.poll()
        if code is None:
            try:
                code = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
        for pump in self._pumps:
            pump.join(timeout=2)
        tail = "\n".join(self.tail).strip() or "nothing on its output"
        return WorkerFailed(f"the {self.role} process {what} (exit code {code}):\n{tail}")

    def send(self, header: dict, arrays=()) -> None:
        try:
            wire.send(self.sock, header, arrays)
        except OSError as e:
            raise self.failure(f"could not be sent a message ({e})") from None

    def recv(self, expect: str, max_array_bytes: int = 0) -> tuple[dict, list[np.ndarray]]:
        try:
            header, arrays = wire.recv(self.sock, max_array_bytes)
        except wire.WireError as e:
            raise self.failure(f"broke the protocol: {e}") from None
        if header.get("op") == "error":
            raise WorkerUsageError(str(header.get("message")))
        if header.get("op") != expect:
            raise self.failure(f"sent {header.get('op')!r} where {expect!r} was due")
        return header, arrays

    def cpu_times(self) -> dict:
        """CPU seconds of every process of the sandbox, as the kernel counts them (nothing
        the worker says): {pid: (process total with its reaped children, {tid: thread})}."""
        return proctree.cpu_times(self.processes())

    # -- freezing --------------------------------------------------------------------------

    def processes(self) -> list[int]:
        """Every process of the worker's sandbox (bwrap and all its descendants)."""
        return proctree.tree(self.proc.pid)

    def freeze(self) -> None:
        """SIGSTOP every process of the sandbox, until no new one appears and each is
        stopped: nothing of the candidate's runs on the CPU while the harness evaluates."""
        try:
            self.frozen = proctree.freeze(self.proc.pid)
        except proctree.StillRunning as e:
            raise self.failure(f"could not be frozen: {e}") from None

    def thaw(self) -> list[str]:
        """SIGCONT the frozen processes; returns what was found pending for them while
        frozen that nobody in the harness sent (a signal from outside the sandbox)."""
        found = proctree.thaw(self.frozen)
        self.frozen = []
        return found

    def close(self) -> None:
        """End the worker and every process of its sandbox: killed, not asked (nothing of it
        is needed any more, and an interpreter's teardown costs a second a worker)."""
        proctree.kill(self.proc.pid)  # unconfined (--no-sandbox), a worker's children too
        self.proc.wait()
        self._listener.close()
        if self._sock is not None:
            self._sock.close()
        for pump in self._pumps:
            pump.join(timeout=2)
        for path in (self.socket_path, self.dir):
            try:
                path.unlink() if path.is_socket() else path.rmdir()
            except OSError:
                pass


class Trainer(Worker):
    """The sandboxed trainer: builds the recipe, warms up, then trains on what it is sent."""

    role = "train"

    def __init__(self, sandbox: Sandbox, worktree: Path, out: Path, *, preset: str,
                 device: torch.device, kernels: str, vocab: int, seed: int, compile: bool,
                 nproc: int = 1, threads: int = 0):
        self.out = Path(out)
        argv = ["--preset", preset, "--device", device.type, "--kernels", kernels,
                "--vocab", str(vocab), "--seed", str(seed), "--out", str(self.out)]
        argv += ["--compile"] if compile else []
        super().__init__(sandbox, worktree, argv, writable=(self.out,),
                         gpu=device.type == "cuda", nproc=nproc, threads=threads)
        self.reported_peak_memory = None

    def ready(self) -> dict:
        """Wait for the warm-up to end: {kernels, flops_per_token, shape, warmup_steps}."""
        header, _ = self.recv("ready")
        return header

    def step(self, x: np.ndarray, y: np.ndarray, progress: float, next_progress: float,
             log: bool) -> dict:
        """Train one step; the reply holds the shape wanted next (and the loss when asked)."""
        self.send({"op": "step", "progress": progress, "next_progress": next_progress,
                   "log": log}, [x, y])
        header, _ = self.recv("want")
        return header

    def save(self, name: str) -> Path:
        """The current weights, synchronised and written to the trainer's folder."""
        self.send({"op": "save", "name": name})
        header, _ = self.recv("saved")
        if header.get("name") != name:
            raise self.failure(f"saved {header.get('name')!r} where {name!r} was asked")
        self.reported_peak_memory = header.get("peak_memory_bytes")  # its word: shown only
        return self.out / name


class Forward(Worker):
    """The sandboxed forward pass for evaluation: weights in, logits out, no targets."""

    role = "forward"

    def __init__(self, sandbox: Sandbox, worktree: Path, weights_dir: Path, *, preset: str,
                 device: torch.device, kernels: str, vocab: int, batch: tuple[int, int] = (0, 0),
                 threads: int = 0):
        self.vocab, self.device, self.batch = vocab, device, batch
        argv = ["--preset", preset, "--device", device.type, "--kernels", kernels,
                "--vocab", str(vocab)]
        # On the CPU the logits come back through a file in memory that both map: the one
        # thing the worker may write. It is frozen while the harness reads them, so what
        # is scored and what is checked are one and the same snapshot.
        self.mapped, writable = None, ()
        if device.type == "cpu" and batch[0]:
            self.mapped_path = Path(tempfile.mkstemp(prefix="speedloop-logits-",
                                                     dir=_memory_dir())[1])
            os.truncate(self.mapped_path, batch[0] * batch[1] * (vocab + 1024) * 4)
            self.mapped = np.memmap(self.mapped_path, dtype=np.float32, mode="r+")
            argv += ["--logits-file", str(self.mapped_path)]
            writable = (self.mapped_path,)
        super().__init__(sandbox, worktree, argv, read_only=(weights_dir,), writable=writable,
                         gpu=device.type == "cuda", threads=threads)
        self.shared = None  # on CUDA, the GPU buffer the worker writes logits into
        self.holding = False  # frozen after its logits arrived, until asked again

    def ready(self) -> None:
        self.recv("ready")
        if self.device.type == "cuda" and self.batch[0]:
            self._share()

    def _share(self) -> None:
        """Give the worker a GPU buffer for the logits; without one (a driver that refuses),
        logits come through the socket: slower, as exact."""
        from bench.cuda_share import CudaShareError, SharedBuffer

        nbytes = self.batch[0] * self.batch[1] * (self.vocab + 1024) * 4
        try:
            buffer = SharedBuffer(nbytes, self.device)
            fd = buffer.export_fd()
        except (CudaShareError, OSError) as e:
            print(f"logits through the host: no shared GPU buffer ({e})", file=sys.stderr)
            return
        try:
            self.send({"op": "share", "nbytes": nbytes})
            socket.send_fds(self.sock, [b"f"], [fd])
        finally:
            os.close(fd)
        header, _ = self.recv("shared")
        if header.get("error"):
            print(f"logits through the host: the worker could not map the shared buffer "
                  f"({header['error']})", file=sys.stderr)
            buffer.close()
            return
        self.shared = buffer

    def thaw(self) -> list[str]:
        self.holding = False
        return super().thaw()

    def _release(self) -> None:
        if self.holding:
            self.thaw()

    def load(self, path: Path) -> None:
        self._release()
        self.send({"op": "load", "path": str(path)})
        self.recv("loaded")

    def logits(self, x: np.ndarray) -> torch.Tensor:
        """The model's logits for the token ids x (B, T): a float32 (B, T, >= vocab) tensor
        on the harness's side, checked for shape. Valid until the next call: it may be the
        shared memory itself."""
        self._release()
        self.send({"op": "logits"}, [x.astype(np.int32)])
        bound = x.size * 4 * (self.vocab + 1024)  # a padded vocabulary, not a flood
        header, arrays = self.recv("logits", max_array_bytes=bound)
        if arrays:
            if len(arrays) != 1:
                raise self.failure(f"sent {len(arrays)} arrays of logits where one was due")
            return torch.from_numpy(arrays[0])
        shape = header.get("shape")
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                           for n in shape) or shape[0] * shape[1] * shape[2] * 4 > bound):
            raise self.failure(f"wrote logits of shape {shape!r} to the shared memory")
        n = shape[0] * shape[1] * shape[2]
        if self.shared is not None:  # one snapshot on the GPU: kernels it queued run on
            return self.shared.tensor[:n].view(*shape).clone()
        if self.mapped is None:
            raise self.failure("wrote logits to shared memory it was never given")
        self.freeze()  # until the next request: nothing changes them while they are read
        self.holding = True
        return torch.from_numpy(self.mapped[:n]).view(*shape)

    def close(self) -> None:
        super().close()
        if self.shared is not None:
            self.shared.close()
            self.shared = None
        if self.mapped is not None:
            self.mapped = None
            self.mapped_path.unlink(missing_ok=True)


def fingerprint_file(path: Path) -> tuple[str, int]:
    """(sha256 of every tensor's name, dtype, shape and bytes in name order, parameter
    count) of a weights file saved by a worker, read with torch's weights_only loader."""
    import hashlib

    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    digest, count = hashlib.sha256(), 0
    for name in sorted(state):
        t = state[name].detach().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        count += t.numel()
    return digest.hexdigest(), count


def _memory_dir() -> str | None:
    """/dev/shm when it is there (RAM, no disk writes), else the temporary folder."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None

