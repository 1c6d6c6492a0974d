"""Runtime targets: the execution backends work is routed to, declared in configuration."""
