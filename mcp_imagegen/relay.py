"""The stdio entry on POSIX: a byte relay in front of the real server, which runs in its own session.

Why: the official SDK's stdio client ends a server by closing its stdin, then 2 s later SIGTERMs
the server's whole process group and 2 s after that SIGKILLs it; a gateway call takes 10-120 s
and is paid for once sent. So the process the host sees (this relay, in the host's process
group) is not the one that does the work: the server runs as a child in a new session, which
the group kill does not reach. The relay copies bytes both ways and nothing else. When the
host closes stdin (or kills the relay: its pipes close with it), the server sees EOF, stops
taking calls, closes its stdout (the relay exits at once, so the host is never kept waiting),
finishes and saves the requests already sent, and exits (shutdown.py).

The relay imports nothing heavy, so it adds one small interpreter start to the server's own.
Windows has no process groups to escape: the server runs in-process there, as before.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO

WORKER_ENV = "MCP_IMAGEGEN_STDIO_WORKER"  # set in the child: serve, do not relay again
CHUNK = 256 * 1024
EXIT_WAIT_S = 1.0  # a server that closed its stdout and still runs is finishing its work


def wanted() -> bool:
    return os.name == "posix" and not os.environ.get(WORKER_ENV)


_VALUE_OPTIONS = frozenset({"--transport", "--host", "--port", "--auth-token", "--log-level"})
_FLAG_OPTIONS = frozenset({"--stateless", "--allow-unauthenticated"})


def serves_stdio(args: Sequence[str]) -> bool:
    """Whether the command line asks for the stdio server, read without argparse (which costs
    more than the rest of the relay). Anything unusual (help, another command, an unknown
    option) answers False: the real parser then decides, and a stdio server still relays."""
    transport = "stdio"
    command_seen = False
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if arg == "serve" and not command_seen:
            command_seen = True
        elif arg in _FLAG_OPTIONS:
            pass
        elif eq and name in _VALUE_OPTIONS:
            transport = value if name == "--transport" else transport
        elif arg in _VALUE_OPTIONS and i + 1 < len(args):
            transport = args[i + 1] if arg == "--transport" else transport
            i += 1
        else:
            return False
        i += 1
    return transport == "stdio"


def run(argv: Sequence[str]) -> int:
    env = dict(os.environ)
    env[WORKER_ENV] = "1"
    # The same interpreter options (-X importtime, -X dev, -O, -I...) as the relay was given.
    flags = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    child = subprocess.Popen(
        [sys.executable, *flags, "-m", "mcp_imagegen", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,  # the server's log goes straight to the host's stderr
        start_new_session=True,
        env=env,
        bufsize=0,
    )
    assert child.stdin is not None and child.stdout is not None
    to_child = _Once(child.stdin)
    threading.Thread(target=_copy_in, args=(child.stdin.fileno(), to_child), name="stdin relay", daemon=True).start()
    try:
        _copy(child.stdout.fileno(), 1)
    except KeyboardInterrupt:
        return 130
    finally:
        # Whatever ended the copy (the server closed its stdout, the host stopped reading), the
        # server must see EOF now, not when this process is reaped.
        to_child.close()
    try:
        return child.wait(EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        return 0  # still saving what it was paid for, out of the host's way


class _Once:
    """Closes the server's stdin once, whichever side gets there first."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._pipe = pipe
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            try:
                self._pipe.close()
            except OSError:
                pass


def _copy_in(target: int, closer: _Once) -> None:
    try:
        _copy(0, target)
    finally:
        closer.close()


def _copy(source: int, target: int) -> None:
    """Copy until EOF on `source` or an error on either end."""
    while True:
        try:
            data = os.read(source, CHUNK)
        except OSError:
            return
        if not data:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(target, view) :]
        except OSError:  # the other end is gone
            return
