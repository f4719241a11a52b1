"""Local workers forked from one process that has already started Python and imported the worker.

Starting a worker as a new interpreter costs ~0.1 s of CPU here (Python itself,
then cloudpickle and this package): 16 workers on 2 cores took 1.5 s to come
up. This server pays that once, then forks a worker per request in ~2 ms. It
runs single-threaded and imports nothing that starts threads (numpy is never
imported here), so forking it is safe.

The master talks to it over a ``SOCK_SEQPACKET`` socket (one message each
way per request, file descriptors alongside):

* request: JSON ``{"name", "env", "cwd"}`` with the worker's stdin, stdout and
  stderr pipe ends; the server forks, and the child takes them as 0, 1, 2,
  starts a session of its own, takes the environment and directory, and runs
  ``main.main(name)``;
* reply: JSON ``{"pid"}`` with a pidfd of the child (signals reach it and no
  other process, even once its pid is reused);
* at any time: JSON ``{"exited", "status"}`` for a child that ended (status as
  ``subprocess`` gives it: the exit code, or minus the signal).

An empty message (the master closed its end) ends the server; its workers
run on until their own stdin closes.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import socket
import sys
import threading
import traceback

from . import main as worker_main


def serve(fd: int) -> None:
    """Answer requests on the socket ``fd`` until the master closes it (or goes away)."""
    try:
        _serve(socket.socket(fileno=fd))
    except (BrokenPipeError, ConnectionResetError):
        pass


def _serve(sock: socket.socket) -> None:
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wake-up fd hears of it
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    sock.send(json.dumps({"ready": os.getpid()}).encode())
    while True:
        for key, _ in selector.select():
            if key.fileobj is sock:
                message, fds, _, _ = socket.recv_fds(sock, 1 << 20, 3)
                if not message:
                    return
                _fork(json.loads(message), fds, sock, (wake_r, wake_w, selector))
            else:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
            _reap(sock)


def _fork(request: dict, fds: list[int], sock: socket.socket, mine: tuple) -> None:
    pid = os.fork()
    if pid == 0:
        _run_worker(request, fds, sock, mine)
    for f in fds:
        os.close(f)
    pidfd = os.pidfd_open(pid)
    try:
        socket.send_fds(sock, [json.dumps({"pid": pid}).encode()], [pidfd])
    finally:
        os.close(pidfd)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.send(json.dumps({"exited": pid, "status": os.waitstatus_to_exitcode(status)}).encode())


def _run_worker(request: dict, fds: list[int], sock: socket.socket, mine: tuple) -> None:
    """In the child: become the worker a fresh ``python -c`` would have been; never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock.close()
        wake_r, wake_w, selector = mine
        selector.close()
        os.close(wake_r)
        os.close(wake_w)
        os.setsid()  # Ctrl-C in a terminal reaches the master only
        for target, f in enumerate(fds):
            os.dup2(f, target)
        for f in fds:
            if f > 2:
                os.close(f)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = ["-c"]
        worker_main.main(request["name"])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:  # as the interpreter would at exit: its other threads, then atexit
            threading._shutdown()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)
