"""The worker's Kafka clients and the checkpointer over its table, each made at first use.

Building the app (``nudgeflow worker`` before it starts, tests, ``bench/``) opens no connection:
the producer (:class:`streams.output.Output`), the clickstream reader
(:class:`streams.reader.ClickstreamReader`) and the :class:`streams.state.checkpoint.Checkpointer`
that writes through the producer are made when a collaborator first asks for them.
"""

from __future__ import annotations

from typing import Any

from processors.settings import Settings
from streams.output import Output
from streams.reader import ClickstreamReader
from streams.state.checkpoint import Checkpointer


class Clients:
    """The producer, the clickstream reader and the checkpointer of one worker."""

    def __init__(self, settings: Settings, table: Any) -> None:
        """``table``: the Faust ``user_state`` table (its store and changelog topic)."""
        self.settings = settings
        self.table = table
        self._output: Output | None = None
        self._reader: ClickstreamReader | None = None
        self._checkpointer: Checkpointer | None = None

    @property
    def output(self) -> Output:
        if self._output is None:
            self._output = Output(self.settings, client_id=f"{self.settings.worker_id}-out")
        return self._output

    @property
    def reader(self) -> ClickstreamReader:
        if self._reader is None:
            self._reader = ClickstreamReader(
                self.settings, client_id=f"{self.settings.worker_id}-clickstream"
            )
        return self._reader

    @property
    def checkpointer(self) -> Checkpointer:
        if self._checkpointer is None:
            self._checkpointer = Checkpointer(
                self.table.data, self.output, self.table.changelog_topic.get_topic_name()
            )
        return self._checkpointer

    @property
    def reading(self) -> bool:
        """The reader has been made (it may own no partition yet)."""
        return self._reader is not None

    @property
    def checkpointing(self) -> bool:
        """The checkpointer has been made (there may be buffered changes)."""
        return self._checkpointer is not None

    def close(self) -> None:
        """Stop reading and flush the producer (the worker is stopping)."""
        if self._reader is not None:
            self._reader.close()
        if self._output is not None:
            self._output.flush_sync(10.0)
