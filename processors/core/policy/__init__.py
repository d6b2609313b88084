"""The dispatcher's ordered policy: pure steps (:mod:`.steps`) run against a store (:mod:`.runner`).

For every decision, in this order:

1. Idempotency: the decision id is reserved before anything else. A reservation found in state
   ``calling`` (the gateway may have been called, the result never recorded: a crash) ends as
   ``failed: unknown_after_crash`` and the gateway is never called again. A decision that already
   has an outcome is not evaluated again (its outcome is re-emitted if it was never published).
2. Consent: ``opted_in`` only; ``opted_out`` / ``no_consent`` / ``no_contact`` are suppressed.
3. Exit conditions: a ``DecisionCancelled`` seen for the decision drops it (``cancelled``, with the
   cancellation's reason, e.g. ``converted``), also while deferred, and is checked once more,
   atomically, right before the gateway call.
4. Frequency caps: the file's top-level ``caps`` (or the cooldown default) plus the campaign's,
   checked and reserved in one atomic store operation (a Lua script in Redis).
5. Quiet hours in the recipient's zone: defer to their end (the store keeps a due-time index that
   survives restarts) or drop; a send that would go out more than ``max_defer`` after its
   ``fire_at`` is ``suppressed: stale``. When due, the send runs through steps 2-5 again.
6. Rendering: sandboxed template, segment limit, STOP footer on the first text to a contact.
7./8. Rate limit and gateway call happen in the shell (threads, Redis, network); the policy only
   says what to send (:class:`SendPlan`) and turns the gateway's answer into the outcome.

Times: ``now_ms`` is given by the caller. Live runs pass the wall clock; event-clock runs (replays,
backtest) pass the decision's ``fire_at`` and, for deferred sends, their due time, so quiet hours
and caps behave in a replay as they would have live.

Layout: :mod:`.requests` (what a step returns: a ``Step`` or one store request), :mod:`.steps`
(the checks, pure), :mod:`.store` (the store protocol), :mod:`.runner` (``Policy``: runs the
requests against a store), :mod:`.delivery` (gateway retries), :mod:`.memory` (an in-memory
store and a virtual-time run, for backtests and tests).
"""

from processors.core.policy.delivery import RetryPolicy, deliver, with_send_time
from processors.core.policy.requests import (
    UNKNOWN_AFTER_CRASH,
    CallGate,
    CallPermit,
    Cancel,
    CapCheck,
    Defer,
    Final,
    FirstText,
    Pending,
    Prefetched,
    Prior,
    PriorState,
    Read,
    Request,
    SendPlan,
    Step,
)
from processors.core.policy.runner import Policy
from processors.core.policy.steps import PolicySteps, default_cap_rules, template_variables
from processors.core.policy.store import PolicyStore

__all__ = [
    "UNKNOWN_AFTER_CRASH",
    "CallGate",
    "CallPermit",
    "Cancel",
    "CapCheck",
    "Defer",
    "Final",
    "FirstText",
    "Pending",
    "Policy",
    "PolicySteps",
    "PolicyStore",
    "Prefetched",
    "Prior",
    "PriorState",
    "Read",
    "Request",
    "RetryPolicy",
    "SendPlan",
    "Step",
    "default_cap_rules",
    "deliver",
    "template_variables",
    "with_send_time",
]
