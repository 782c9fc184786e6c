"""A web framework's lifespan: one qflow connection pool for the whole API process, closed on shutdown.

    python -m examples.patterns.lifespan

The API process builds nothing per request: the module-level ``app`` keeps one connection pool per event
loop, opened on first use. The lifespan's only job is to close it when the server stops (``await
app.close()``), so shutdown does not leave sockets for the garbage collector. With FastAPI it is the same
function: ``FastAPI(lifespan=lifespan)``.

Run as a script, it serves the API in this process on a free port, sends it two requests, runs a burst
worker to do the job (in production: ``qflow worker examples.patterns.lifespan:app``, in its own
processes), reads the result through the API, and shuts the server down, which closes the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

from examples._extras import require

try:
    import httpx
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
except ModuleNotFoundError:  # name the extra to install, not a traceback
    require("examples.patterns.lifespan", "httpx", "starlette", "uvicorn")
    raise

import qflow

app = qflow.App()
thumbnails = app.queue("patterns-lifespan")


@thumbnails.processor(concurrency=4)
async def make_thumbnail(job: qflow.Job[str]) -> str:
    await asyncio.sleep(0.01)  # fetch, resize, upload...
    return f"{job.payload}.thumb.jpg"


@contextlib.asynccontextmanager
async def lifespan(_: Starlette) -> AsyncIterator[None]:
    # Nothing to open: the pool opens on the first command. Workers are NOT started here: this is the API.
    yield
    await app.close()
    print("lifespan: connection pool closed")


async def upload(request: Request) -> JSONResponse:
    name = request.path_params["name"]
    job = await make_thumbnail.add(name)
    return JSONResponse({"job_id": job.id}, status_code=202)


async def thumbnail(request: Request) -> JSONResponse:
    """The result if the job finishes within ``?wait=`` seconds (default 1), else 202 and its state."""
    job = thumbnails.job(request.path_params["job_id"])
    wait = min(float(request.query_params.get("wait", "1")), 10.0)
    try:
        return JSONResponse({"thumbnail": await job.result(timeout=wait)})
    except qflow.ResultTimeout:
        return JSONResponse({"state": str(await job.status())}, status_code=202)
    except qflow.JobNotFound:
        return JSONResponse({"error": "no such job"}, status_code=404)


api = Starlette(
    routes=[
        Route("/images/{name}", upload, methods=["PUT"]),
        Route("/thumbnails/{job_id}", thumbnail, methods=["GET"]),
    ],
    lifespan=lifespan,
)


async def demo() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # connections wait in the backlog until uvicorn has run the lifespan and serves
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(api, log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            created = await client.put("/images/cat.jpg")
            job_id = created.json()["job_id"]
            print("PUT /images/cat.jpg ->", created.status_code, "job", job_id)
            pending = await client.get(f"/thumbnails/{job_id}", params={"wait": 0.1})
            print("GET before any worker ran ->", pending.status_code, pending.json())
            await app.run_worker(burst=True)  # stands in for `qflow worker ...` in another process
            done = await client.get(f"/thumbnails/{job_id}")
            print("GET after the worker ran ->", done.status_code, done.json())
    finally:
        server.should_exit = True
        await serving
        sock.close()


if __name__ == "__main__":
    asyncio.run(demo())
