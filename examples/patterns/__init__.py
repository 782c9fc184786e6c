"""Integration patterns, one runnable file each: ``python -m examples.patterns.<name>`` (see README.md)."""
