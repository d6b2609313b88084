"""Local fakes of external services (real servers, real protocols) for tests."""
