"""A session's run directory D and every path in it, named once:

    D/ledger.sqlite            the ledger, the session's single source of truth
    D/session.lock             held while a loop or a review works in D (agent/liveness.py)
    D/worktree/                the session's git worktree, where candidates run
    D/propose/                 a second worktree, where the next candidate is drafted meanwhile
    D/worktree-N/              slot N's worktree, when a session has several (--devices,
                               --cluster: a Ray slot's worktree is where its files come from)
    D/logs/NAME.log            a run's output
    D/results/NAME.json        its result JSON
    D/checkpoints/NAME.pt      its final weights, until the acceptance checks have read them
    D/profiles/cNNN.txt        where a champion spends its time, for the LLM proposers
    D/llm/                     the LLM proposer's conversations
    D/report.md, D/progress.png, D/results.tsv    the report (agent/report.py)
    D/replay.md, D/replay.png  a replay's table and plot (agent/replay_report.py)
    D/wandb/                   W&B's offline files (unless WANDB_DIR says elsewhere)

NAME is `run_name(...)`: the ledger's run id makes it unique, so a run discarded on resume
and its re-run keep a file each.

What this module must never do: create, change or delete a file; callers make what they
write.
"""

from __future__ import annotations

from pathlib import Path

LEDGER_FILE = "ledger.sqlite"
LOCK_FILE = "session.lock"
WORKTREES = ("worktree", "propose")  # the worktrees a session keeps in its run directory


def run_name(run_id: int, candidate_id: int, role: str, seed: int) -> str:
    """`r0031-c004-confirm-s12`: the name of a run's log, result and checkpoint files."""
    return f"r{run_id:04d}-c{candidate_id:03d}-{role}-s{seed}"


class RunDir:
    """The run directory `root` of one session; each attribute is a path in it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.ledger = self.root / LEDGER_FILE
        self.lock = self.root / LOCK_FILE
        self.worktree, self.propose_worktree = (self.root / name for name in WORKTREES)
        self.logs = self.root / "logs"
        self.llm = self.root / "llm"
        self.report_md = self.root / "report.md"
        self.progress_png = self.root / "progress.png"
        self.results_tsv = self.root / "results.tsv"
        self.replay_md = self.root / "replay.md"
        self.replay_png = self.root / "replay.png"
        self.wandb = self.root  # W&B makes its wandb/ in it

    @classmethod
    def of_worktree(cls, path: Path) -> RunDir | None:
        """The run directory that holds the session worktree `path`, or None when `path` is
        not where a session keeps its worktrees."""
        name = Path(path).name
        return cls(Path(path).parent) if name in WORKTREES or name.startswith(
            tuple(f"{w}-" for w in WORKTREES)) else None

    def __str__(self) -> str:
        return str(self.root)

    def __fspath__(self) -> str:  # so that Path(run_dir) and open() take a RunDir
        return str(self.root)

    def draft_worktree(self, i: int) -> Path:
        """The worktree of the i-th draft made at once (LLM proposers draft one per slot)."""
        return self.propose_worktree if i == 0 else self.root / f"{WORKTREES[1]}-{i}"

    def slot_worktree(self, slot: str) -> Path:
        """Slot `slot`'s worktree; a Ray slot's name ("10.0.0.5/gpu0") made a folder name."""
        return self.root / f"{WORKTREES[0]}-{slot.replace('/', '-')}"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def result(self, name: str) -> Path:
        return self.root / "results" / f"{name}.json"

    def checkpoint(self, name: str) -> Path:
        return self.root / "checkpoints" / f"{name}.pt"

    def run_checkpoint(self, run: dict) -> Path:
        """The checkpoint of a ledger run."""
        return self.checkpoint(run_name(run["id"], run["candidate_id"], run["role"], run["seed"]))

    def profile_path(self, candidate_id: int) -> Path:
        return self.root / "profiles" / f"c{candidate_id:03d}.txt"
