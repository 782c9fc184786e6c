"""Smoke job from an installed qflow: what a user gets from ``pip install qflow``, run as they would run it.

    python -I .ci/smoke.py --source CHECKOUT      # from a venv holding the built wheel, cwd outside CHECKOUT

1. ``import qflow`` must come from the interpreter's site-packages, not from CHECKOUT (so an editable install,
   or the current directory shadowing the wheel, fails here instead of hiding a missing file);
2. every file of CHECKOUT/qflow (modules, ``lua/*.lua``, ``py.typed``) is in the installed package;
3. a typed processor runs one job on the embedded server (no URL set, ``QFLOW_HOME`` in a fresh temp dir) and
   its result comes back;
4. the ``qflow`` console script stops that server (``qflow server stop``), and ``qflow server status`` then
   says it is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from importlib import metadata
from pathlib import Path

import msgspec

# Before qflow is used: only the embedded server, in a home of our own (never ./.qflow of whatever cwd is).
for variable in ("QFLOW_REDIS_URL", "REDIS_URL", "QFLOW_EMBEDDED"):
    os.environ.pop(variable, None)
HOME = Path(tempfile.mkdtemp(prefix="qflow-smoke-"))
os.environ["QFLOW_HOME"] = str(HOME / "home")

import qflow  # noqa: E402  (after QFLOW_HOME is set: nothing may read it first)

app = qflow.App()
greetings = app.queue("smoke")


class Greeting(msgspec.Struct):
    name: str


@greetings.processor(concurrency=2, timeout=10)
async def greet(job: qflow.Job[Greeting]) -> str:
    """A typed processor: the payload arrives decoded as a Greeting."""
    return f"hello, {job.payload.name}"


def fail(message: str) -> None:
    raise SystemExit(f"smoke: FAILED: {message}")


def check_installed_files(source: Path | None) -> None:
    package = Path(qflow.__file__).resolve().parent
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    if not package.is_relative_to(site):
        fail(f"qflow was imported from {package}, not from this interpreter's site-packages {site}")
    if source is not None:
        if package.is_relative_to(source.resolve()):
            fail(f"qflow was imported from the checkout {package}")
        expected = {
            path.relative_to(source / "qflow").as_posix()
            for path in (source / "qflow").rglob("*")
            if path.is_file() and "__pycache__" not in path.parts
        }
        missing = sorted(name for name in expected if not (package / name).is_file())
        if missing:
            fail(f"files of the source tree missing from the installed package: {missing}")
        print(f"smoke: all {len(expected)} files of qflow/ are installed in {package}")
    if not (package / "py.typed").is_file():
        fail(f"py.typed is missing from the installed package {package}")
    if not any(package.rglob("*.lua")):
        fail(f"no Lua script in the installed package {package}")


async def run_one_job() -> None:
    async with app:
        job = await greet.add(Greeting(name="wheel"))
        await asyncio.wait_for(app.run_worker(burst=True), timeout=60)
        result = await job.result(timeout=10)
        if result != "hello, wheel":
            fail(f"the job returned {result!r}, expected 'hello, wheel'")
        print(f"smoke: job {job.id} ran on the embedded server and returned {result!r}")


def qflow_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed console script, the way a user types it."""
    script = Path(sys.executable).with_name("qflow")
    if not script.is_file():
        fail(f"the console script {script} was not installed")
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=60, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--source", type=Path, help="the checkout the wheel was built from")
    args = parser.parse_args()
    try:
        print(f"smoke: qflow {metadata.version('qflow')} from {qflow.__file__}")
        check_installed_files(args.source)
        asyncio.run(run_one_job())
        stopped = qflow_cli("server", "stop")
        if stopped.returncode != 0 or not stopped.stdout.startswith("stopped"):
            fail(f"`qflow server stop` exited {stopped.returncode}: {stopped.stdout}{stopped.stderr}")
        print(f"smoke: qflow server stop: {stopped.stdout.strip()}")
        status = qflow_cli("server", "status")
        if status.returncode == 0:
            fail(f"the embedded server still runs after `qflow server stop`: {status.stdout}")
    finally:
        # Whatever failed above, leave no server behind: stopping one that is not running is a no-op.
        subprocess.run([sys.executable, "-m", "qflow", "server", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(HOME, ignore_errors=True)
    print("smoke: OK")


if __name__ == "__main__":
    main()
