"""The stdio entry on POSIX: a byte relay in front of the real server, which runs in its own session.

Why: the official SDK's stdio client ends a server by closing its stdin, then 2 s later SIGTERMs
the server's whole process group and 2 s after that SIGKILLs it; a gateway call takes 10-120 s
and is paid for once sent. So the process the host sees (this relay, in the host's process
group) is not the one that does the work: the server runs as a child in a new session, which
the group kill does not reach. The relay copies bytes both ways and nothing else. When the
host closes stdin (or kills the relay: its pipes close with it), the server sees EOF, stops
taking calls, closes its stdout (the relay exits at once, so the host is never kept waiting),
finishes and saves the requests already sent, and exits (shutdown.py).

The server is a fork of the relay, made before anything heavy is imported, so the relay costs no
second interpreter start. Windows has no process groups to escape: the server runs in-process
there, as before.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

WORKER_ENV = "MCP_IMAGEGEN_STDIO_WORKER"  # set in the child: serve, do not relay again
CHUNK = 256 * 1024
EXIT_WAIT_S = 1.0  # a server that closed its stdout and still runs is finishing its work


def wanted() -> bool:
    # A terminal on stdin is a person trying the command, not a host that kills process groups:
    # the server runs in place and tells them what it is waiting for.
    return os.name == "posix" and not os.environ.get(WORKER_ENV) and not os.isatty(0)


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


def run() -> int | None:
    """Fork the server off in a new session and relay its stdin and stdout.

    Returns the exit code in the relay, and None in the server (the child), which goes on to
    serve. The fork happens before anything heavy is imported and before any thread starts, so
    the server needs no second interpreter start: it imports what it needs from here on.
    """
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the server: a session of its own, the pipes as its stdin and stdout
        os.setsid()
        os.dup2(in_r, 0)
        os.dup2(out_w, 1)
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)
        os.environ[WORKER_ENV] = "1"
        return None
    os.close(in_r)
    os.close(out_w)
    import threading  # only now: the server starts meanwhile

    closer = _Once(in_w, threading.Lock())
    threading.Thread(target=_copy_in, args=(in_w, closer), name="stdin relay", daemon=True).start()
    try:
        _copy(out_r, 1)
    except KeyboardInterrupt:
        return 130
    finally:
        # Whatever ended the copy (the server closed its stdout, the host stopped reading), the
        # server must see EOF now, not when this process is reaped.
        closer.close()
    return _exit_code(pid, EXIT_WAIT_S)


def _exit_code(pid: int, wait_s: float) -> int:
    """The server's exit code, or 0 if it is still saving what it was paid for after `wait_s`."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return 0  # out of the host's way; it exits on its own
        time.sleep(0.01)


class _Once:
    """Closes the server's stdin once, whichever side gets there first."""

    def __init__(self, fd: int, lock: Any) -> None:
        self._fd = fd
        self._lock = lock

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                try:
                    os.close(self._fd)
                except OSError:
                    pass
                self._fd = -1


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
