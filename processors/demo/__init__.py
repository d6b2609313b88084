"""``nudgeflow demo``'s pieces: the run, the realistic day, and how its shoppers respond.

Modules: :mod:`.run` (the pipeline on a fresh embedded stack), :mod:`.collect` (read the
decisions and outcomes back), :mod:`.inbound` (STOP/START replies in event time), :mod:`.day`
(the generated day), :mod:`.responses` (the shoppers' response model), :mod:`.shoppers` (carry
the responses out through the webhook service and the clickstream), :mod:`.summary` (the closing
table). The command is :mod:`processors.commands.demo`.
"""
