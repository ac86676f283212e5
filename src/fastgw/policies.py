"""The message policies of an API's flows, compiled for the core.

`compile_flow` turns the request or response flow of a websocket-upgrade policy
into MessageRules, and `MessageRules.for_connection` gives a connection the rate
rules of its plan (Leg.set_policies). Routing and the upgrade policies are
compiled in routing.py, admission runs in admission.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastgw import config as cfgmod
from fastgw._core import Action, RateRule, Scope, key_hash

# The configuration's names of the core's enums (policy_decl.pxi): "reject" -> Action.ACTION_REJECT.
ACTIONS = {a.name.removeprefix("ACTION_").lower(): a for a in Action}
SCOPES = {s.name.removeprefix("SCOPE_").lower(): s for s in Scope}
# Plans come from the configuration, or from a token's claim: the cache stays bounded.
_MAX_SHARED = 256


@dataclass(frozen=True, slots=True)
class MessageRules:
    """The message policies of one flow (request or response)."""

    flow: str                      # "request" | "response"
    rates: tuple                   # (index, MessageRateLimit)
    sizes: tuple                   # MessageSizeLimit
    drops: bool = False            # a rate limit with action drop: no shared compression context
    # (api, plan) -> the rules of for_connection when none is scoped to the client: the same
    # list for every connection of that plan (the core copies what it needs; one list and its
    # RateRules per connection were ~340 bytes of each idle connection)
    _shared: dict = field(default_factory=dict, compare=False, repr=False)

    def for_connection(self, api: str, plan: str, client_key: str) -> list[RateRule]:
        """The flow's rate limits for Leg.set_policies, with the values of the plan (a list
        the caller must not change)."""
        per_client = any(p.scope == "client" for _, p in self.rates)
        if not per_client:
            cached = self._shared.get((api, plan))
            if cached is not None:
                return cached
        out = []
        for index, p in self.rates:
            rate = p.messages.for_plan(plan) if p.messages is not None else None
            brate = p.bytes.for_plan(plan) if p.bytes is not None else None
            base = f"m|{api}|{self.flow}|{index}|" + (client_key if p.scope == "client" else "")
            out.append(RateRule(
                p.name, ACTIONS[p.action], SCOPES[p.scope],
                msg_rate=rate.per_second if rate else 0.0, msg_burst=p.burst_for(plan) or 1.0,
                byte_rate=brate.per_second if brate else 0.0,
                byte_burst=float(p.byte_burst_for(plan) or 1),
                msg_key=key_hash(base + "|m"), byte_key=key_hash(base + "|b"),
            ))
        if not per_client and len(self._shared) < _MAX_SHARED:
            self._shared[(api, plan)] = out
        return out

    def max_size(self, plan: str, ceiling: int) -> int:
        size = ceiling
        for p in self.sizes:
            size = min(size, int(p.max.for_plan(plan)))
        return size


def compile_flow(flow: str, policies) -> MessageRules | None:
    if not policies:
        return None
    rates = tuple((i, p) for i, p in enumerate(policies) if isinstance(p, cfgmod.MessageRateLimit))
    sizes = tuple(p for p in policies if isinstance(p, cfgmod.MessageSizeLimit))
    drops = any(p.action == "drop" for _, p in rates)
    return MessageRules(flow, rates, sizes, drops)
