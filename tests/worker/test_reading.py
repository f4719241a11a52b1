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
    from qjam_nb.worker import protocol
    from qjam_nb.worker.main import Channel, OutputPump, Worker
    from qjam_nb.worker.protocol import FrameDecoder, Kind

    report = os.dup(1)
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    channel = Channel(w_out, "w")
    worker = Worker("w", r_in, channel)
    worker.pump = OutputPump(channel)
    worker.call, worker.params, worker.cache["k"] = 1, None, [1, 2]

    def frame(index):
        decoder = FrameDecoder()
        decoder.feed(b"".join(bytes(c) for c in protocol.encode(Kind.TASK, {"key": "k"}, call=1, index=index)))
        return decoder.next_frame()

    def like_the_watcher():
        time.sleep(0.3)  # the slice's end has seen the input readable, and waits for the lock
        worker.read_once()  # takes the next TASK, as the watcher does during a long slice
        worker.read_lock.release()

    def mapfunc(params, data):
        os.write(w_in, b"".join(bytes(c) for c in protocol.encode(Kind.TASK, {"key": "k"}, call=1, index=1)))
        worker.read_lock.acquire()
        threading.Thread(target=like_the_watcher).start()
        return sum(data)

    worker.func = mapfunc
    runner = threading.Thread(target=worker.run_task, args=(frame(0),), daemon=True)
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
        "queued": [f.index for f in worker.frames],
    }).encode())
    os._exit(0)
''')


def test_the_end_of_a_slice_does_not_block_on_input_the_watcher_read() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = ast.literal_eval(done.stdout)
    assert seen == {"hung": False, "result": ("RESULT", 0), "queued": [1]}, seen
