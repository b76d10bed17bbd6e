"""`--proposer anthropic`: Claude, through the official SDK's Messages API with tools.

One tool-use conversation per candidate: the model reads the champion's surface, edits it
with the tools of agent.proposers.tools (confined to model/ and kernels/), runs the quick
checks and submits a hypothesis. The stable part of the prompt (rules, tools, research
brief) is cached; so is the conversation so far, turn by turn.

It must survive a night alone: each request goes through agent.proposers.messages_api
(retried through rate limits, overload and outages); a conversation that fails for any
reason leaves the worktree as it found it; and no candidate starts, nor does any turn, unless
its worst-case cost fits in the budget. With several slots, conversations run at once (one
per slot, each in its own worktree): a new one starts only when its worst case fits beside
the worst case of every one still running. It never commits, never runs the benchmark,
and never shows the model a file outside the research surface.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.config import from_dict
from agent.context import read_brief, research_context, stable_prompt
from agent.costs import (
    ProposerStop,
    Usage,
    check_budget,
    price_for,
    spent_in_history,
)
from agent.proposers.base import Proposal, ProposalFailed
from agent.proposers.checks import CheckSettings
from agent.proposers.messages_api import MessagesAPI, RequestFailed
from agent.proposers.tools import TOOL_SPECS, Submission, SurfaceTools, ToolError

log = logging.getLogger(__name__)

# Without streaming the SDK refuses requests that could outlast 10 minutes (about 21k tokens).
MAX_NONSTREAMING_TOKENS = 21_000
CHARS_PER_TOKEN = 3.0  # a cautious estimate (code runs ~3.5), for the cost bound of a request


@dataclass
class LLMConfig:
    model: str = "claude-sonnet-5-5"
    max_tokens: int = 16_000  # per response, thinking included
    thinking: dict | None = None  # e.g. {"type": "adaptive"}; None: the model's default
    effort: str | None = None  # low | medium | high | xhigh | max; None: the model's default
    max_turns: int = 40  # API calls per candidate before the conversation is given up
    budget_usd: float | None = None  # the session's LLM spend limit; None: no limit
    max_usd_per_candidate: float = 3.0  # a conversation stops here; the budget reserves it
    prices: dict | None = None  # input/output/cache_write/cache_read USD per MTok; None: table
    brief: str = "program.md"  # the research brief, re-read for every candidate
    n_diffs: int = 3  # accepted diffs shown in full
    sdk_max_retries: int = 4  # the SDK's own quick retries of one request
    retry_initial_s: float = 10.0  # then ours: first pause, doubled up to retry_max_s
    retry_max_s: float = 300.0
    outage_max_wait_s: float = 3600.0  # total pause for one request before the candidate fails
    check_timeout_s: float = 300.0
    checks_device: str = "cpu"  # cpu: checks never touch the GPU (a benchmark may be on it)
    kernel_tests: bool = True  # allow run_checks(kernel_tests=true)
    require_checks: bool = True  # submit only after passing checks on the final edit
    base_url: str | None = None  # None: the SDK's (ANTHROPIC_BASE_URL or the public API)
    transcript_dir: str | None = None  # write each conversation here as JSON
    sandbox: bool = True  # run the quick checks (they import the edited surface) sandboxed

    @classmethod
    def from_dict(cls, data: dict) -> LLMConfig:
        return from_dict(cls, data, "LLM settings")

    def validate(self) -> None:
        if not 1 <= self.max_tokens <= MAX_NONSTREAMING_TOKENS:
            raise ValueError(f"max_tokens {self.max_tokens}: use 1 to {MAX_NONSTREAMING_TOKENS}"
                             " (larger answers need streaming)")
        if self.max_turns < 2:
            raise ValueError(f"max_turns {self.max_turns}: a candidate needs at least 2 turns")
        if self.max_usd_per_candidate <= 0:
            raise ValueError("max_usd_per_candidate must be positive")
        if self.budget_usd is not None and self.budget_usd < self.max_usd_per_candidate:
            raise ValueError(f"budget_usd {self.budget_usd} is below max_usd_per_candidate "
                             f"{self.max_usd_per_candidate}: not even one candidate fits")
        if self.checks_device not in ("cpu", "gpu"):
            raise ValueError(f"checks_device '{self.checks_device}': use cpu or gpu")


class ConversationFailed(ProposalFailed):
    """A candidate's conversation ended without a submission; `usage` is what it cost."""

    def __init__(self, reason: str, usage: dict | None = None):
        super().__init__("llm: no candidate", reason)
        self.usage = usage


WORKFLOW = """
# How to work

This conversation makes exactly one candidate. Use the tools:
1. Study the champion's code (list_files, read_file, search_surface); the champion's
   metrics, the history and the recently accepted diffs are in the first message.
2. Choose one hypothesis that the history does not already answer.
3. Edit with replace_in_file / create_file (exact snippets; each edit is all or nothing).
4. run_checks (kernel_tests=true if you changed kernels/) and fix what fails.
5. submit: a one-line description, the hypothesis, the expected effect, a category.
You have at most {max_turns} turns (API calls): read only what you need, and make several
tool calls in one turn when they do not depend on each other.
"""


