"""Runnable examples; see the examples table in README.md. A package so that workers can import
``examples.<name>:app``."""
