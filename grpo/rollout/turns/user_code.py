"""User code (tools, environments) in a worker process, so that a timeout can really end it.

A thread that runs past its timeout cannot be stopped, and a call that keeps the interpreter busy (`7**(10**8)`)
holds it whatever the timeout says. A process can be killed. `UserProcess` starts a fresh interpreter running
`serve`, sends it a handler and its payload (a tool table, an environment class: pickled by reference, so the
worker imports their modules itself), then one request at a time. A request that outlives its timeout kills the
worker, and a fresh one starts at once with the same payload.

The worker ignores SIGINT and SIGTERM: a stop (Ctrl-C, `grpo stop`) lets the step in flight finish with real
answers, and every request is bounded by its timeout, so that step always ends. The worker ends with the training
process: at EOF on its socket when idle, and by SIGKILL on Linux (PR_SET_PDEATHSIG) when busy.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from grpo.errors import ConfigError

STARTUP_SECONDS = (
    120.0  # to import the user's modules; a request's own timeout starts once the worker is ready
)
BOOT = (
    "import json, sys; sys.path[:0] = json.loads(sys.argv[3]); "
    "from grpo.rollout.turns.user_code import serve; serve(int(sys.argv[1]), int(sys.argv[2]))"
)


def require_sendable(obj: Any, where: str, workers: str, what: str) -> None:
    """Refuse, before any model loads, user code its worker process could not find: the worker imports it by its
    module and name, so it must be what its module defines under that name (`what`: "a tool must be a function")."""
    try:
        pickle.dumps(obj)
    except Exception as e:
        raise ConfigError(
            f"{where} cannot be sent to the {workers}' worker process ({describe(e)}): {what} its module defines "
            "under its own name."
        ) from None


def describe(e: BaseException) -> str:
    """`Type: message`, even for an exception whose __str__ raises (user code may raise anything)."""
    name = type(e).__name__
    try:
        return f"{name}: {e}"
    except BaseException:
        return f"{name} (its message cannot be shown)"


class UserProcess:
    """A worker process for `handler(state, request) -> reply`, where state is the payload as unpickled there.

    `request` returns ("ok", reply), ("timeout", None), ("ended", exit code) when the worker died during the
    request, or ("unsendable", why) when the request cannot be pickled. Replies hold plain values only."""

    def __init__(self, handler: Callable[[Any, Any], Any], payload: Any, *, what: str):
        self.what = what  # names the user's setting in the one-line error when the worker cannot load it
        self.start_message = pickle.dumps((handler, payload))
        self.starts = 0  # how many workers this one has started (a replacement after each timeout)
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self.ready = False
        self._finalizer: weakref.finalize | None = None

    def request(self, message: Any, timeout: float) -> tuple[str, Any]:
        try:
            data = pickle.dumps(message)
        except Exception as e:  # e.g. arguments nested too deeply to pickle
            return "unsendable", describe(e)
        if self.proc is None or self.proc.poll() is not None:  # never started, or died while idle
            self._restart()
        try:
            self._wait_ready()
            assert self.conn is not None
            self.conn.send_bytes(data)
            if not self.conn.poll(timeout):
                self._restart()
                return "timeout", None
            return "ok", pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError):  # the worker died during the request (os._exit, a signal, no memory)
            code = self._end()
            self._restart()
            return "ended", code
        except BaseException:  # a second Ctrl-C: the worker may be mid-request, so it cannot be reused
            self._end()
            raise

    def close(self) -> None:
        self._end()

    def _restart(self) -> None:
        self._end()
        parent, child = socket.socketpair()
        with child:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", BOOT, str(child.fileno()), str(os.getpid()), json.dumps(_paths())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        self.conn = Connection(parent.detach())
        self.ready = False
        self.starts += 1
        self._finalizer = weakref.finalize(self, _kill, self.proc, self.conn)
        self.conn.send_bytes(self.start_message)  # the worker loads it while the caller goes on

    def _wait_ready(self) -> None:
        if self.ready:
            return
        assert self.conn is not None and self.proc is not None
        try:
            if not self.conn.poll(STARTUP_SECONDS):
                raise ConfigError(
                    f"{self.what}: its worker process did not start within {STARTUP_SECONDS:g} s."
                )
            status, text = pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            code = self._end()
            raise ConfigError(
                f"{self.what}: its worker process ended as it started (exit code {code})."
            ) from None
        if status != "ready":
            self._end()
            raise ConfigError(f"{self.what}: its worker process cannot load it ({text}).")
        self.ready = True

    def _end(self) -> int | None:
        """Kill the worker (if any) and reap it; its exit code."""
        if self._finalizer is not None:
            self._finalizer.detach()
        code = _kill(self.proc, self.conn) if self.proc is not None else None
        self.proc, self.conn, self._finalizer = None, None, None
        return code


def _kill(proc: subprocess.Popen[bytes], conn: Connection | None) -> int | None:
    if proc.poll() is None:
        proc.kill()
    code = proc.wait()
    if conn is not None:
        conn.close()
    return code


def _paths() -> list[str]:
    """The parent's import path, so that the worker finds every module the parent resolved (a test folder too)."""
    return [os.path.abspath(p) if p else os.getcwd() for p in sys.path]


# ---------------------------------------------------------------- in the worker
def serve(fd: int, parent: int) -> None:
    """The worker's loop: load the handler and its state, then answer each request until EOF."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    _die_with(parent)
    conn = Connection(fd)
    try:
        handler, state = pickle.loads(conn.recv_bytes())
    except BaseException as e:  # a module that no longer imports, a class renamed since the parent loaded it
        conn.send_bytes(pickle.dumps(("failed", describe(e))))
        return
    conn.send_bytes(pickle.dumps(("ready", None)))
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):  # the training process has gone
            return
        try:
            reply = handler(state, pickle.loads(data))
            out = pickle.dumps(reply)
        except BaseException as e:  # handlers catch the user's failures; this is a last resort
            out = pickle.dumps(("error", describe(e)))
        conn.send_bytes(out)


def _die_with(parent: int) -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: EOF on the socket still ends an idle worker
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)
