"""``nudgeflow_consumer_lag`` of the clickstream partitions this worker reads."""

from __future__ import annotations

import asyncio
import logging

from processors import metrics
from processors.settings import Settings
from streams.clients import Clients
from streams.reader import offsets_group

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 5.0  # how often every worker samples the consumer lag of its partitions


class Lag:
    """Samples the reader's lag into the metrics (a Faust timer on every worker)."""

    def __init__(self, settings: Settings, clients: Clients) -> None:
        self.settings = settings
        self.clients = clients

    async def sample(self) -> None:
        """Records behind the log end on this worker's clickstream partitions (group
        ``<worker id>-clickstream``, the reader's positions)."""
        if not self.clients.reading:
            return
        loop = asyncio.get_running_loop()
        try:
            lags = await loop.run_in_executor(None, self.clients.reader.lag)
        except Exception as exc:  # mid-rebalance or broker away: try again next interval
            log.debug("consumer lag not sampled: %s: %s", type(exc).__name__, exc)
            return
        topic = self.settings.topic_clickstream
        metrics.set_consumer_lag(
            offsets_group(self.settings.worker_id), {(topic, p): n for p, n in lags.items()}
        )
