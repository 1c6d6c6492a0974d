"""Loopback servers that speak remote runtimes' real wire protocols, for tests on real HTTP."""
