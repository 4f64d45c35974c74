"""oona subsystem."""