class AnthropicProposer:
    name = "anthropic"

    def __init__(self, config: LLMConfig | None = None, *, api_key: str | None = None,
                 say=None, sleep=time.sleep):
        self.config = config or LLMConfig()
        self.config.validate()
        self.price = price_for(self.config.model, self.config.prices)
        read_brief(self.config.brief)  # a missing brief fails now, not at the first candidate
        least = self._request_bound(self._prompt_tokens())
        if self.config.max_usd_per_candidate < least:
            raise ValueError(
                f"--max-usd-per-candidate {self.config.max_usd_per_candidate:g} is below the "
                f"worst case of one request (${least:.3f}: the prompt and "
                f"{self.config.max_tokens} output tokens of {self.config.model}), so no "
                "candidate could start: raise it"
            )
        self.say = say or log.warning  # outages and pauses, one line each
        cfg = self.config
        self.api = MessagesAPI(
            model=cfg.model, api_key=api_key, base_url=cfg.base_url,
            sdk_max_retries=cfg.sdk_max_retries, retry_initial_s=cfg.retry_initial_s,
            retry_max_s=cfg.retry_max_s, outage_max_wait_s=cfg.outage_max_wait_s,
            say=lambda line: self.say(line), sleep=sleep,  # self.say as set when it speaks
        )
        # Called with each response's usage ({"model", tokens..., "cost_usd"}) as soon as it
        # arrives, so the session's ledger holds every request paid for, drafts included.
        self.on_request = None
        self.stop_at: float | None = None  # unix time the session ends (--hours, --deadline)
        self.session_usage = Usage()  # every request of this process, all candidates
        # Conversations may run at once (one per slot, agent/drafting.py): the session's
        # usage and the count of those in flight are shared between them.
        self._lock = threading.Lock()
        self._in_flight = 0

    def _prompt_tokens(self, system: str | None = None) -> float:
        """The estimated tokens of the stable prompt: system text and tool definitions."""
        if system is None:
            system = self._system()
        return (len(system) + len(json.dumps(TOOL_SPECS))) / CHARS_PER_TOKEN

    def _system(self) -> str:
        return stable_prompt(read_brief(self.config.brief)) + WORKFLOW.format(
            max_turns=self.config.max_turns)

    def check_access(self) -> dict:
        """One request of one output token that proves the key, the URL and the model
        before the session starts; returns its usage. NoAccess says what to fix."""
        usage = Usage()
        usage.add(self.api.check_access())
        return {"model": self.config.model, **usage.as_dict(self.price)}

    # -- the proposer interface --------------------------------------------------------------

    def propose(self, worktree: Path, history: list[dict], context: dict) -> Proposal | None:
        cfg = self.config
        with self._lock:
            # The conversations already in flight may each still cost up to their limit:
            # reserved, so that all of them together stay within the budget.
            others = max(self._in_flight, context.get("drafts_in_flight", 0))
            spent = max(context.get("spent_usd", 0.0), spent_in_history(history),
                        self.session_usage.cost(self.price))
            check_budget(spent + others * cfg.max_usd_per_candidate, cfg.budget_usd,
                         cfg.max_usd_per_candidate)
            self._in_flight += 1
        try:
            return self._propose(worktree, history, context)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _propose(self, worktree: Path, history: list[dict], context: dict) -> Proposal:
        cfg = self.config
        tools = SurfaceTools(
            worktree, history, context.get("preset", "cpu-tiny"),
            CheckSettings(cfg.check_timeout_s, cfg.checks_device, cfg.kernel_tests,
                          cfg.require_checks, cfg.sandbox),
        )
        system = self._system()
        first = research_context(context, history, cfg.n_diffs) + (
            "\nPropose the next candidate: study the code, edit, check, submit."
        )
        usage, messages = Usage(), [{"role": "user", "content": [{"type": "text",
                                                                  "text": first}]}]
        try:
            submission = self._converse(tools, system, messages, usage)
        except BaseException as e:
            tools.restore()
            spent = self._account(usage, system, messages, len(history))
            if isinstance(e, (ConversationFailed, ProposerStop)):
                e.usage = spent
            raise
        spent = self._account(usage, system, messages, len(history))
        self.say(f"llm: '{submission.description}' in {usage.requests} turns, "
                 f"${spent['cost_usd']:.3f}")
        return Proposal(
            description=submission.description,
            hypothesis=f"{submission.hypothesis}\n\nExpected: {submission.expected_effect}",
            category=submission.category,
            usage=spent,
        )

    def _account(self, usage: Usage, system: str, messages: list[dict], number: int) -> dict:
        """Add a conversation's usage to the session's; returns it as the ledger keeps it,
        and saves the transcript (one file per conversation, also when several run at once)."""
        with self._lock:
            self.session_usage.merge(usage)
        spent = {"model": self.config.model, **usage.as_dict(self.price)}
        if self.config.transcript_dir:
            out = Path(self.config.transcript_dir)
            out.mkdir(parents=True, exist_ok=True)
            stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{number:03d}"
            record = json.dumps({"config": asdict(self.config), "system": system,
                                 "messages": messages, "usage": spent}, indent=1)
            for n in itertools.count():
                try:
                    with open(out / f"{stem}{'' if n == 0 else f'-{n}'}.json", "x") as f:
                        f.write(record)
                    break
                except FileExistsError:
                    continue
        return spent

    # -- the conversation --------------------------------------------------------------------

    def _converse(self, tools: SurfaceTools, system: str, messages: list[dict],
                  usage: Usage) -> Submission:
        cfg = self.config
        prompt_tokens = self._prompt_tokens(system)
        pending_chars = len(json.dumps(messages))
        for turn in range(1, cfg.max_turns + 1):
            bound = self._request_bound(prompt_tokens + pending_chars / CHARS_PER_TOKEN)
            if usage.cost(self.price) + bound > cfg.max_usd_per_candidate:
                raise ConversationFailed(
                    f"stopped before submitting: ${usage.cost(self.price):.2f} spent, and the "
                    f"next turn could pass max_usd_per_candidate ${cfg.max_usd_per_candidate:g}"
                )
            response = self._create(system, messages, first=turn == 1)
            usage.add(response.usage)
            if self.on_request is not None:
                one = Usage()
                one.add(response.usage)
                self.on_request({"model": cfg.model, **one.as_dict(self.price)})
            u = response.usage
            prompt_tokens = (u.input_tokens + (u.cache_creation_input_tokens or 0)
                             + (u.cache_read_input_tokens or 0) + u.output_tokens)
            messages.append({"role": "assistant",
                             "content": [b.to_dict(mode="json") for b in response.content]})
            if response.stop_reason == "pause_turn":  # the API asks us to send it back as is
                pending_chars = 0
                continue
            if response.stop_reason in ("refusal", "model_context_window_exceeded"):
                raise ConversationFailed(f"the model stopped: {response.stop_reason}")
            if response.stop_reason == "max_tokens":  # a cut-off tool call may be incomplete
                results, submission = _cut_off(response.content), None
            else:
                results, submission = self._run_tools(tools, response.content)
            if submission is not None:
                return submission
            left = cfg.max_turns - turn
            if not results:
                results.append({"type": "text", "text": "Continue with tool calls; the "
                                "conversation ends only with submit."})
            if 0 < left <= 3:
                results.append({"type": "text", "text": f"{left} turn(s) left: finish, run "
                                "the checks and submit, or this work is discarded."})
            messages.append({"role": "user", "content": results})
            pending_chars = len(json.dumps(results))
        raise ConversationFailed(f"the model did not submit within {cfg.max_turns} turns")

    def _run_tools(self, tools: SurfaceTools, content) -> tuple[list[dict], Submission | None]:
        results = []
        for block in content:
            if block.type != "tool_use":
                continue
            try:
                answer, is_error = tools.call(block.name, dict(block.input)), False
            except ToolError as e:
                answer, is_error = str(e), True
            except Exception as e:  # a bug in a tool must not end the night
                log.exception("tool %s failed", block.name)
                answer, is_error = f"the tool failed unexpectedly: {type(e).__name__}: {e}", True
            log.info("tool %s%s", block.name, " -> error" if is_error else "")
            if isinstance(answer, Submission):
                return results, answer
            results.append({"type": "tool_result", "tool_use_id": block.id, "content": answer,
                            "is_error": is_error})
        return results, None

    def _request_bound(self, prompt_tokens: float) -> float:
        """The most the next request can cost: all its input written to the cache (the
        dearest input rate) and a full-length answer."""
        p = self.price
        return (prompt_tokens * max(p.input, p.cache_write)
                + self.config.max_tokens * p.output) / 1e6

    def _create(self, system: str, messages: list[dict], first: bool = False):
        """The next response: the stable prompt cached, and the conversation so far up to
        its new cache breakpoint. A request that fails for good ends the conversation."""
        cfg = self.config
        _cache_last_block(messages)
        request = dict(
            model=cfg.model,
            max_tokens=cfg.max_tokens,
            system=[{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
            tools=TOOL_SPECS,
            messages=messages,
        )
        if cfg.thinking is not None:
            request["thinking"] = cfg.thinking
        if cfg.effort is not None:
            request["output_config"] = {"effort": cfg.effort}
        try:
            return self.api.create(request, first=first, stop_at=self.stop_at)
        except RequestFailed as e:
            raise ConversationFailed(str(e)) from e.__cause__


def _cut_off(content) -> list[dict]:
    """Answers to the tool calls of a response cut off at max_tokens: none is run, since
    the last one's input may be incomplete (half a `new` snippet, say)."""
    results = [{"type": "tool_result", "tool_use_id": b.id, "is_error": True,
                "content": "not run: your answer hit max_tokens; repeat it in shorter steps"}
               for b in content if b.type == "tool_use"]
    return results


def _cache_last_block(messages: list[dict]) -> None:
    """Move the conversation's cache breakpoint to the end of the last user message, so the
    next request reads everything before it from the cache."""
    users = [m for m in messages if m["role"] == "user"]
    for message in users:
        for block in message["content"]:
            block.pop("cache_control", None)
    users[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}

