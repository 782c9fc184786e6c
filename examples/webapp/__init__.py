"""The web app from the story: an HTTP API that enqueues, and workers that do the work (see README.md)."""

from examples._extras import require

require("examples.webapp", "starlette", "uvicorn")
