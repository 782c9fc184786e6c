"""The broker layer: everything qflow says to Redis, and nothing else.

Its one job is to turn qflow's intentions (add these jobs, claim up to n, complete these, renew those
leases...) into Redis commands and Lua scripts, and their replies into typed values and qflow's errors.

- ``keys``: the key schema (every key of a queue under one hash tag) and the schema version.
- ``scripts``: one typed function per Lua script in ``lua/``; the only place that knows a script's KEYS and
  ARGV order and its reply format, and the one place that handles NOSCRIPT.
- ``commands``: the plain commands outside scripts (server time, blocking waits, ``CLIENT UNBLOCK``).
- ``errors``: the one place that maps redis-py's errors to qflow's (``translated``).
- ``servercheck``: what a worker checks about the server at start.
- ``lua/``: the scripts, one per atomic transition, each headed by its KEYS / ARGV / returns.

It may import redis-py, msgspec, ``qflow.exceptions`` and the pure modules ``qflow._state`` and
``qflow._codec``; never the worker, the producer side (``_queue``, ``_app``) or the CLI. Data flows down:
CLI -> worker / queue -> broker -> Lua.
"""
