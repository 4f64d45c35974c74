"""tolaria subsystem."""
