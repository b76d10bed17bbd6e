"""Token and dollar accounting for the LLM proposer, and the spending budget.

Costs are computed from the `usage` the Messages API returns with every response and a
price table per model (USD per million tokens). The budget is enforced before money is
spent, never after: a candidate's conversation may cost at most `max_usd_per_candidate`,
and the next candidate starts only when the session's spend plus that worst case still
fits in the budget. This module never calls the API and never guesses a price: a model
missing from the table is an error unless the user gives its prices.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float
    cache_write: float  # 5-minute cache writes (1.25 x input); the proposer uses no 1 h cache
    cache_read: float


# From the Anthropic pricing pages (platform.claude.com/docs/en/about-claude/pricing and the
# model overview pages) as of 2026-10; check them before a long run, and pass `prices` to
# override. Not listed on purpose: claude-haiku-5-5, whose price depends on the prompt's
# length (5x above 100k tokens), so one rate per token would understate it.
_SONNET_5 = Price(input=2.0, output=10.0, cache_write=2.5, cache_read=0.2)
_OPUS_4_5_TO_5 = Price(input=5.0, output=25.0, cache_write=6.25, cache_read=0.5)
_SONNET_4 = Price(input=3.0, output=15.0, cache_write=3.75, cache_read=0.3)
_HAIKU_4_5 = Price(input=1.0, output=5.0, cache_write=1.25, cache_read=0.1)
PRICES: dict[str, Price] = {
    # Sonnet 5.5 cache reads were cut from 0.10x to 0.05x of input on 2026-10-07.
    "claude-sonnet-5-5": Price(input=2.0, output=10.0, cache_write=2.5, cache_read=0.1),
    "claude-sonnet-5": _SONNET_5,
    "claude-opus-5-5": Price(input=4.0, output=20.0, cache_write=5.0, cache_read=0.2),
    "claude-opus-5": _OPUS_4_5_TO_5,
    "claude-opus-4-8": _OPUS_4_5_TO_5,
    "claude-opus-4-7": _OPUS_4_5_TO_5,
    "claude-opus-4-6": _OPUS_4_5_TO_5,
    "claude-opus-4-5": _OPUS_4_5_TO_5,
    "claude-opus-4-5-20251101": _OPUS_4_5_TO_5,
    "claude-fable-5-1": Price(input=10.0, output=50.0, cache_write=12.5, cache_read=0.25),
    "claude-mythos-5-1": Price(input=10.0, output=50.0, cache_write=12.5, cache_read=0.25),
    "claude-fable-5": Price(input=10.0, output=50.0, cache_write=12.5, cache_read=1.0),
    "claude-mythos-5": Price(input=10.0, output=50.0, cache_write=12.5, cache_read=1.0),
    "claude-sonnet-4-6": _SONNET_4,
    "claude-sonnet-4-5": _SONNET_4,
    "claude-sonnet-4-5-20250929": _SONNET_4,
    "claude-haiku-4-5": _HAIKU_4_5,
    "claude-haiku-4-5-20251001": _HAIKU_4_5,
}


class UnknownPrice(ValueError):
    """A model with no price in the table and none given: the budget cannot be kept."""


class ProposerStop(Exception):
    """The proposer cannot go on (the budget is spent, the API rejects the key): the session
    stops, with this message as the reason. Not a failed candidate."""


class BudgetExhausted(ProposerStop):
    """The next candidate could take the session's LLM spend past `budget_usd`."""


def price_for(model: str, prices: dict | None = None) -> Price:
    """The price of `model`: `prices` (input, output, cache_write, cache_read in USD per
    million tokens) when given, else the table's."""
    if prices is not None:
        names = {f.name for f in fields(Price)}
        if set(prices) != names:
            raise UnknownPrice(
                f"prices {prices} must give exactly {sorted(names)} (USD per million tokens)"
            )
        return Price(**{k: float(v) for k, v in prices.items()})
    if model not in PRICES:
        raise UnknownPrice(
            f"no price for model '{model}' in agent/costs.py PRICES (known: "
            f"{', '.join(sorted(PRICES))}); give its prices as input, output, cache_write, "
            "cache_read in USD per million tokens"
        )
    return PRICES[model]


@dataclass
class Usage:
    """Tokens of one or more Messages API responses, summed."""

    input_tokens: int = 0  # uncached input after the last cache breakpoint
    output_tokens: int = 0  # includes thinking tokens
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    requests: int = 0

    def add(self, usage) -> None:
        """Add one response's `usage` (the SDK's Usage object, or the same as a dict)."""
        get = usage.get if isinstance(usage, dict) else lambda k: getattr(usage, k, None)
        self.input_tokens += get("input_tokens") or 0
        self.output_tokens += get("output_tokens") or 0
        self.cache_creation_input_tokens += get("cache_creation_input_tokens") or 0
        self.cache_read_input_tokens += get("cache_read_input_tokens") or 0
        self.requests += 1

    def merge(self, other: Usage) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def cost(self, price: Price) -> float:
        return (
            self.input_tokens * price.input
            + self.output_tokens * price.output
            + self.cache_creation_input_tokens * price.cache_write
            + self.cache_read_input_tokens * price.cache_read
        ) / 1e6

    def as_dict(self, price: Price) -> dict:
        return {**asdict(self), "cost_usd": round(self.cost(price), 6)}


def spent_in_history(history: list[dict]) -> float:
    """The LLM spend the ledger recorded for the session's candidates (their `usage`)."""
    total = 0.0
    for row in history:
        usage = row.get("usage") or {}
        if isinstance(usage, str):  # the ledger's JSON column, unparsed
            usage = json.loads(usage)
        total += float(usage.get("cost_usd") or 0.0)
    return total


def check_budget(spent: float, budget: float | None, worst_case: float) -> None:
    """BudgetExhausted when one more candidate, at its worst case, could exceed the budget."""
    if budget is not None and spent + worst_case > budget:
        raise BudgetExhausted(
            f"LLM budget: ${spent:.2f} of ${budget:.2f} spent, and the next candidate may cost "
            f"up to ${worst_case:.2f} (max_usd_per_candidate); raise --budget-usd to go on"
        )
