"""The supervisor's control socket against bad requests: a real ``qflow worker -p 1``, raw bytes on it.

Each malformed request gets an ``{"error": ...}`` reply naming what is wrong; the supervisor keeps running,
its child is never touched (same pid), and a valid ``scale`` afterwards still works.
"""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from qflow._cli.control import MAX_PROCESSES, MAX_REQUEST, control_request
from tests.process.fleet_app import Fleet

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGTTIN"), reason="POSIX signals")


def raw_request(path: Path, data: bytes, *, close_write: bool = True) -> dict[str, Any]:
    """Send ``data`` as is on the control socket (then half-close, unless told not to); decode the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5.0)
        s.connect(str(path))
        s.sendall(data)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.endswith(b"\n"), reply
    decoded: dict[str, Any] = json.loads(reply)
    return decoded


BAD_REQUESTS = [
    (b'{"cmd": "scale", "n": [1]}\n', "Expected `int`, got `array` - at `$.n`"),
    (b'{"cmd": "scale", "n": true}\n', "Expected `int`, got `bool`"),
    (b'{"cmd": "scale", "n": 2.0}\n', "Expected `int`, got `float`"),
    (b'{"cmd": "scale", "n": null}\n', "Expected `int`, got `null`"),
    (b'{"cmd": "scale", "n": 0}\n', "Expected `int` >= 1"),
    (b'{"cmd": "scale", "n": 100000000000000000000}\n', f"Expected `int` <= {MAX_PROCESSES}"),
    (b'{"cmd": "scale", "delta": "+1"}\n', "Expected `int`, got `str` - at `$.delta`"),
    (b'{"cmd": "scale"}\n', "exactly one of `n`"),
    (b'{"cmd": "scale", "n": 2, "delta": 1}\n', "exactly one of `n`"),
    (b'{"cmd": "status", "n": 1}\n', "unknown field `n`"),
    (b'{"cmd": "explode"}\n', "unknown command 'explode' (known: status, scale, restart)"),
    (b'{"cmd": 7}\n', "Expected `str`"),
    (b"{}\n", "missing required field `cmd`"),
    (b"[1, 2]\n", "Expected `object`, got `array`"),
    (b'"status"\n', "Expected `object`, got `str`"),
    (b"scale 3\n", "JSON is malformed"),
    (b"\xff\xfe\x00\n", "JSON is malformed"),
    (b'{"cmd": "sta', "Input data was truncated"),  # cut short: the client closed before its newline
    (b"\n", "empty request"),
    (b'{"cmd": "status", "pad": "' + b"x" * (MAX_REQUEST + 100) + b'"}\n', "request too large"),
]


async def test_malformed_control_requests_get_an_error_and_the_supervisor_and_children_live_on(
    fleet: Fleet,
) -> None:
    """Each bad request is answered with an error; the supervisor, its count and its child are kept."""
    sup = fleet.start("-p", "1")
    (first,) = await sup.wait_ready(1)
    path = fleet.run_dir / f"qflow-{sup.pid}.sock"
    for data, message in BAD_REQUESTS:
        reply = raw_request(path, data)
        assert set(reply) == {"error"}, (data[:60], reply)
        assert message in reply["error"], (data[:60], reply)
        assert sup.popen.poll() is None, sup.log()
    silent = raw_request(path, b'{"cmd": "sta', close_write=False)  # a client that never finishes its line
    assert "not received within" in silent["error"]
    over = raw_request(path, b'{"cmd": "scale", "delta": %d}\n' % MAX_PROCESSES)
    assert f"over the limit of {MAX_PROCESSES}" in over["error"]
    status = control_request(path, {"cmd": "status"})
    assert status["desired"] == 1
    assert [c["pid"] for c in status["children"]] == [first]
    assert "supervisor failed" not in sup.log()
    assert "SIGKILL" not in sup.log()

    up = control_request(path, {"cmd": "scale", "n": 2})
    assert up["desired"] == 2
    assert first in await sup.wait_ready(2)
    down = control_request(path, {"cmd": "scale", "delta": -5})  # never below one
    assert down["desired"] == 1
    assert await sup.wait_ready(1) == {first}
    too_many = fleet.cli("scale", str(sup.pid), str(MAX_PROCESSES + 1))
    assert too_many.returncode == 2  # ExitCode.USAGE, refused before it is sent
    assert f"from 1 to {MAX_PROCESSES}" in too_many.stderr
    assert sup.popen.poll() is None
