"""A big writable array is hashed again only where the kernel saw it written, and its keys are always right."""

from __future__ import annotations

import ctypes
import gc
import mmap
import subprocess
import sys
import threading
from multiprocessing import shared_memory

import numpy as np
import pytest
from arrays import page_aligned
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qjam_nb import DataSet
from qjam_nb.dataset import GUESS_KEYS_FROM
from qjam_nb.writewatch import WriteWatch

ROWS, COLS = 1024, 1024  # float64: 8 MiB, in 64 slices of 16 rows


def big_array() -> np.ndarray:
    """On pages of its own (``page_aligned``): only writes to the array mark them written."""
    X = page_aligned(np.random.default_rng(1).random((ROWS, COLS)))
    assert X.nbytes >= GUESS_KEYS_FROM and X.flags.writeable
    return X


def fresh_keys(ds: DataSet) -> list:
    return [ds.key_and_size(i) for i in range(len(ds))]


def skip_unless_watchable(X: np.ndarray) -> None:
    try:
        WriteWatch(X.ctypes.data, X.nbytes)
    except OSError as e:
        pytest.skip(f"this kernel cannot say which pages were written: {e}")


@pytest.fixture
def watched():
    """A big array, hashed once with its pages watched (skipped where this kernel cannot watch)."""
    X = big_array()
    skip_unless_watchable(X)
    ds = DataSet(X, 16)
    return X, ds, ds.keys_and_sizes()


def test_an_unchanged_array_is_not_hashed_again(watched, hashes):
    X, ds, first = watched
    assert ds.guessed_keys() is None  # its true keys cost less than a guess
    for _ in range(3):
        assert ds.keys_and_sizes() == first
    assert hashes[0] == 0


def test_only_the_slices_written_are_hashed_again(watched, hashes):
    X, ds, first = watched
    was = X[5 * 16 + 3, 7]
    X[5 * 16 + 3, 7] = -2.0
    X[40 * 16, 0] = -1.0
    second = ds.keys_and_sizes()
    assert [i for i in range(len(ds)) if first[i] != second[i]] == [5, 40]
    # A page can hold the end of one slice and the start of the next: at most those are hashed too.
    assert 2 <= hashes[0] <= 4
    assert second == fresh_keys(ds)
    X[5 * 16 + 3, 7] = was  # written back as it was: hashed again, the same key as before
    assert ds.keys_and_sizes()[5] == first[5]


def write_with_numpy(X, row):
    X[row] *= 2.0


def write_with_ctypes(X, row):
    ctypes.memset(X[row:].ctypes.data, 0x3F, 8)


def write_from_another_thread(X, row):
    thread = threading.Thread(target=X.__setitem__, args=((row, 0), 5.0))
    thread.start()
    thread.join()


def write_with_the_kernel(X, row, tmp_path):
    path = tmp_path / "row.bin"
    path.write_bytes(np.full(COLS, 7.0).tobytes())
    with open(path, "rb", buffering=0) as f:
        assert f.readinto(memoryview(X[row])) == X[row].nbytes  # read(2) into the array: no user-mode write


def drop_the_pages(X, row):
    """MADV_DONTNEED on the whole pages inside the row: they read as zeros afterwards."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    start = -(-X[row].ctypes.data // page) * page
    assert libc.madvise(start, page, 4) == 0, ctypes.get_errno()  # 4: MADV_DONTNEED
    assert not X[row].all()


WRITERS = {
    "numpy": write_with_numpy,
    "ctypes": write_with_ctypes,
    "thread": write_from_another_thread,
    "read(2)": write_with_the_kernel,
    "madvise": drop_the_pages,
}


@pytest.mark.parametrize("how", WRITERS)
def test_every_way_of_writing_the_array_is_seen(watched, how, tmp_path):
    X, ds, first = watched
    row = 700
    writer = WRITERS[how]
    writer(X, row, tmp_path) if how == "read(2)" else writer(X, row)
    second = ds.keys_and_sizes()
    assert second[row // 16] != first[row // 16]
    assert second == fresh_keys(ds)


def test_a_view_is_watched_and_sees_writes_through_its_base(hashes):
    X = big_array()
    view = X[100:900]
    ds = DataSet(view, 16)
    first = ds.keys_and_sizes()
    hashed = hashes[0]
    X[100 + 16 * 10, 3] = 42.0  # through the base, not the view
    second = ds.keys_and_sizes()
    assert second == fresh_keys(ds) and second[10] != first[10]
    assert hashes[0] - hashed <= len(ds) + 3  # fresh_keys, and at most 3 slices for the call


def test_two_datasets_on_the_same_memory_each_see_every_write(hashes):
    """Hashing one protects its written pages again: the other, watching them too, must still hear of it."""
    X = big_array()
    whole, view = DataSet(X, 16), DataSet(X[96:928], 16)
    before = whole.keys_and_sizes(), view.keys_and_sizes()
    X[500, 1] = -3.0  # slice 31 of the whole, 25 of the view
    after_whole = whole.keys_and_sizes()
    after_view = view.keys_and_sizes()
    assert [i for i in range(len(whole)) if before[0][i] != after_whole[i]] == [31]
    assert [i for i in range(len(view)) if before[1][i] != after_view[i]] == [25]
    assert after_view == fresh_keys(view) and after_whole == fresh_keys(whole)


def test_an_array_rewritten_each_call_is_hashed_whole_and_watched_again_once_left_alone(watched, hashes):
    X, ds, first = watched
    X += 1.0  # every page: watching costs more than hashing here
    assert ds.keys_and_sizes() == fresh_keys(ds)
    assert ds.guessed_keys() is not None  # not watched: the next call starts on guesses
    X += 1.0
    assert ds.keys_and_sizes() == fresh_keys(ds)
    assert ds.keys_and_sizes() == fresh_keys(ds)  # left alone: the full hash finds the same keys
    now = ds.keys_and_sizes()  # ...so this hash was made under a fresh watch
    assert ds.guessed_keys() is None
    counted = hashes[0]
    assert ds.keys_and_sizes() == now and hashes[0] == counted
    X[0, 0] = 3.0
    assert ds.keys_and_sizes() == fresh_keys(ds)


def watched_by_userfaultfd(address: int) -> bool:
    """The kernel's own word (``uw`` in the mapping's VmFlags, /proc/self/smaps) on ``address``."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low <= address < high
            elif inside and head == "VmFlags:":
                return "uw" in line.split()
    raise AssertionError(f"no mapping holds {address:#x}")


