"""kasmina subsystem."""
