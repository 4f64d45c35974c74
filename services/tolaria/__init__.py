"""Tolaria server: the thin TolariaService servicer run inside the training process (esper.tolaria.server)."""
