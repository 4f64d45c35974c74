"""tamiyo subsystem."""
