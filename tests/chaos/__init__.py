"""Chaos suite: the pipeline as real processes under injected faults (docs/chaos.md)."""
