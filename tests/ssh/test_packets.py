"""A message to an ssh worker leaves in full packets: its small chunks (header, pickle, a TASK) share one
with the head of its big buffer, and the bytes arrive as they were, in order, whatever the chunks' sizes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qjam_nb.transport.ssh import PACKET_SIZE, WINDOW_SIZE, SshProcess, SshTransport


@pytest.fixture(scope="module")
def echo(ssh_world):
    """An SshProcess whose channel runs ``cat``: what it is sent comes back."""
    host = SshTransport("sshhost")
    channel = host.transport.open_session(window_size=WINDOW_SIZE, max_packet_size=PACKET_SIZE)
    channel.exec_command("exec cat")
    yield SshProcess("sshhost/cat", channel, host)
    channel.close()
    host.close()


def chunk_sizes(packet: int):
    """Sizes around a packet's, small ones and none at all, as frames are cut."""
    near = st.integers(-3, 3).flatmap(lambda d: st.sampled_from([packet + d, 2 * packet + d, packet // 2 + d]))
    return st.lists(st.one_of(st.integers(0, 300), near, st.integers(0, 3 * packet)), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_chunks_arrive_whole_and_in_order_in_full_packets(echo, data):
    channel = echo.channel
    packet = channel.out_max_packet_size
    sizes = data.draw(chunk_sizes(packet))
    chunks = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    sent: list[int] = []
    real_sendall = channel.sendall
    channel.sendall = lambda view: (sent.append(len(view)), real_sendall(view))[1]
    try:
        echo.write(chunks)
    finally:
        del channel.sendall  # back to the class's method
    expected = b"".join(chunks)
    got = bytearray()
    while len(got) < len(expected):
        got += channel.recv(len(expected) - len(got))
    assert bytes(got) == expected
    assert sum(sent) == len(expected)
    assert all(n % packet == 0 and n for n in sent[:-1]), f"a packet before the last is not full: {sent}"
    assert len(sent) <= len(expected) // packet + 1 + sum(1 for n in sizes if n >= packet)
