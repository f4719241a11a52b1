"""Reaching a host over a real sshd: ~/.ssh/config, options and QJAM_USER, ProxyJump, the cipher, and each way it fails.

Each test writes a HOME of its own (``home``): a ``~/.ssh/config`` with the
aliases it needs and a known_hosts that knows both private sshds; the shared
HOME of ``ssh_world`` is never touched. A failure must be a ``HostError``
naming the host and the stage, and leave nothing half open: no paramiko
Transport thread here, no new session process under the sshd.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest
import sshd

from qjam_nb import Cluster, HostError, HostReady
from qjam_nb.transport.ssh import SshOptions, SshTransport, run

ME = getpass.getuser()
NOBODY = "qjam-no-such-user"
GCM = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def entry(alias: str, hostname: str, port: int | None = None, user: str | None = ME,
          identity: str | Path | None = None, **more: str) -> str:
    """A ``~/.ssh/config`` block; the options left at None are not written."""
    options = {"HostName": hostname, "Port": port, "User": user, "IdentityFile": identity, **more}
    return f"Host {alias}\n" + "".join(f"  {k} {v}\n" for k, v in options.items() if v is not None) + "\n"


@pytest.fixture
def home(ssh_world, tmp_path, monkeypatch):
    """``make(config, keys=True)``: a HOME of this test's own; ``keys`` copies the client key to ~/.ssh/id_ed25519."""

    def make(config: str, keys: bool = True) -> Path:
        root = tmp_path / "home"
        ssh = root / ".ssh"
        ssh.mkdir(parents=True, mode=0o700)
        (ssh / "config").write_text(config)
        (ssh / "known_hosts").write_text("".join(h.known_hosts_line() for h in ssh_world.hosts))
        if keys:
            shutil.copy(ssh_world.key, ssh / "id_ed25519")
        monkeypatch.setenv("HOME", str(root))
        return root

    return make


def shared_aliases(ssh_world) -> str:
    """``sshhost`` and ``sshhost2``, as in the shared config."""
    (h1, h2) = ssh_world.hosts
    return (entry("sshhost", h1.address, h1.port, identity=ssh_world.key)
            + entry("sshhost2", h2.address, h2.port, identity=ssh_world.key))


def ready_events(hosts, **options) -> tuple[dict, int]:
    """Start a cluster on ``hosts``, check a map, and return its HostReady events by host."""
    seen: list = []
    with Cluster(hosts, echo=False, observers=[seen.append], **options) as cluster:
        assert cluster.map(lambda p, xs: sum(xs) + p, 1, list(range(20)), slice_size=5) == 194
    return {e.host: e for e in seen if isinstance(e, HostReady)}


def served_by(transport: SshTransport) -> tuple[str, str]:
    """The sshd address and port a session on ``transport`` landed on, from its $SSH_CONNECTION."""
    status, out, _ = run(transport.transport, "echo $SSH_CONNECTION", timeout=10)
    assert status == 0
    return tuple(out.split()[2:4])


def transports() -> set:
    return {t for t in threading.enumerate() if isinstance(t, paramiko.Transport) and t.is_alive()}


class NothingLeftOpen:
    """Snapshot of Transports and sshd sessions; ``check()`` waits until nothing new is left."""

    def __init__(self, hosts) -> None:
        self.hosts = hosts
        self.transports = transports()
        self.sessions = self._sessions()

    def _sessions(self) -> set:
        return {pid for h in self.hosts for pid in sshd.processes_under(h.process.pid)}

    def check(self) -> None:
        deadline = time.monotonic() + 5
        while (transports() - self.transports or self._sessions() - self.sessions) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert transports() - self.transports == set()
        assert self._sessions() - self.sessions == set()


def refused(hosts, world, **options) -> HostError:
    """The HostError a cluster on ``hosts`` fails with, checked to leave nothing open."""
    snapshot = NothingLeftOpen(world.hosts)
    with pytest.raises(HostError) as info:
        Cluster(hosts, echo=False, **options)
    snapshot.check()
    return info.value


# -- resolution through ~/.ssh/config and the options -----------------------------------------


def test_hostname_port_user_and_identityfile_come_from_the_config(ssh_world, home):
    (h1, h2) = ssh_world.hosts
    root = home(entry("one", h1.address, h1.port, identity="~/keys/mine")
                + entry("two", h2.address, h2.port, identity="~/keys/mine"), keys=False)
    (root / "keys").mkdir()
    shutil.copy(ssh_world.key, root / "keys" / "mine")  # not a default key name: only IdentityFile finds it
    ready = ready_events(["one", "two"])
    assert ready["one"].detail.startswith(f"{ME}@127.0.0.1:{h1.port} (")
    assert ready["two"].detail.startswith(f"{ME}@127.0.0.2:{h2.port} (")


