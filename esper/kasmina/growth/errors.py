"""`GrowthError`: a growth decision that the model cannot carry out now."""

from __future__ import annotations


class GrowthError(RuntimeError):
    """Width or depth growth refused at a site (a seed in flight there, a layer that cannot widen);
    the message names the site and why. A controller working from a stale graph gets this, and the
    decision is dropped rather than the run stopped."""
