"""The worker: one process's loop over claimed jobs (private; ``qflow.Worker`` is the public name).

Modules, by job (data flows down the list; no module imports one above it):

- ``worker``: ``Worker``, which selects queues, wires the parts below and runs them as one task group
- ``fetch``: claiming in batches, the idle wait on the server, the claim queued behind that wait
- ``lanes``: running claimed jobs in their processors' lanes (handlers, timeouts, sync handlers in threads)
- ``leases``: renewing the leases this process holds; recovering stalled jobs
- ``drain``: stopping: let running jobs finish up to the drain timeout, release the rest
- ``acks``: recording outcomes: completions in batches, failures, retries, stale acks
- ``shared``: the state the parts share (configuration, per-queue runners, stop signal, counters)
- ``deliveries``: a delivery's states and their legal moves (state as data); per-queue lanes, slots, acks
- ``aio``: asyncio helpers (wait for the first of several awaitables, cancel reliably)

Redis is reached only through ``qflow._broker`` (scripts, commands, errors).
"""
