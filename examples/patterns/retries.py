"""Retries with backoff: let a flaky call fail a few times, space the attempts out, give up cleanly.

    python -m examples.patterns.retries

- ``attempts=`` is the total number of runs a job gets when its handler raises.
- ``backoff=qflow.Backoff(...)`` spaces the retries: ``exponential`` doubles the wait each time, ``max_delay``
  caps it, ``jitter`` spreads retries of jobs that failed together so they do not all come back at once.
- ``raise qflow.Retry(delay=...)`` lets the handler pick the wait itself, e.g. from a ``Retry-After`` header.
  It spends an attempt like any error.
- ``add(..., attempts=, backoff=)`` overrides the processor's policy for one job.
Waits are timed by the Redis server's clock. A job out of attempts ends ``failed``, with its last error kept.
"""

from __future__ import annotations

import asyncio
import time

import qflow

app = qflow.App()
hooks = app.queue("patterns-retries")
started = time.monotonic()


def log(message: str) -> None:
    print(f"  t={time.monotonic() - started:4.2f}s  {message}")


@hooks.processor(attempts=4, backoff=qflow.Backoff(kind="exponential", delay=0.1, max_delay=1.0, jitter=0.1))
async def deliver_webhook(job: qflow.Job[str]) -> str:
    log(f"deliver_webhook attempt {job.attempt}")
    if job.attempt < 3:
        raise ConnectionError(f"{job.payload} did not answer")
    return f"delivered on attempt {job.attempt}"


@hooks.processor(attempts=3)
async def call_rate_limited_api(job: qflow.Job[str]) -> str:
    log(f"call_rate_limited_api attempt {job.attempt}")
    if job.attempt == 1:
        raise qflow.Retry(delay=0.3, reason="429 Too Many Requests, Retry-After: 0.3")
    return "answered after waiting as asked"


@hooks.processor(attempts=10, backoff=qflow.Backoff(kind="fixed", delay=0.05))
async def always_broken(job: qflow.Job[None]) -> None:
    log(f"always_broken attempt {job.attempt}")
    raise RuntimeError("this one never works")


async def main() -> None:
    async with app:
        webhook = await deliver_webhook.add("https://example.com/hook")
        limited = await call_rate_limited_api.add("GET /v1/things")
        broken = await always_broken.add(None, attempts=2)  # this job only: 2 attempts, not 10
        await app.run_worker(burst=True)  # waits out the backoff delays, then returns
        print("webhook:", await webhook.result(timeout=1))
        print("rate-limited call:", await limited.result(timeout=1))
        try:
            await broken.result(timeout=1)
        except qflow.JobFailed as exc:
            print(f"always_broken: failed for good: {exc.error_type}: {exc.message}")


if __name__ == "__main__":
    asyncio.run(main())
