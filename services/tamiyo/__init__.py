"""Tamiyo server: thin TamiyoService servicer and `python -m services.tamiyo`."""
