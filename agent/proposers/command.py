"""`--proposer command "CMD"`: an external coding agent the user already has, as a proposer.

The command (a shell command line such as `claude -p --permission-mode acceptEdits` or
`codex exec --full-auto -`) runs in the candidate's worktree, under a timeout, with the
same research prompt the LLM proposer gets: on its stdin, and in the file named by
SPEEDLOOP_PROMPT. It edits the surface files in place and may describe its change in the
JSON file named by SPEEDLOOP_PROPOSAL (outside the worktree, so it never lands in the diff).
Nothing is assumed about which agent it is: the engine checks its edit like any other,
after this proposer has run the quick checks and refused an exact repeat of a candidate
already tried. Commits the agent makes are undone into plain edits.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from agent.config import from_dict
from agent.context import digest_line, read_brief, research_context, stable_prompt
from agent.proposers.base import CATEGORIES, Proposal, ProposalFailed
from agent.proposers.checks import CheckFailed, CheckSettings, quick_checks, run_command, tail
from agent.proposers.tools import find_duplicate
from agent.workspace import changed_paths, current_diff, git
from bench.sandbox import available
from bench.surface import SURFACE_DIRS

WORKFLOW = """
# How to work

You run inside the candidate's worktree (the current directory): a git checkout of the
champion. Make exactly one candidate:
1. Study the code under model/ and kernels/; the champion's metrics, the history and the
   recently accepted diffs are below.
2. Choose one hypothesis that the history does not already answer, and edit files under
   model/ and kernels/ only. Do not commit, do not create files anywhere else (use $TMPDIR
   for scratch), and do not run train.py: the engine benchmarks the candidate.
3. Check the edit: `python -m pytest -q tests/test_model.py`, plus
   `python -m pytest -q tests/test_kernels_*.py` if you changed kernels/.
4. Describe it in the JSON file at the path in $SPEEDLOOP_PROPOSAL:
   {{"description": "<one line, at most 100 characters>", "hypothesis": "<why faster>",
    "expected_effect": "<e.g. 5% less time to target>", "category": "<one of {categories}>"}}
"""


@dataclass
class CommandConfig:
    timeout_s: float = 1800.0  # the agent's whole run; it is killed (with its children) after
    brief: str = "program.md"  # the research brief, re-read for every candidate
    n_diffs: int = 3  # accepted diffs shown in full
    checks: bool = True  # run the quick CPU smoke on the edit before the engine takes it
    check_timeout_s: float = 300.0
    # The agent runs with the filesystem read-only but for its worktree's surface folders
    # (bench/sandbox.py, agent=True), with the network and this process's environment.
    sandbox: bool = True

    @classmethod
    def from_dict(cls, data: dict) -> CommandConfig:
        return from_dict(cls, data, "command proposer settings")


def prompt_text(brief: str, context: dict, history: list[dict], n_diffs: int) -> str:
    workflow = WORKFLOW.format(categories=" | ".join(CATEGORIES))
    return stable_prompt(brief) + workflow + "\n" + research_context(context, history, n_diffs)


class CommandProposer:
    name = "command"

    def __init__(self, command: str, config: CommandConfig | None = None):
        if not command or not command.strip():
            raise ValueError("--proposer command needs the agent's command line, e.g. "
                             "--proposer-arg 'claude -p --permission-mode acceptEdits'")
        self.command = command
        self.config = config or CommandConfig()
        read_brief(self.config.brief)  # a missing brief fails now, not at the first candidate

    def propose(self, worktree: Path, history: list[dict], context: dict) -> Proposal | None:
        cfg, worktree = self.config, Path(worktree)
        short = f"command: {self.command[:60]}"
        prompt = prompt_text(read_brief(cfg.brief), context, history, cfg.n_diffs)
        head = git(worktree, "rev-parse", "HEAD").strip()
        started = time.time()
        with tempfile.TemporaryDirectory(prefix="speedloop-agent-") as tmp:
            prompt_path, proposal_path = Path(tmp) / "prompt.md", Path(tmp) / "proposal.json"
            prompt_path.write_text(prompt)
            env = {**os.environ, "SPEEDLOOP_PROMPT": str(prompt_path),
                   "SPEEDLOOP_PROPOSAL": str(proposal_path), "SPEEDLOOP_WORKTREE": str(worktree),
                   "TMPDIR": tmp}
            writable = [worktree / d for d in SURFACE_DIRS if (worktree / d).is_dir()]
            sandbox = available() if cfg.sandbox else None
            code, out = run_command(self.command, worktree, cfg.timeout_s, env, stdin=prompt,
                                    sandbox=sandbox, agent=True,
                                    writable=(*writable, Path(tmp)))
            if code is None:
                raise ProposalFailed(short, f"timed out after {cfg.timeout_s:.0f} s; its last "
                                            f"output:\n{tail(out, 2000)}")
            if code != 0:
                raise ProposalFailed(short, f"exited with status {code}; its last output:\n"
                                            f"{tail(out, 2000)}")
            meta = _read_proposal(proposal_path)
        if git(worktree, "rev-parse", "HEAD").strip() != head:
            git(worktree, "reset", "-q", "--soft", head)  # its commits become plain edits
        diff = current_diff(worktree)
        paths = changed_paths(diff)
        description = meta.get("description") or (
            f"command: edit {', '.join(paths)}" if paths else short)
        description = " ".join(str(description).split())[:120]
        twin = find_duplicate(diff, history) if diff.strip() else None
        if twin is not None:
            raise ProposalFailed(description, "this exact change was tried already: "
                                              + digest_line(twin))
        if cfg.checks and diff.strip():
            settings = CheckSettings(timeout_s=cfg.check_timeout_s, sandbox=cfg.sandbox)
            try:
                quick_checks(worktree.resolve(), context.get("preset", "cpu-tiny"), settings)
            except CheckFailed as e:
                raise ProposalFailed(description, f"the edit fails the quick checks: {e}") \
                    from None
        category = meta.get("category") if meta.get("category") in CATEGORIES else "other"
        hypothesis = str(meta.get("hypothesis") or "")
        if meta.get("expected_effect"):
            hypothesis += f"\n\nExpected: {meta['expected_effect']}"
        return Proposal(description=description, hypothesis=hypothesis.strip(),
                        category=category, usage={"wall_seconds": round(time.time() - started, 1)})


def _read_proposal(path: Path) -> dict:
    """The agent's description of its change; {} when it wrote none or none that parses."""
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}

