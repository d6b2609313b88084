"""NudgeFlow test suite (a package so ``tests.fakes`` is importable)."""
