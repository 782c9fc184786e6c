"""One module, two roles: an HTTP API (``api``) that only enqueues, and the jobs its workers run (``app``).

    uvicorn examples.webapp.app:api --port 8000          # the API process: answers, never runs jobs
    qflow worker examples.webapp.app:app -p 2 -c 20      # worker processes: run jobs, listen on no port

Both import this module. Importing it runs nothing: declaring processors only records them, so the API
needs no flag to keep it from consuming jobs. The one exception is deliberate and only for the measurement
in ``measure.py``: with ``WEBAPP_WORKER_IN_API=1`` the API also runs a worker inside its own event loop,
the "everything in one process" setup whose cost README.md measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import qflow

log = logging.getLogger(__name__)

app = qflow.App()
welcome = app.queue("webapp-welcome")
reports = app.queue("webapp-reports")


class NewUser(msgspec.Struct, forbid_unknown_fields=True):
    email: str
    name: str


@welcome.processor(concurrency=20, attempts=5, backoff=qflow.Backoff(delay=1.0, jitter=0.5))
async def send_welcome(job: qflow.Job[NewUser]) -> str:
    """I/O-bound: the wait for a mail provider's API. Cheap to run many at once in one process."""
    await asyncio.sleep(0.02)
    return f"welcome mail sent to {job.payload.email}"


def crunch(iterations: int) -> float:
    """Pure-Python CPU work standing in for a report, a thumbnail, a PDF; returns the milliseconds it took."""
    started = time.perf_counter()
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return (time.perf_counter() - started) * 1000


@reports.processor(concurrency=2)
def render_report(job: qflow.Job[int]) -> float:
    """CPU-bound, as plain ``def``: qflow runs it in a thread, off the event loop (but under the GIL)."""
    return crunch(job.payload)


@reports.processor(concurrency=2)
async def render_report_inline(job: qflow.Job[int]) -> float:
    """The same work as ``async def``: it never awaits, so it holds the event loop for its whole run."""
    return crunch(job.payload)


# -- the HTTP API -----------------------------------------------------------------------------------------


async def create_user(request: Request) -> JSONResponse:
    """``POST /users``: validate, enqueue the welcome mail, answer 202 at once (the mail goes out later)."""
    try:
        user = msgspec.json.decode(await request.body(), type=NewUser)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        return JSONResponse({"error": str(exc)}, status_code=422)
    # ... store the user in your database here ...
    job = await send_welcome.add(user)
    return JSONResponse({"job_id": job.id, "status": f"/jobs/{job.id}"}, status_code=202)


async def job_status(request: Request) -> JSONResponse:
    """``GET /jobs/{id}``: where the welcome job is, and its result once it is done."""
    job = welcome.job(request.path_params["job_id"])
    state = await job.status()
    if state is None:
        return JSONResponse({"error": "no such job"}, status_code=404)
    body: dict[str, object] = {"job_id": job.id, "state": state.value}
    if state is qflow.State.COMPLETED:
        body["result"] = await job.result(timeout=1)
    return JSONResponse(body)


async def health(request: Request) -> JSONResponse:
    """``GET /health``: the process answers (used by ``measure.py`` to know the API is up)."""
    return JSONResponse({"ok": True, "pid": os.getpid()})


@contextlib.asynccontextmanager
async def lifespan(_: Starlette) -> AsyncIterator[None]:
    worker: qflow.Worker | None = None
    running: asyncio.Task[None] | None = None
    if os.environ.get("WEBAPP_WORKER_IN_API") == "1":
        # The anti-pattern, on purpose: jobs run in the API's own process and event loop.
        log.warning("WEBAPP_WORKER_IN_API=1: this API process also runs jobs")
        worker = qflow.Worker(app)
        running = asyncio.create_task(worker.run())
    try:
        yield
    finally:
        if worker is not None and running is not None:
            worker.stop()  # drain: finish or release the jobs in flight
            await running
        await app.close()  # one connection pool per process, closed on shutdown


api = Starlette(
    routes=[
        Route("/users", create_user, methods=["POST"]),
        Route("/jobs/{job_id}", job_status, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ],
    lifespan=lifespan,
)
