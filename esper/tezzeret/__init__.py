"""tezzeret subsystem."""