def test_explicit_user_and_port_override_the_config(ssh_world, home):
    h1 = ssh_world.hosts[0]
    closed = sshd.free_port("127.0.0.1")
    home(entry("wrong", h1.address, closed, user=NOBODY))
    error = refused(["wrong"], ssh_world)  # the config's values are in force...
    assert (error.host, error.stage) == ("wrong", "connecting")
    assert f"port {closed}" in str(error)
    error = refused(["wrong"], ssh_world, port=h1.port)
    assert error.stage == f"logging in as {NOBODY!r}"
    ready = ready_events(["wrong"], port=h1.port, user=ME)  # ...until the options say otherwise
    assert ready["wrong"].detail.startswith(f"{ME}@127.0.0.1:{h1.port} (")


def test_grouped_ssh_options_override_the_config_as_the_keywords_do(ssh_world, home):
    h1 = ssh_world.hosts[0]
    home(entry("wrong", h1.address, sshd.free_port("127.0.0.1"), user=NOBODY))
    ready = ready_events(["wrong"], ssh=SshOptions(port=h1.port, user=ME))
    assert ready["wrong"].detail.startswith(f"{ME}@127.0.0.1:{h1.port} (")


@pytest.mark.parametrize(
    "config_user, qjam_user, option, expected",
    [
        (None, None, None, NOBODY),  # nothing said: the local user name ($USER, here made a stranger)
        (None, ME, None, ME),  # QJAM_USER names the remote user
        (NOBODY, ME, None, ME),  # ... over the config's User
        (ME, NOBODY, None, NOBODY),
        (NOBODY, NOBODY, ME, ME),  # user= beats both
    ],
    ids=["local-user", "qjam-user", "qjam-user-over-config", "qjam-user-over-config-2", "option-over-all"],
)
def test_qjam_user_sets_the_remote_user_unless_one_is_given(ssh_world, home, monkeypatch, config_user, qjam_user,
                                                            option, expected):
    h1 = ssh_world.hosts[0]
    home(entry("h", h1.address, h1.port, user=config_user))
    for var in ("LOGNAME", "USER", "LNAME", "USERNAME"):  # what getpass.getuser() reads first
        monkeypatch.setenv(var, NOBODY)
    if qjam_user:
        monkeypatch.setenv("QJAM_USER", qjam_user)
    if expected == NOBODY:
        snapshot = NothingLeftOpen(ssh_world.hosts)
        with pytest.raises(HostError) as info:
            SshTransport("h", SshOptions(user=option))
        assert info.value.stage == f"logging in as {NOBODY!r}"
        snapshot.check()
    else:
        transport = SshTransport("h", SshOptions(user=option))
        try:
            assert transport.target.user == ME
            assert transport.transport.get_username() == ME
        finally:
            transport.close()


def test_qjam_user_reaches_the_host_ready_event(ssh_world, home, monkeypatch):
    h1 = ssh_world.hosts[0]
    home(entry("h", h1.address, h1.port, user=None))
    monkeypatch.setenv("USER", NOBODY)
    monkeypatch.setenv("LOGNAME", NOBODY)
    monkeypatch.setenv("QJAM_USER", ME)
    assert ready_events(["h"])["h"].detail.startswith(f"{ME}@127.0.0.1:{h1.port} (")


# -- ProxyJump ---------------------------------------------------------------------------------


def test_proxyjump_reaches_the_second_host_through_the_first(ssh_world, home):
    (h1, h2) = ssh_world.hosts
    home(shared_aliases(ssh_world) + entry("viajump", h2.address, h2.port, ProxyJump="sshhost"))
    ready = ready_events(["viajump"])
    assert ready["viajump"].detail.startswith(f"{ME}@127.0.0.2:{h2.port} (")
    transport = SshTransport("viajump")
    try:
        (jump,) = transport._jumps
        assert jump.sock.getpeername() == ("127.0.0.1", h1.port)  # a socket to the first host only
        assert isinstance(transport.transport.sock, paramiko.Channel)  # the second rides inside it
        assert served_by(transport) == ("127.0.0.2", str(h2.port))
    finally:
        transport.close()


def test_proxyjump_with_two_hops(ssh_world, home):
    (h1, h2) = ssh_world.hosts
    home(shared_aliases(ssh_world) + entry("around", h1.address, h1.port, ProxyJump="sshhost,sshhost2"))
    snapshot = NothingLeftOpen(ssh_world.hosts)
    transport = SshTransport("around")
    try:
        first, second = transport._jumps
        assert first.sock.getpeername() == ("127.0.0.1", h1.port)
        assert isinstance(second.sock, paramiko.Channel) and second.sock.get_transport() is first
        assert transport.transport.sock.get_transport() is second
        assert served_by(transport) == ("127.0.0.1", str(h1.port))
    finally:
        transport.close()
    snapshot.check()


