"""``nudgeflow dispatcher``: decisions in, texts out, one ``SmsOutcome`` per decision.

The shell around :mod:`processors.core.policy`: a confluent-kafka consumer group on the decisions
topic, the ``contacts`` topic materialized into Redis, a :class:`~processors.redis.RedisStore`
shared with every other instance, a Redis rate limit, and gateway calls in a bounded thread pool
(the Vonage SDK is synchronous; one slow call must not stall the consumer).

Delivery guarantees: an offset is committed only after the outcomes (and dead letters) of every
decision before it are produced and flushed. A crash before that redelivers the decision; the
store's reservation makes sure the gateway is never called twice for it (``failed:
unknown_after_crash`` when the first call's result was lost), and a redelivered decision whose
outcome was recorded but never confirmed published is re-published with its dead letter. On a
rebalance the instance finishes its in-flight sends and commits before it lets go of a partition.

Decisions: consecutive decisions are decided in batches of two Lua script calls (reservation and
reads; outcome records and atomic cap checks, in order: :mod:`.deciding`), so one user's
decisions in a batch see each other's cap reservations exactly as they would one at a time.
Live, a batch holds up to 128 decisions and Redis works on one while the previous one is
published; with the event clock a batch holds one decision (deferred sends are released between
decisions, in replay time).

Redis outage (:mod:`.outage`): a connection error or timeout pauses the assigned partitions
(the consumer keeps polling, so the instance stays in its group), keeps every consumed but
undecided record in order, makes no gateway call (a send job waits before each Redis step),
commits nothing past what is done, sets ``nudgeflow_dispatcher_redis_up`` to 0, and probes
Redis with backoff; when it answers, the partitions resume where they were.

Clocks: live, "now" is the wall clock. With ``NUDGEFLOW_CLOCK=event`` (replays) "now" is each
decision's ``fire_at``; deferred sends are released when the replay's time passes their due time
(the time every assigned partition has reached: a partition read ahead of the others must not
release a text whose exit is still on its way on a partition behind), and when a
``nudgeflow-control: flush`` record has been seen on every assigned partition (end of input) all
remaining deferred sends are released and a flush marker is written to every partition of the
outcomes topic.
"""

from processors.dispatcher.cli import add_arguments, run
from processors.dispatcher.gateway import make_gateway
from processors.dispatcher.output import Stats
from processors.dispatcher.service import DEFAULT_RATE_PER_S, Dispatcher
from processors.kafka.headers import DLQ_REASON_HEADER

__all__ = [
    "DEFAULT_RATE_PER_S",
    "DLQ_REASON_HEADER",
    "Dispatcher",
    "Stats",
    "add_arguments",
    "make_gateway",
    "run",
]
