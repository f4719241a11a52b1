"""A worker's two readers of its input (the main thread, and the watcher during a long slice)
never leave one of them blocked on bytes the other took.

The race is forced, not waited for: the mapfunc itself queues the next frame and
holds the read lock the way the watcher does, so the end of the slice finds the
input readable, waits for the lock, and only then learns the "watcher" read it.
It runs in a child process because a worker takes over its process's stdout.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import os, pickle, sys, threading, time
    from qjam_nb.worker import messages, protocol
    from qjam_nb.worker.core import WorkerCore
    from qjam_nb.worker.io import Channel, OutputPump, Shell
    from qjam_nb.worker.protocol import FrameDecoder

    report = os.dup(1)
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    channel = Channel(w_out, "w")
    core = WorkerCore("w")
    worker = Shell(core, r_in, channel)
    worker.pump = OutputPump(channel)
    core.call, core.params = 1, None
    core.cache.put("k", [1, 2])

    def task(index):
        return b"".join(bytes(c) for c in messages.encode(messages.Task("k"), 1, index))

    def like_the_watcher():
        time.sleep(0.3)  # the slice's end has seen the input readable, and waits for the lock
        worker.read_once()  # takes the next TASK, as the watcher does during a long slice
        worker.read_lock.release()

    def mapfunc(params, data):
        os.write(w_in, task(1))
        worker.read_lock.acquire()
        threading.Thread(target=like_the_watcher).start()
        return sum(data)

    core.func = mapfunc
    core.receive(task(0))
    (run,) = core.step()
    runner = threading.Thread(target=worker.run, args=(run,), daemon=True)
    runner.start()
    runner.join(5)
    decoder = FrameDecoder()
    os.set_blocking(r_out, False)
    try:
        decoder.feed(os.read(r_out, 1 << 16))
    except BlockingIOError:
        pass
    result = decoder.next_frame()
    os.write(report, repr({
        "hung": runner.is_alive(),
        "result": None if result is None else (result.kind.name, result.index),
        "queued": [f.index for f in core.inbox],
    }).encode())
    os._exit(0)
''')


def test_the_end_of_a_slice_does_not_block_on_input_the_watcher_read() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = ast.literal_eval(done.stdout)
    assert seen == {"hung": False, "result": ("RESULT", 0), "queued": [1]}, seen
