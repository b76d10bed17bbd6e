"""Replaying a leaderboard: every rung of a ladder measured against the rung before it.

    python -m agent replay nanogpt-speedrun --preset cpu-tiny --runs 2

A replay is a normal session (ledger, worktree, status, report, --resume): `Replay` is the
loop of agent/loop.py with the ladder for proposer and its own steps. Each rung becomes a
candidate whose commit is its predecessor's commit plus the rung's patch; the baseline is
this repository's surface (rung 0), or the surface up to the rung before --rungs FROM. For
each rung, N runs of its predecessor and N of the rung alternate (predecessor, rung,
predecessor, rung, ...), each with a fresh seed, so drift of the machine hits both sides.
The statistics (agent/rungs.py) give the measured speedup with a confidence interval and
the leaderboard's loss test; replay_report.py writes replay.md, replay.png and the W&B
table.

In the ledger every rung that ran is accepted: acceptance is what makes a candidate the
parent of the next one, and a ladder's next rung builds on this one whatever was measured.
The loss test's verdict is in the decision and the table. The predecessor's runs of a step
are its "champion" re-measurements; so a resumed replay counts what each step has and
re-runs nothing that finished.

What a replay must never do: choose or skip rungs by their results, reuse a run of another
step for a rung's comparison, or run a rung whose patch leaves the research surface (the
session's integrity checks apply as to any candidate).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from agent.config import SessionConfig, SessionStop, stored
from agent.judge import Decision
from agent.leaderboard import leaderboard_rules
from agent.loop import Session
from agent.proposers.base import Proposal, ProposalFailed
from agent.recording import drop_checkpoints, promote
from agent.replay_report import replay_table, write_replay
from agent.rungs import OWN, PREFIX, PROPOSER, ReplaySettings, load, rung_of, stats_of
from agent.workspace import PatchError, apply_patch

START = "replay start: "  # the commit message of a baseline made of the first rungs


def select(ladder, rungs: str | None) -> tuple[int, int]:
    """--rungs FROM:TO (1-based, inclusive, either end may be left out) as indices."""
    n = len(ladder.rungs)
    if not rungs:
        return 0, n - 1
    head, sep, tail = rungs.partition(":")
    try:
        first = int(head) if head else 1
        last = int(tail) if tail else (n if sep else first)
    except ValueError:
        raise SessionStop(f"--rungs {rungs!r}: use FROM:TO, rung numbers 1 to {n}") from None
    if not 1 <= first <= last <= n:
        raise SessionStop(f"--rungs {rungs!r}: the ladder {ladder.name} has rungs 1 to {n}")
    return first - 1, last - 1


def replay_config(
    ladder, preset: str, runs: int, rungs: str | None = None, rules: str | None = None,
    target_loss: float | None = None, **fields,
) -> SessionConfig:  # fmt: skip
    """The config of a replay session; `target_loss` overrides where the target comes from;
    `fields` are further SessionConfig fields (gpus, train_args, wandb, repo, ...)."""
    from bench.presets import PRESETS  # the fixed side knows each preset's device and target

    if preset not in PRESETS:
        raise SessionStop(f"unknown preset '{preset}': choose one of {list(PRESETS)}")
    if runs < 1:
        raise SessionStop(f"--runs {runs}: a replay needs at least one run per side and rung")
    board = leaderboard_rules(rules) if rules else None
    target = board.target_loss if board else ladder.target_loss
    # A preset made for the leaderboard's model reaches its target; a smaller one cannot,
    # so it races to the session's usual target, set by the baseline's replicates.
    reachable = PRESETS[preset].target_loss is not None
    source = "given" if target_loss is not None else "ladder" if reachable else "baseline"
    if source == "ladder":
        target_loss = target
    first, last = select(ladder, rungs)
    settings = ReplaySettings(
        ladder=ladder.name, runs=runs, first=first, last=last,
        target_from=source, ladder_target=target,
        p_value=board.p_value if board else ladder.p_value,
        waive_systems=bool(board and board.waive_systems),
    )  # fmt: skip
    return SessionConfig(
        preset=preset, objective="time-to-loss", proposer=PROPOSER,
        proposer_arg=str(Path(ladder.root).resolve()), proposer_options=asdict(settings),
        baseline_runs=2 if target_loss is None else 0, target_loss=target_loss,
        device=PRESETS[preset].device, overlap=False, rules=rules, **fields,
    )  # fmt: skip


class LadderProposer:
    """Proposes the ladder's rungs in order: the next one not yet in the session's history,
    applied to the champion's worktree (the previous rung)."""

    name = PROPOSER

    def __init__(self, ladder, settings: ReplaySettings):
        self.ladder = ladder
        self.rungs = ladder.rungs[settings.first : settings.last + 1]

    def propose(self, worktree: Path, history: list[dict], context: dict) -> Proposal | None:
        done = {(row.get("description") or "").split(":")[0] for row in history}
        for rung in self.rungs:
            if f"{PREFIX}{rung.id}" in done:
                continue
            description = f"{PREFIX}{rung.id}: {rung.title}"
            try:
                apply_patch(worktree, Path(rung.patch).read_text())
            except PatchError as e:
                raise ProposalFailed(description, f"does not apply to the rung before: {e}") from e
            category = "systems" if rung.kind == "systems" else "other"
            return Proposal(description, f"published: {rung.published}", category)
        return None


