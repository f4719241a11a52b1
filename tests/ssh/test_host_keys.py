"""Host keys over a real sshd: unknown hosts refused, accepted only when asked, changed keys refused loudly.

Each test runs in a HOME of its own (``home``), whose ``~/.ssh/config`` names a
third private sshd ``fresh`` (127.0.0.3, with ed25519, ecdsa and rsa host
keys) and whose ``known_hosts`` the test writes; the shared HOME of
``ssh_world`` is never touched. After a refusal, nothing may be left half
open: no paramiko Transport thread here, no session process under the sshd.
"""

from __future__ import annotations

import getpass
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest
import sshd

from qjam_nb import Cluster, HostKeyError, HostReady
from qjam_nb.transport.ssh import SshOptions, SshTransport

ME = getpass.getuser()


@pytest.fixture(scope="module")
def fresh(ssh_world, tmp_path_factory):
    """A host nobody has met: its own ed25519 key (what paramiko prefers), plus ecdsa and rsa keys."""
    root = tmp_path_factory.mktemp("fresh_host")
    host = sshd.PrivateSshd(root, "127.0.0.3", ssh_world.key.with_suffix(".pub"))
    for kind, bits in (("ecdsa", "256"), ("rsa", "2048")):
        key = root / f"ssh_host_{kind}_key"
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-b", bits, "-N", "", "-f", str(key)], check=True)
        host.config.write_text(host.config.read_text() + f"HostKey {key}\n")
    host.start()
    yield host
    host.stop()


def other_key(host, kind: str) -> Path:
    """The public half of ``fresh``'s ecdsa or rsa host key."""
    return host.root / f"ssh_host_{kind}_key.pub"


def name_of(host) -> str:
    return f"[{host.address}]:{host.port}"


def line_for(host, pub: Path, name: str | None = None) -> str:
    kind, b64 = pub.read_text().split()[:2]
    return f"{name or name_of(host)} {kind} {b64}\n"


def fingerprint_of(pub: Path) -> str:
    """What ``ssh-keygen -lf`` says, e.g. ``SHA256:abc...``."""
    return subprocess.run(["ssh-keygen", "-lf", str(pub)], check=True, capture_output=True, text=True).stdout.split()[1]


@pytest.fixture
def home(ssh_world, fresh, tmp_path, monkeypatch):
    """``write(known_hosts)`` -> known_hosts path, in a HOME of this test's own that knows the alias ``fresh``."""
    ssh = tmp_path / "home" / ".ssh"
    ssh.mkdir(parents=True, mode=0o700)
    (ssh / "config").write_text(
        (ssh_world.home / ".ssh" / "config").read_text()
        + f"Host fresh\n  HostName {fresh.address}\n  Port {fresh.port}\n  User {ME}\n  IdentityFile {ssh_world.key}\n"
    )
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    known = ssh / "known_hosts"

    def write(content: str | None) -> Path:
        if content is not None:
            known.write_text(content)
        return known

    return write


def transports() -> set:
    return {t for t in threading.enumerate() if isinstance(t, paramiko.Transport) and t.is_alive()}