def test_a_jump_host_that_cannot_forward_is_named(ssh_world, home):
    closed = sshd.free_port("127.0.0.2")
    home(shared_aliases(ssh_world) + entry("deadend", "127.0.0.2", closed, ProxyJump="sshhost"))
    error = refused(["deadend"], ssh_world)
    assert (error.host, error.stage) == ("deadend", "jumping through sshhost")
    assert f"127.0.0.2:{closed}" in str(error)


# -- the cipher ----------------------------------------------------------------------------------


def test_the_negotiated_cipher_is_aes_gcm(ssh_world, home):
    home(shared_aliases(ssh_world))
    transport = SshTransport("sshhost")
    try:
        assert transport.cipher in GCM
        assert transport.transport.local_cipher == transport.cipher
    finally:
        transport.close()
    assert f"({transport.cipher});" in ready_events(["sshhost"])["sshhost"].detail


# -- each way of failing ---------------------------------------------------------------------


def test_unknown_host_name(ssh_world, home):
    home(entry("nowhere", "no-such-host.invalid"))
    error = refused(["nowhere"], ssh_world)
    assert type(error) is HostError
    assert (error.host, error.stage) == ("nowhere", "resolving its name")
    assert "'no-such-host.invalid'" in str(error) and "'nowhere'" in str(error)


def test_connection_refused_closes_the_hosts_that_did_connect(ssh_world, home):
    closed = sshd.free_port("127.0.0.1")
    home(shared_aliases(ssh_world) + entry("closed", "127.0.0.1", closed))
    error = refused(["sshhost", "closed"], ssh_world)  # sshhost connects, and must be closed again
    assert type(error) is HostError
    assert (error.host, error.stage) == ("closed", "connecting")
    assert "connection refused" in str(error) and f"port {closed}" in str(error)


def test_a_port_that_does_not_speak_ssh(ssh_world, home):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer() -> None:
        conn, _ = server.accept()
        conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        conn.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        home(entry("web", "127.0.0.1", port))
        error = refused(["web"], ssh_world)
    finally:
        thread.join(5)
        server.close()
    assert (error.host, error.stage) == ("web", "starting the ssh session")
    assert f"127.0.0.1:{port} did not speak ssh" in str(error)


def test_authentication_refused_with_the_wrong_identity(ssh_world, home):
    root = home(entry("h", "127.0.0.1", ssh_world.hosts[0].port), keys=False)
    wrong = sshd.keygen(root / ".ssh" / "wrong_key")  # the only key this HOME has
    error = refused(["h"], ssh_world, identity=str(wrong))
    assert type(error) is HostError
    assert (error.host, error.stage) == ("h", f"logging in as {ME!r}")
    message = str(error)
    assert "authentication refused" in message and f"tried {wrong}." in message
    assert "identity=" in message and "--identity" in message


def test_an_identity_that_does_not_exist_is_named(ssh_world, home):
    home(entry("h", "127.0.0.1", ssh_world.hosts[0].port), keys=False)
    error = refused(["h"], ssh_world, identity="/nonexistent/qjam_key")
    assert error.stage == f"logging in as {ME!r}"
    assert "/nonexistent/qjam_key (no such file)" in str(error)


def test_a_key_with_a_passphrase_is_named_with_the_fix(ssh_world, home):
    root = home(entry("h", "127.0.0.1", ssh_world.hosts[0].port), keys=False)
    locked = root / ".ssh" / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(locked)], check=True)
    error = refused(["h"], ssh_world, identity=str(locked))
    assert f"{locked} (needs a passphrase: add it to your ssh agent)" in str(error)


def test_a_locked_default_key_does_not_stop_the_right_identity(ssh_world, home):
    """A passphrase-protected ~/.ssh/id_ecdsa (its passphrase lives in an agent) is passed over, not fatal."""
    root = home(entry("h", "127.0.0.1", ssh_world.hosts[0].port, identity=ssh_world.key), keys=False)
    ecdsa = root / ".ssh" / "id_ecdsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "secret", "-f", str(ecdsa)], check=True)
    transport = SshTransport("h")
    try:
        assert transport.transport.is_authenticated()
    finally:
        transport.close()


def test_a_missing_remote_python(ssh_world, home):
    home(shared_aliases(ssh_world))
    error = refused(["sshhost"], ssh_world, python="/nonexistent/python3")
    assert type(error) is HostError
    assert (error.host, error.stage) == ("sshhost", "finding a Python")
    assert "'/nonexistent/python3'" in str(error) and "--python" in str(error)