class Replay(Session):
    """A replay session: the loop of agent/loop.py with the ladder for proposer, each rung's
    interleaved step for an experiment, and its table at the end."""

    def __init__(self, run_dir: Path, proposer: LadderProposer | None = None, say=print,
                 waiting=None):
        _, config = stored(run_dir)
        if config.proposer != PROPOSER:
            raise SessionStop(f"{run_dir} holds a `python -m agent run` session, not a replay: "
                              f"resume it with `python -m agent run --resume {run_dir}`")
        self.settings = ReplaySettings.of(config)
        self.ladder = load(config.proposer_arg)
        self.rungs = {r.id: r for r in self.ladder.rungs}
        super().__init__(run_dir, proposer or LadderProposer(self.ladder, self.settings), say,
                         waiting)

    def prepare(self) -> None:
        if self.ledger.baseline() is None:
            self.check_surface()
            self.start_commit()

    def stop_reason(self, in_flight: int = 0) -> str | None:
        """Why the chain cannot go on: a rung was refused or failed (the rungs after it are
        built on it), or None. (A replay has one slot: one rung in flight at a time.)"""
        for c in self.ledger.candidates(["decided", "refused"]):
            if c["experiment"] is not None and c["verdict"] != "accept":
                what = "was refused" if c["verdict"] == "refused" else "failed"
                reason = (c["decision"] or {}).get("reason", "").splitlines()[:2]
                return (f"{c['description']} {what} ({' '.join(reason)}); the rungs after it "
                        "build on it and cannot be measured")
        return None

    def remeasure_due(self) -> bool:
        return False  # each step re-measures the rung before it (`measure`)

    def nothing_left(self) -> str:
        return f"every selected rung of {self.ladder.name} was measured"

    def experiment(self, candidate: dict) -> None:  # never re-based: one rung at a time
        rung = self.rungs[rung_of(candidate)]
        self.event(f"{candidate['description']} ({rung.kind}): {self.settings.runs} runs "
                   "each of it and of the rung before, interleaved")
        self.measure(candidate)
        self.record_step(candidate, rung)

    def finished(self) -> None:
        paths = write_replay(self.run_dir.root)
        self.tracker.log_replay(*replay_table(self.run_dir.root), paths.plot)
        self.event(f"replay table: {paths.table}; plot: {paths.plot}")

    def check_surface(self) -> None:
        """Say so when this surface is not the one the ladder's first patch was made on: its
        patches may still apply, but what they measure is not the ladder's."""
        from bench.leaderboards import surface_fingerprint

        found = surface_fingerprint(self.workspace.path)
        if found != self.ladder.base_surface:
            self.event(f"this surface (fingerprint {found[:12]}) is not the one "
                       f"{self.ladder.name} was made on ({self.ladder.base_surface[:12]}): "
                       "rungs may not apply, or measure something else than the ladder's")

    def start_commit(self) -> None:
        """With --rungs FROM > 1, the baseline is the surface with the rungs before FROM
        applied, as one commit made the champion before the baseline is recorded."""
        first = self.settings.first
        if first == 0:
            return
        ws = self.workspace
        message = f"{START}{self.ladder.name} up to rung {self.ladder.rungs[first - 1].id}"
        if ws.git("log", "-1", "--format=%s", ws.champion).strip() == message:
            return  # made before a kill, the baseline not recorded yet
        ws.reset()
        for rung in self.ladder.rungs[:first]:
            try:
                ws.apply(Path(rung.patch).read_text())
            except PatchError as e:
                ws.reset()
                why = f"rung {rung.id} does not apply on its way to the start: {e}"
                raise SessionStop(why) from e
        ws.move_champion(ws.capture(0, message).commit)
        self.event(message)

    def measure(self, candidate: dict) -> None:
        """The step's runs: predecessor and rung alternate until each has N; a failed run of
        the rung ends the step (the next rungs build on it and cannot be measured)."""
        n = self.settings.runs
        pred = self.ledger.candidate(candidate["parent_id"])
        while True:
            done_pred = len(self.ledger.runs_of(pred["id"], roles=["champion"]))
            mine = self.ledger.runs_of(candidate["id"], roles=OWN)
            if any(r["outcome"] != "ok" for r in mine) or (done_pred >= n and len(mine) >= n):
                return
            if done_pred <= len(mine) and done_pred < n:
                self.measurer.benchmark(pred, "champion")
            else:
                self.measurer.benchmark(candidate, "confirm" if mine else "screen")

    def record_step(self, candidate: dict, rung) -> None:
        """Record the rung's measurement: accepted into the chain when its runs measured a
        time, else rejected (and the replay stops there). Accepted without the loop's
        acceptance checks (agent/acceptance.py): they guard a search against its own
        proposer (a 2x step is held for a human, compile time moved out of the clock
        rejects), while a replay measures curated rungs, each of which the next one needs."""
        st = stats_of(self.ledger, self.config, candidate, rung)
        mine = self.ledger.results_of(candidate["id"], roles=OWN)
        failed = next((r for r in mine if r["status"] != "ok"), None)
        if failed is not None or st.speedup is None:
            what = (f"run with seed {failed['seed']} {failed['status']}" if failed
                    else "no run measured a time")
            self.recorder.record(candidate, Decision("reject", what, None, None, None, None,
                                                     None, st.pred.n, st.rung.n, None))
            return
        sp, loss, cid = st.speedup, st.loss, candidate["id"]
        ci = "" if sp.ci_low is None else f" (95% CI {sp.ci_low:.3f}-{sp.ci_high:.3f})"
        p = "" if loss.p_value is None else f", p={loss.p_value:.2g}"
        reason = (f"replayed: x{sp.ratio:.3f} over the rung before{ci} from {st.rung.n}+"
                  f"{st.pred.n} runs; loss test {loss.verdict}{p} at target "
                  f"{self.config.target_loss:.4f}")
        decision = Decision("accept", reason, sp.ratio, sp.ci_low, sp.ci_high, sp.p_value,
                            loss.p_value, st.pred.n, st.rung.n, st.loss_delta)
        speedup = promote(self.ledger, self.workspace, candidate, sp.ratio,
                          lambda total: self.ledger.record_decision(cid, "accept", decision,
                                                                    speedup=total))
        drop_checkpoints(self.run_dir, self.ledger.runs_of(cid))  # nothing evaluates them
        self.tracker.log_decision(self.ledger.candidate(cid))
        self.event(f"{candidate['description']}: {reason}; total x{speedup:.3f}")


def is_replay(run_dir: Path) -> bool:
    return stored(run_dir)[1].proposer == PROPOSER
