"""The worker: one process's loop over claimed jobs (private; ``qflow.Worker`` is the public name)."""
