"""Waiting for a job's result, with a timeout, from the process that enqueued it or from any other.

    python -m examples.patterns.wait_result

``await job.result(timeout=...)`` blocks on the server (no polling) until the job finishes. Running out of
time raises ``qflow.ResultTimeout`` and leaves the job alone: it keeps running, and you can wait again or
look later by id. A job that ended in failure raises ``qflow.JobFailed`` with the error's type and message.
"""

from __future__ import annotations

import asyncio

import qflow

app = qflow.App()
quotes = app.queue("patterns-wait")


@quotes.processor(concurrency=4)
async def price_quote(job: qflow.Job[dict[str, float]]) -> float:
    await asyncio.sleep(job.payload.get("takes", 0.0))  # a slow upstream service
    if job.payload["amount"] < 0:
        raise ValueError("amount must be positive")
    return round(job.payload["amount"] * 1.2, 2)


async def main() -> None:
    async with app:
        slow = await price_quote.add({"amount": 100.0, "takes": 0.6})
        bad = await price_quote.add({"amount": -1.0})
        # Stands in for `qflow worker examples.patterns.wait_result:app` running elsewhere.
        worker = asyncio.create_task(app.run_worker(burst=True))

        try:
            await slow.result(timeout=0.3)
        except qflow.ResultTimeout:
            print("after 0.3 s: not finished yet, state:", await slow.status())
        print("waiting longer:", await slow.result(timeout=5))

        # Any process can wait by id, e.g. an API handler given the id by its client.
        same_job = quotes.job(slow.id)
        print("by id, from a fresh handle:", await same_job.result(timeout=1))

        try:
            await bad.result(timeout=5)
        except qflow.JobFailed as exc:
            print(f"failed: {exc.error_type}: {exc.message}")

        try:
            await quotes.job("no-such-id").result(timeout=1)
        except qflow.JobNotFound:
            print("unknown id: JobNotFound")
        await worker


if __name__ == "__main__":
    asyncio.run(main())
