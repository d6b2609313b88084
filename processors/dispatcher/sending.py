"""Gateway calls in a bounded thread pool (the Vonage SDK is synchronous: one slow call must
not stall the consumer): rate limit, last cancel check, the call with retries, the outcome."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from processors import metrics
from processors.core.clock import wall_ms
from processors.core.links import LinkShortener
from processors.core.policy import Policy, RetryPolicy, SendPlan, Step, deliver, with_send_time
from processors.core.sms import GatewayError, SendResult, SmsMessage
from processors.dispatcher.offsets import Ref
from processors.dispatcher.outage import REDIS_DOWN, RedisWatch
from processors.gateways.base import Gateway
from processors.redis import RedisStore
from processors.redis.rate_limit import RateLimiter
from processors.settings import Settings

log = logging.getLogger("nudgeflow.dispatcher")


class Sender:
    """Send jobs in flight; :meth:`reap` hands back the steps of the finished ones."""

    def __init__(
        self,
        settings: Settings,
        *,
        gateway: Gateway,
        policy: Policy,
        limiter: RateLimiter,
        retry: RetryPolicy,
        watch: RedisWatch,
        threads: int,
    ) -> None:
        """``policy``'s store is the ``RedisStore`` (send records, links, call leases)."""
        self.gateway = gateway
        self.policy = policy
        assert isinstance(policy.store, RedisStore)
        self.store = policy.store
        self.limiter = limiter
        secret = settings.link_secret.get_secret_value() if settings.link_secret else None
        self.links = LinkShortener.maybe(
            self.store, settings.link_base_url, settings.link_ttl_s, secret
        )
        self.retry = retry
        self.watch = watch
        self.event_clock = policy.event_clock
        self.error: BaseException | None = None  # a send job's bug: the dispatcher stops
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gateway")
        self._futures: dict[Future[Step], Ref | None] = {}

    def __len__(self) -> int:
        return len(self._futures)

    def submit(self, plan: SendPlan, ref: Ref | None) -> None:
        self._futures[self._pool.submit(self._job, plan)] = ref

    def reap(self, timeout: float) -> Iterator[tuple[Step, Ref | None]]:
        """The steps of the jobs that finished (within ``timeout``), with their refs."""
        if not self._futures:
            return
        done, _ = wait(list(self._futures), timeout=timeout, return_when=FIRST_COMPLETED)
        for future in done:
            ref = self._futures.pop(future)
            try:
                step = future.result()
            except REDIS_DOWN:
                # Given up at shutdown during an outage: not committed, so redelivered.
                log.warning("a send job stopped waiting for redis; its decision is redelivered")
                continue
            except Exception as exc:  # noqa: BLE001 - a bug: stop; redelivery
                log.exception("send job failed; stopping so that the decision is redelivered")
                self.error = exc
                continue
            yield step, ref

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)

    def _job(self, plan: SendPlan) -> Step:
        """In a pool thread: rate limit, last cancel check, gateway call(s), outcome.

        Each Redis step waits out an outage (:meth:`RedisWatch.until_up`), so no gateway call
        is made while Redis is down, and a call's answer is recorded once it is back."""
        redis_step = self.watch.until_up
        if self.links is not None:
            links = self.links
            # tracked short links (webhooks serve /l/{code})
            plan = redis_step(lambda: links.apply(plan))
        # receipts: client-ref
        redis_step(lambda: self.store.remember_send(plan.decision, plan.message.segments))
        redis_step(self.limiter.acquire)
        gate = redis_step(lambda: self.policy.begin_call(plan))
        if gate is not None:
            return gate  # type: ignore[no-any-return]
        if not self.event_clock:
            plan = with_send_time(plan, wall_ms())
        first = [True]

        def acquire() -> None:
            if first[0]:
                first[0] = False  # the first attempt's slot was booked above
            else:
                redis_step(lambda: self.store.extend_call(plan.decision, plan.token))
                redis_step(self.limiter.acquire)

        result = deliver(plan, self._timed_send, self.retry, acquire=acquire)
        at = plan.now_ms if self.event_clock else wall_ms()
        if not self.event_clock and isinstance(result, SendResult):
            metrics.EVENT_TO_SEND.observe(max(0.0, (at - plan.decision.trigger_ts) / 1000))
        return redis_step(lambda: self.policy.complete(plan, result, at))  # type: ignore[no-any-return]

    def _timed_send(self, message: SmsMessage) -> SendResult:
        """One gateway request, measured (latency histogram, throttling counter)."""
        started = time.perf_counter()
        try:
            return self.gateway.send(message)
        except GatewayError as exc:
            if exc.reason == "throttled":
                metrics.GATEWAY_THROTTLED.inc()
            raise
        finally:
            try:
                self.limiter.done()  # answered (or failed): its rate-limit lease ends now
            except Exception:  # Redis away: the lease then simply runs out (rate_limit.py)
                pass
            metrics.GATEWAY_REQUEST.observe(time.perf_counter() - started)
