"""Applies the patch files of a directory in order, one candidate each.

The basis for replaying a leaderboard: each `*.patch` or `*.diff` file (sorted by name)
is applied to the champion's worktree. A patch that does not apply is reported as such
(ProposalFailed) and the next proposal moves on to the following file.
"""

from pathlib import Path

from agent.proposers.base import Proposal, ProposalFailed
from agent.workspace import PatchError, apply_patch

PREFIX = "patch "


def subject(patch: str, fallback: str) -> str:
    """The `Subject:` line of a git format-patch file, else the file's first comment line."""
    for line in patch.splitlines():
        if line.startswith("Subject:"):
            return line.removeprefix("Subject:").removeprefix(" [PATCH]").strip()
        if line.startswith(("diff ", "--- ")):
            break
    return fallback


class PatchesProposer:
    name = "patches"

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"patch directory {self.directory} does not exist")
        self.files = sorted(
            p for p in self.directory.iterdir() if p.suffix in (".patch", ".diff")
        )
        if not self.files:
            raise ValueError(f"{self.directory} holds no *.patch or *.diff files")

    def propose(self, worktree: Path, history: list[dict], context: dict) -> Proposal | None:
        done = {
            (row.get("description") or "").split(":")[0].removeprefix(PREFIX)
            for row in history
            if (row.get("description") or "").startswith(PREFIX)
        }
        for path in self.files:
            if path.name in done:
                continue
            text = path.read_text()
            description = f"{PREFIX}{path.name}: {subject(text, path.stem)}"
            try:
                apply_patch(worktree, text)
            except PatchError as e:  # git's message names the file and hunk that failed
                raise ProposalFailed(description, f"does not apply to the champion: {e}") from e
            return Proposal(description=description, hypothesis=subject(text, ""), category="other")
        return None
