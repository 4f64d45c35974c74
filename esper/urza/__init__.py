"""urza subsystem."""