def test_the_pages_of_an_array_that_died_are_let_go():
    """Its memory may hold other data next (the view's owner lives on here): no more write faults."""
    X = big_array()
    skip_unless_watchable(X)
    DataSet(X, 16).keys_and_sizes()
    owner, address = X.base, X.ctypes.data
    assert watched_by_userfaultfd(address)
    del X
    gc.collect()
    assert not watched_by_userfaultfd(address)
    owner[:] = 1  # still the owner's memory, written as usual
    assert owner.all()


def test_an_array_of_objects_is_hashed_every_call():
    """Its objects can change with no write to the array's own memory."""
    items = [1.0]
    X = np.empty(600_000, dtype=object)  # 4.6 MiB of references, all to the same list
    X.fill(items)
    assert X.nbytes >= GUESS_KEYS_FROM
    ds = DataSet(X, 20_000)
    before = ds.keys_and_sizes()
    items.append(2.0)
    assert ds.keys_and_sizes() == fresh_keys(ds) != before


def test_a_call_interrupted_while_hashing_written_slices_sees_them_next_time(watched, monkeypatch):
    """The written pages are protected again before they are hashed: an interrupt in between must not
    leave the old keys trusted."""
    X, ds, first = watched
    X[300, 0] = -7.0
    original = DataSet.key_and_size

    def interrupted(self, index):
        raise KeyboardInterrupt

    monkeypatch.setattr(DataSet, "key_and_size", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ds.keys_and_sizes()
    monkeypatch.setattr(DataSet, "key_and_size", original)
    second = ds.keys_and_sizes()
    assert second == fresh_keys(ds) and second[300 // 16] != first[300 // 16]


def test_a_view_that_died_leaves_the_whole_arrays_watch_in_place(hashes):
    """A fresh view each call (``X[96:928]``) is a new watch each time; the one it replaces lets go only
    of what no other watch covers."""
    X = big_array()
    skip_unless_watchable(X)
    whole = DataSet(X, 16)
    first = whole.keys_and_sizes()
    for _ in range(2):
        DataSet(X[96:928], 16).keys_and_sizes()
        gc.collect()
    assert watched_by_userfaultfd(X[500:].ctypes.data)
    counted = hashes[0]
    assert whole.keys_and_sizes() == first and hashes[0] == counted  # still watched: nothing hashed
    X[500, 0] = -1.0
    assert whole.keys_and_sizes() == fresh_keys(whole) != first


def test_shared_memory_is_not_watched_and_a_write_from_another_process_is_seen(hashes):
    """Another process writes shared memory through its own page tables, which this one's watch would miss."""
    shm = shared_memory.SharedMemory(create=True, size=ROWS * COLS * 8)
    try:
        X = np.ndarray((ROWS, COLS), buffer=shm.buf)
        X[:] = 1.0
        ds = DataSet(X, 16)
        first = ds.keys_and_sizes()
        writer = (
            "import numpy as np, sys\nfrom multiprocessing import shared_memory, resource_tracker\n"
            "shm = shared_memory.SharedMemory(name=sys.argv[1])\n"
            "resource_tracker.unregister(shm._name, 'shared_memory')\n"
            f"np.ndarray(({ROWS}, {COLS}), buffer=shm.buf)[300, 5] = 2.0\n"
            "shm.close()\n"
        )
        subprocess.run([sys.executable, "-c", writer, shm.name], check=True)
        second = ds.keys_and_sizes()
        assert [i for i in range(len(ds)) if first[i] != second[i]] == [300 // 16]
        del X, ds
    finally:
        shm.close()
        shm.unlink()


def test_a_watch_refuses_memory_another_process_could_write(tmp_path):
    shm = shared_memory.SharedMemory(create=True, size=1 << 20)
    try:
        with pytest.raises(OSError, match="shared or backed by a file"):
            WriteWatch(ctypes.addressof(ctypes.c_char.from_buffer(shm.buf)), 1 << 20)
    finally:
        shm.close()
        shm.unlink()


WRITES = st.lists(
    st.tuples(st.sampled_from(sorted(WRITERS.keys() - {"read(2)"})), st.integers(0, ROWS - 1)),
    max_size=6,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(WRITES, st.permutations(range(3))), min_size=1, max_size=5), st.booleans())
def test_keys_after_any_writes_are_those_of_a_fresh_hash(monkeypatch, rounds, watch):
    """Watched or hashed every call, whatever was written between calls, and with other datasets on
    the same memory looked at in any order: the keys are the content's."""
    from qjam_nb import writewatch

    monkeypatch.setattr(writewatch, "enabled", watch)
    X = big_array()
    views = [X, X[96:928], X[500:]]
    for view in views:
        DataSet(view, 16).keys_and_sizes()
    for writes, order in rounds:
        for how, row in writes:
            WRITERS[how](X, row)
        for i in order:
            ds = DataSet(views[i], 16)
            assert ds.keys_and_sizes() == fresh_keys(ds)
