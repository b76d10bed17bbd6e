"""A session on the fake harness, W&B offline, killed with SIGKILL right after it logged
its Nth decision (tests/conftest.py `killed_session`).

    python killed_session.py REPO RUN_DIR PATCHES N
"""

import os
import signal
import sys
from pathlib import Path

from agent.config import SessionConfig
from agent.loop import Session
from agent.proposers import make_proposer

DECIDED = ("ACCEPT ", "reject ", "refused ", "HELD ")  # the events after a logged decision


def main(repo: str, run_dir: str, patches: str, n: str) -> None:
    config = SessionConfig(repo=repo, objective="throughput", baseline_runs=2,
                           proposer="patches", proposer_arg=patches, wandb="offline",
                           experiments=int(n) + 2)
    decided = []

    class Killed(Session):
        def event(self, text: str) -> None:
            super().event(text)
            if text.startswith(DECIDED):
                decided.append(text)
                if len(decided) == int(n):
                    os.kill(os.getpid(), signal.SIGKILL)

    Killed.create(Path(run_dir), config, make_proposer("patches", patches),
                  say=lambda text: None).run()


if __name__ == "__main__":
    main(*sys.argv[1:])
