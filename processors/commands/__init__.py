"""The ``nudgeflow`` sub-commands: :mod:`.cli` dispatches, one module per sub-command.

Each module offers ``add_arguments(parser)`` and ``run(args) -> int`` (the exit code) and is
imported only when its command runs. ``worker``, ``dispatcher`` and ``webhooks`` keep theirs in
:mod:`streams.worker`, :mod:`processors.dispatcher` and :mod:`processors.webhooks`.
"""
