"""The Messages API as the Claude proposer reaches it: the official SDK's client, a one-token
request that proves the key, the URL and the model before the session starts, and each
request retried through a night of rate limits, overload and server errors.

A request is retried first by the SDK (`sdk_max_retries` quick tries), then here: pauses
from `retry_initial_s`, doubled up to `retry_max_s`, for at most `outage_max_wait_s` in all
and never past the session's end. A failure that needs a human (the key, billing, the
model, a URL that never answered) stops the session (`ProposerStop`); one that ends only
this request ends only its conversation (`RequestFailed`).

It sends what it is given and returns what the API answers: it knows nothing of prompts,
tools, turns or prices. What it must never do: retry a request the API refused for what it
asks (its repeat would be refused too), pause past the session's end, or wait in silence
(each pause is said, one line).
"""

from __future__ import annotations

import time

import anthropic

from agent.costs import ProposerStop

TRANSIENT = (
    anthropic.RateLimitError,  # 429
    anthropic.InternalServerError,  # 5xx, 529 overloaded
    anthropic.APIConnectionError,  # network, timeouts
    anthropic.RequestTimeoutError,  # 408
    anthropic.ConflictError,  # 409
)
FATAL = (  # the session cannot go on without a human
    anthropic.AuthenticationError,
    anthropic.PermissionDeniedError,
    anthropic.PaymentRequiredError,
    anthropic.NotFoundError,
)


class MissingApiKey(ValueError):
    """No credentials for the API: said before the session starts, not at 3 a.m."""


class NoAccess(ValueError):
    """The Messages API cannot be used with these settings (URL, key, model): said before
    the session starts."""


class RequestFailed(RuntimeError):
    """This request cannot be made (refused for what it asks, or the API unavailable for
    `outage_max_wait_s`); the session goes on."""


class MessagesAPI:
    """The client of one proposer. `say` is called with one line per pause; `sleep` pauses."""

    def __init__(self, *, model: str, api_key: str | None, base_url: str | None,
                 sdk_max_retries: int, retry_initial_s: float, retry_max_s: float,
                 outage_max_wait_s: float, say, sleep=time.sleep):
        self.model = model
        self.retry_initial_s, self.retry_max_s = retry_initial_s, retry_max_s
        self.outage_max_wait_s = outage_max_wait_s
        self.say, self.sleep = say, sleep
        self.answered = 0  # requests the API answered, in this process
        missing = ("--proposer anthropic needs an API key: export ANTHROPIC_API_KEY=... (or "
                   "ANTHROPIC_AUTH_TOKEN) before starting the session")
        try:
            self.client = anthropic.Anthropic(api_key=api_key, base_url=base_url,
                                              max_retries=sdk_max_retries)
        except anthropic.CredentialsError as e:  # a profile named but unusable
            raise MissingApiKey(f"{missing} ({e})") from None
        if not (self.client.api_key or self.client.auth_token or self.client.credentials):
            raise MissingApiKey(missing)

    def check_access(self):
        """One request of one output token that proves the key, the URL and the model
        before the session starts; returns its usage. NoAccess says what to fix."""
        url = self.client.base_url
        try:
            response = self.client.with_options(max_retries=1).messages.create(
                model=self.model, max_tokens=1, messages=[{"role": "user", "content": "ping"}])
        except anthropic.APIConnectionError as e:
            raise NoAccess(f"--proposer anthropic: cannot reach the Messages API at {url} "
                           f"({short_error(e)}): check ANTHROPIC_BASE_URL and the "
                           "network") from None
        except anthropic.AuthenticationError as e:
            raise NoAccess(f"--proposer anthropic: the Messages API at {url} refuses the "
                           f"key ({short_error(e)}): check ANTHROPIC_API_KEY") from None
        except anthropic.NotFoundError as e:
            raise NoAccess(f"--model {self.model}: the Messages API at {url} does not "
                           f"serve it ({short_error(e)}): check the model name") from None
        except anthropic.APIStatusError as e:
            raise NoAccess(f"--proposer anthropic: a one-token test request to {url} "
                           f"failed ({short_error(e)}): check the key's permissions and "
                           "billing, or try again later") from None
        return response.usage

    def create(self, request: dict, *, first: bool = False, stop_at: float | None = None):
        """One Messages API call (`request`: the arguments of messages.create); transient
        failures are retried until outage_max_wait_s, or until the session ends (`stop_at`,
        unix time), whichever comes first.

        A request refused on the first turn of a conversation is refused for its settings
        (model, thinking, effort), which every candidate shares: that stops the session. So
        does a refused connection before the API ever answered: the URL is wrong.
        """
        waited, pause = 0.0, self.retry_initial_s
        limit = self.outage_max_wait_s
        left = None if stop_at is None else max(0.0, stop_at - time.time())
        if left is not None and left < limit:
            limit = left
        while True:
            try:
                response = self.client.messages.create(**request)
                self.answered += 1
                return response
            except TRANSIENT as e:
                refused = isinstance(e, anthropic.APIConnectionError) and not isinstance(
                    e, anthropic.APITimeoutError)
                if refused and self.answered == 0:
                    raise ProposerStop(
                        f"cannot connect to the Messages API at {self.client.base_url} "
                        f"({short_error(e)}): check ANTHROPIC_BASE_URL and the network"
                    ) from e
                if waited >= limit and limit < self.outage_max_wait_s:
                    raise ProposerStop(
                        f"the API was unavailable until the session's end (--hours or "
                        f"--deadline): {short_error(e)}"
                    ) from e
                if waited >= limit:
                    raise RequestFailed(
                        f"the API was unavailable for {waited:.0f} s (outage_max_wait_s): "
                        f"{short_error(e)}"
                    ) from e
                step = min(pause, self.retry_max_s, limit - waited)
                self.say(f"llm: {short_error(e)}; pausing {step:.0f} s "
                         f"({waited:.0f} of {limit:.0f} s waited)")
                self.sleep(step)
                waited, pause = waited + step, pause * 2
            except FATAL as e:
                raise ProposerStop(
                    f"the Messages API refuses this session ({short_error(e)}): check "
                    f"ANTHROPIC_API_KEY, billing, and the model name '{self.model}'"
                ) from e
            except anthropic.APIStatusError as e:  # 400 and others: this request is wrong
                if first and isinstance(e, anthropic.BadRequestError):
                    raise ProposerStop(
                        f"the API refuses the first request of a conversation "
                        f"({short_error(e)}): check the LLM settings (model, max_tokens, "
                        "thinking, effort)"
                    ) from e
                raise RequestFailed(f"the API refused the request: {short_error(e)}") from e


def short_error(e: Exception) -> str:
    """An API error in one line: its type, its HTTP status, and the start of its message."""
    status = getattr(e, "status_code", None)
    text = " ".join(str(getattr(e, "message", e)).split())[:200]
    return f"{type(e).__name__}{f' {status}' if status else ''}: {text}"