def assert_nothing_left_open(before: set, host) -> None:
    """No Transport thread of ours and no session under ``host``'s sshd outlives a refusal."""
    deadline = time.monotonic() + 5
    while (transports() - before or sshd.processes_under(host.process.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert transports() - before == set()
    assert sshd.processes_under(host.process.pid) == []


def shared_lines(ssh_world) -> str:
    return "".join(h.known_hosts_line() for h in ssh_world.hosts)


# -- an unknown host -------------------------------------------------------------------------


@pytest.mark.parametrize("known", ["other hosts only", "no file"])
def test_unknown_host_is_refused_naming_it_its_fingerprint_and_the_fix(ssh_world, fresh, home, known):
    path = home(shared_lines(ssh_world) if known == "other hosts only" else None)
    before_bytes = path.read_bytes() if path.exists() else None
    before = transports()
    with pytest.raises(HostKeyError) as info:
        Cluster(["fresh"], echo=False)
    message = str(info.value)
    assert info.value.host == "fresh" and "'fresh'" in message
    assert info.value.stage == "checking its host key"
    assert name_of(fresh) in message
    assert fingerprint_of(fresh.host_key.with_suffix(".pub")) in message
    assert "ssh-ed25519" in message
    assert "accept_new_host=True" in message and "--accept-new-host" in message
    if before_bytes is None:
        assert not path.exists()
    else:
        assert path.read_bytes() == before_bytes
    assert_nothing_left_open(before, fresh)


@pytest.mark.parametrize("ending", ["\n", ""], ids=["ends-with-newline", "no-final-newline"])
def test_accepting_records_the_key_then_plain_connects_work(ssh_world, fresh, home, ending):
    old = shared_lines(ssh_world).rstrip("\n") + ending
    path = home(old)
    mode = path.stat().st_mode
    seen: list = []
    with Cluster(["fresh"], echo=False, accept_new_host=True, observers=[seen.append]) as cluster:
        assert cluster.map(lambda p, xs: sum(xs) * p, 3, list(range(10)), slice_size=4) == 135
    (ready,) = [e for e in seen if isinstance(e, HostReady)]
    assert ready.detail.startswith(f"{ME}@{fresh.address}:{fresh.port} ")
    recorded = path.read_text()
    assert recorded == shared_lines(ssh_world) + fresh.known_hosts_line()  # one line appended, nothing rewritten
    assert path.stat().st_mode == mode
    with Cluster(["fresh"], echo=False) as cluster:  # known now: no option needed
        assert cluster.map(lambda p, xs: len(xs), None, list(range(7)), slice_size=7) == 7
    assert path.read_text() == recorded  # a known host adds nothing


def test_accepting_creates_a_private_known_hosts_when_there_is_none(fresh, home):
    path = home(None)
    transport = SshTransport("fresh", SshOptions(accept_new_host=True))
    transport.close()
    assert path.read_text() == fresh.known_hosts_line()
    assert path.stat().st_mode & 0o777 == 0o600


# -- a changed key ---------------------------------------------------------------------------


@pytest.mark.parametrize("accept", [False, True], ids=["plain", "accept_new_host"])
def test_changed_key_is_refused_loudly_even_when_accepting_new_hosts(ssh_world, fresh, home, accept):
    impostor = ssh_world.hosts[1].host_key.with_suffix(".pub")  # another ed25519 key, filed under fresh's name
    path = home(shared_lines(ssh_world) + line_for(fresh, impostor))
    before_bytes = path.read_bytes()
    before = transports()
    with pytest.raises(HostKeyError) as info:
        Cluster(["fresh"], echo=False, accept_new_host=accept)
    message = str(info.value)
    assert info.value.host == "fresh"
    assert f"THE HOST KEY OF {name_of(fresh)} HAS CHANGED" in message
    assert fingerprint_of(fresh.host_key.with_suffix(".pub")) in message
    assert f"ssh-keygen -R '{name_of(fresh)}'" in message
    assert path.read_bytes() == before_bytes
    assert_nothing_left_open(before, fresh)


# -- what a known_hosts file may hold ----------------------------------------------------------


def hash_file(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(path)], check=True, capture_output=True)
    path.with_name(path.name + ".old").unlink()


def test_hashed_entries_are_honoured(ssh_world, fresh, home):
    path = home(shared_lines(ssh_world) + fresh.known_hosts_line())
    hash_file(path)
    hashed = path.read_bytes()
    assert b"127.0.0" not in hashed and hashed.count(b"|1|") == 3
    with Cluster(["fresh", "sshhost"], echo=False) as cluster:
        assert cluster.map(lambda p, xs: 1) == 2
    assert path.read_bytes() == hashed


def test_a_hashed_entry_with_another_key_is_a_changed_key(ssh_world, fresh, home):
    path = home(line_for(fresh, ssh_world.hosts[0].host_key.with_suffix(".pub")))
    hash_file(path)
    hashed = path.read_bytes()
    with pytest.raises(HostKeyError, match="HAS CHANGED"):
        SshTransport("fresh", SshOptions(accept_new_host=True))
    assert path.read_bytes() == hashed


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
def test_a_host_known_by_another_key_type_is_checked_against_that_key(fresh, home, kind):
    """ssh recorded the host's ecdsa or rsa key, not the ed25519 key paramiko would pick first."""
    pub = other_key(fresh, kind)
    path = home(line_for(fresh, pub))
    before_bytes = path.read_bytes()
    transport = SshTransport("fresh")
    try:
        offered = transport.transport.get_remote_server_key()
        assert [offered.get_name(), offered.get_base64()] == pub.read_text().split()[:2]
    finally:
        transport.close()
    assert path.read_bytes() == before_bytes


def test_names_patterns_and_markers_as_openssh_writes_them(ssh_world, fresh, home):
    """Several names on a line, ``?``/``*`` patterns, and @cert-authority lines (which we skip) all parse."""
    ca = ssh_world.hosts[1].host_key.with_suffix(".pub")
    path = home(
        "# a comment\n\n"
        + line_for(fresh, ca, name="@cert-authority *")
        + "garbage line that is not a key\n"
        + line_for(fresh, fresh.host_key.with_suffix(".pub"), name=f"fresh.example,[127.0.0.?]:{fresh.port}")
    )
    before_bytes = path.read_bytes()
    transport = SshTransport("fresh")
    transport.close()
    assert path.read_bytes() == before_bytes


def test_negated_patterns_exclude_and_certificate_authorities_are_not_host_keys(ssh_world, fresh, home):
    other = ssh_world.hosts[1].host_key.with_suffix(".pub")
    path = home(
        line_for(fresh, other, name="@cert-authority *")  # a CA, not a key for every host: no "changed" here
        + line_for(fresh, fresh.host_key.with_suffix(".pub"), name=f"[127.0.0.*]:{fresh.port},!{name_of(fresh)}")
    )
    before_bytes = path.read_bytes()
    with pytest.raises(HostKeyError) as info:
        SshTransport("fresh")
    assert f"{name_of(fresh)} is not in {path}" in str(info.value)
    assert path.read_bytes() == before_bytes


def test_a_revoked_key_is_refused_even_when_also_listed_as_known(fresh, home):
    pub = fresh.host_key.with_suffix(".pub")
    path = home(line_for(fresh, pub, name="@revoked *") + fresh.known_hosts_line())
    before_bytes = path.read_bytes()
    with pytest.raises(HostKeyError, match="REVOKED") as info:
        SshTransport("fresh", SshOptions(accept_new_host=True))
    assert fingerprint_of(pub) in str(info.value)
    assert path.read_bytes() == before_bytes


def test_one_matching_line_is_enough_when_a_stale_one_comes_first(ssh_world, fresh, home):
    """As in OpenSSH: the host is known if any line for its name holds the key it offers."""
    stale = line_for(fresh, ssh_world.hosts[0].host_key.with_suffix(".pub"))
    path = home(stale + fresh.known_hosts_line())
    transport = SshTransport("fresh")
    transport.close()
    assert path.read_text() == stale + fresh.known_hosts_line()
