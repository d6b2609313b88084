"""The HTML report: one self-contained page that says which trigger converts.

Per campaign and variant: decisions, not-sent by reason, sent, delivered, clicked, converted,
conversion rate, lift over the holdout with a 95 % interval, revenue, the time from the trigger
event to the send, and sends by hour of day; plus a table that flags triggers whose weekly
conversion rate fell. Plots are PNGs embedded as ``data:`` URIs, so the file can be mailed as
it is. Every figure is also in a JSON block and in ``data-*`` attributes of the tables, so tools
and tests read numbers, not prose.

Modules: :mod:`.inputs` (what is counted), :mod:`.sources` (a demo directory or the topics),
:mod:`.figures`, :mod:`.stats`, :mod:`.plots`, :mod:`.page` (HTML), :mod:`.build` (write it).
The command is :mod:`processors.commands.report`.
"""
