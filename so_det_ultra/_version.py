"""The so-det-ultra version: written once here (hatch reads it for the wheel; checkpoints record it)."""

__version__ = "0.4.0"
