"""ssh_config as OpenSSH reads it: every decision checked against the real ``ssh`` client on the same files.

Each case writes one ``~/.ssh/config`` (in a HOME of the test's own), its
known hosts files and, when it needs one, an ssh agent of its own; then both
``ssh -F that-config -o BatchMode=yes target true`` (Debian's OpenSSH client)
and qjam_nb's connection (``sshconnect.resolve`` + ``connect``: host key and
login) decide, on the same files, whether the host is reached. They must agree,
and agree with what the case expects. When a key is recorded
(``--accept-new-host`` / ``StrictHostKeyChecking=accept-new``), each client
runs on fresh copies of the files and both must leave the same lines (hashed
lines compared through ``ssh-keygen -F``).

``ssh`` expands ``~`` with the passwd entry's home, not ``$HOME``: the configs
here name every file by its absolute path (the key, the known hosts files,
``GlobalKnownHostsFile`` in tmp, never the real ``/etc/ssh``), so the real
client reads nothing of this machine's own. What ``ssh`` cannot be pointed at
(its default key files, the default ``/etc/ssh`` paths, ``~``) is checked on
qjam_nb alone, against the rule in OpenSSH's source, and said so.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sshd

from qjam_nb import HostError, HostKeyError
from qjam_nb.transport.sshconnect import SshOptions, connect, resolve

ME = getpass.getuser()
ALIAS = "qjam-alias.example"  # a HostKeyAlias


@dataclass
class World:
    """The files of one case: paths, and the keys that go into them."""

    root: Path
    port: int
    right: str  # "ssh-ed25519 AAAA..." of the host (127.0.0.1)
    stale: str  # another ed25519 key, recorded where the host's should be
    other_type: str  # an ecdsa key the host does not have
    key: Path  # the client key the host accepts
    wrong: Path  # a client key the host refuses

    @property
    def config(self) -> Path:
        return self.root / "home" / ".ssh" / "config"

    def file(self, name: str) -> Path:
        return self.root / name


def pub(path: Path) -> str:
    return " ".join(path.read_text().split()[:2])


@pytest.fixture(scope="module")
def keys(ssh_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("ssh_config_keys")
    wrong = sshd.keygen(root / "wrong_key")
    ecdsa = root / "ecdsa_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "256", "-N", "", "-f", str(ecdsa)], check=True)
    return wrong, ecdsa


@pytest.fixture
def world(ssh_world, keys, tmp_path, monkeypatch) -> World:
    host, other = ssh_world.hosts
    (tmp_path / "home" / ".ssh").mkdir(parents=True, mode=0o700)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    wrong, ecdsa = keys
    return World(tmp_path, host.port, pub(host.host_key.with_suffix(".pub")),
                 pub(other.host_key.with_suffix(".pub")), pub(ecdsa.with_suffix(".pub")), ssh_world.key, wrong)


def listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


@pytest.fixture
def agent(world):
    """``start(*keys)`` -> the socket of an ssh-agent of this test's own holding ``keys``; killed by its pid."""
    started = []

    def start(*keys: Path) -> str:
        directory = tempfile.mkdtemp(prefix="qjam-agent-")  # short: a socket path has a length limit
        sock = os.path.join(directory, "agent.sock")
        process = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        started.append((process, directory))
        deadline = time.monotonic() + 10
        while not listening(sock):  # (the socket's file exists a moment before it accepts)
            assert process.poll() is None and time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.02)
        for key in keys:
            subprocess.run(["ssh-add", "-q", str(key)], env={**os.environ, "SSH_AUTH_SOCK": sock},
                           check=True, capture_output=True)
        return sock

    yield start
    for process, directory in started:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(5)
        shutil.rmtree(directory, ignore_errors=True)


# -- the two clients -------------------------------------------------------------------------


def openssh_connects(config: Path, accept_new: bool = False, agent: str | None = None) -> bool:
    """Whether Debian's ``ssh`` reaches ``target`` with this config (and runs ``true`` there)."""
    env = {"PATH": os.environ["PATH"]} | ({"SSH_AUTH_SOCK": agent} if agent else {})
    strict = "accept-new" if accept_new else "yes"
    done = subprocess.run(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", "-o", f"StrictHostKeyChecking={strict}",
         "-o", "ConnectTimeout=20", "target", "true"],
        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert done.returncode in (0, 255), done.stderr
    return done.returncode == 0


def qjam_connects(accept_new: bool = False) -> tuple[bool, HostError | None]:
    """Whether qjam_nb reaches ``target`` (host key checked, logged in), with the error when it does not."""
    options = SshOptions(accept_new_host=accept_new, timeout=20)
    try:
        transport, jumps = connect(resolve("target", options), options)
    except HostError as error:
        return False, error
    transport.close()
    for jump in jumps:
        jump.close()
    return True, None


# -- the cases -------------------------------------------------------------------------------


@dataclass
class Case:
    """One ssh_config and its files. Known hosts lines are written ``NAME KEY`` (see ``line``)."""

    options: list[str] = field(default_factory=list)  # ssh_config lines, before the defaults (first wins)
    files: dict[str, str] = field(default_factory=dict)  # known hosts file name -> its lines
    user: str = "known_hosts"  # UserKnownHostsFile: file names, space separated ("none" as is)
    global_: str = "global_known_hosts"  # GlobalKnownHostsFile
    identity: str | None = "key"  # IdentityFile: key, wrong, locked (key with a passphrase), pubonly (key's .pub)
    agent: tuple[str, ...] | None = None  # keys in a private agent
    accept_new: bool = False
    connects: bool = False


def line(world: World, spec: str) -> str:
    """``NAME KEY`` -> a known_hosts line. NAME: ADDR ([127.0.0.1]:port), BARE, ALIAS, or as is; KEY:
    RIGHT, STALE, OTHERTYPE; a leading @revoked stays."""
    *marker, name, key = spec.split()
    name = {"ADDR": f"[127.0.0.1]:{world.port}", "BARE": "127.0.0.1", "ALIAS": ALIAS}.get(name, name)
    key = {"RIGHT": world.right, "STALE": world.stale, "OTHERTYPE": world.other_type}[key]
    return " ".join([*marker, name, key]) + "\n"


def client_key(world: World, which: str) -> Path:
    if which == "pubonly":  # only the public half on disk: the agent holds the private one
        path = world.file("pubonly_key")
        shutil.copy(world.key.with_suffix(".pub"), path.with_suffix(".pub"))
        return path
    if which == "locked":
        locked = world.file("locked_key")
        if not locked.exists():
            shutil.copy(world.key, locked)
            shutil.copy(world.key.with_suffix(".pub"), locked.with_suffix(".pub"))
            subprocess.run(["ssh-keygen", "-q", "-p", "-P", "", "-N", "secret", "-f", str(locked)], check=True,
                           capture_output=True)
        return locked
    return world.key if which == "key" else world.wrong


def write(world: World, case: Case) -> None:
    """The config and every known hosts file of ``case``, from scratch."""
    def paths(names: str) -> str:
        return names if names == "none" else " ".join(
            n if n.startswith("/") else str(world.file(n)) for n in names.split())

    for path in world.root.glob("*known_hosts*"):
        path.unlink()
    for name, lines in case.files.items():
        world.file(name).write_text("".join(line(world, spec) for spec in lines.splitlines() if spec.strip()))
    block = [*case.options, "HostName 127.0.0.1", f"Port {world.port}", f"User {ME}",
             f"UserKnownHostsFile {paths(case.user)}", f"GlobalKnownHostsFile {paths(case.global_)}"]
    if case.identity:
        block.append(f"IdentityFile {client_key(world, case.identity)}")
    world.config.write_text("Host target\n" + "".join(f"  {option}\n" for option in block))


def known_files(world: World) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(world.root.glob("*known_hosts*"))}


CASES = {
    # HostKeyAlias: keys are looked up, and recorded, under the alias alone.
    "alias: stale key under the alias, the host's under its address (an old tunnel)": Case(
        [f"HostKeyAlias {ALIAS}"], {"known_hosts": "ALIAS STALE\nADDR RIGHT"}),
    "alias: the right key under the alias, a stale one under the address": Case(
        [f"HostKeyAlias {ALIAS}"], {"known_hosts": "ADDR STALE\nALIAS RIGHT"}, connects=True),
    "alias: only the address is known": Case([f"HostKeyAlias {ALIAS}"], {"known_hosts": "ADDR RIGHT"}),
    "alias: written in capitals, recorded in lower case": Case(
        ["HostKeyAlias QJAM-Alias.Example"], {"known_hosts": "ALIAS RIGHT"}, connects=True),
    "alias: accepting records the key under the alias": Case(
        [f"HostKeyAlias {ALIAS}"], {"known_hosts": "ADDR STALE"}, accept_new=True, connects=True),
    "alias: no fallback to the name without the port": Case([f"HostKeyAlias {ALIAS}"], {"known_hosts": "BARE RIGHT"}),
    # The name without its port, tried when [host]:port is not known (OpenSSH's "checking without port").
    "port: the host known under its bare name": Case(files={"known_hosts": "BARE RIGHT"}, connects=True),
    "port: a stale key under the bare name is not a changed key": Case(
        files={"known_hosts": "BARE STALE"}, accept_new=True, connects=True),
    # A key of another type on record: OpenSSH calls that a changed key, even when accepting new ones.
    "changed: only a key of another type is on record": Case(
        files={"known_hosts": "ADDR OTHERTYPE"}, accept_new=True),
    # GlobalKnownHostsFile (a file in tmp: the real /etc/ssh is never written).
    "global: the key only in the global file": Case(files={"global_known_hosts": "ADDR RIGHT"}, connects=True),
    "global: a stale key in the global file, nothing in the user's": Case(
        files={"global_known_hosts": "ADDR STALE"}, accept_new=True),
    "global: a stale key in the global file, the right one in the user's": Case(
        files={"known_hosts": "ADDR RIGHT", "global_known_hosts": "ADDR STALE"}, connects=True),
    "global: revoked in the global file, known in the user's": Case(
        files={"known_hosts": "ADDR RIGHT", "global_known_hosts": "@revoked * RIGHT"}),
    "global: none": Case(files={"global_known_hosts": "ADDR RIGHT"}, global_="none"),
    # UserKnownHostsFile lists.
    "user files: the key in the second file": Case(
        files={"known_hosts": "", "known_hosts_b": "ADDR RIGHT"}, user="known_hosts known_hosts_b", connects=True),
    "user files: stale in the first, right in the second": Case(
        files={"known_hosts": "ADDR STALE", "known_hosts_b": "ADDR RIGHT"}, user="known_hosts known_hosts_b",
        connects=True),
    "user files: revoked in the second": Case(
        files={"known_hosts": "ADDR RIGHT", "known_hosts_b": "@revoked ADDR RIGHT"},
        user="known_hosts known_hosts_b"),
    "user files: accepting records in the first": Case(
        files={"known_hosts_b": "BARE OTHERTYPE"}, user="known_hosts known_hosts_b", accept_new=True, connects=True),
    "user files: tokens %h %p %r %k %n %u %i %l %L %C %%": Case(
        files={"known_hosts-127.0.0.1-PORT-ME-target-target-ME-UID-THISHOST-SHORT-CHASH-%": "ADDR RIGHT"},
        user="known_hosts-%h-%p-%r-%k-%n-%u-%i-%l-%L-%C-%%", connects=True),
    "user files: %k is the HostKeyAlias": Case(
        [f"HostKeyAlias {ALIAS}"], files={f"known_hosts-{ALIAS}": "ALIAS RIGHT"}, user="known_hosts-%k",
        connects=True),
    "user files: none, accepting has nowhere to record": Case(user="none", accept_new=True),
    # HashKnownHosts when recording.
    "hash: accepting records a hashed line": Case(["HashKnownHosts yes"], accept_new=True, connects=True),
    "hash: and under the alias": Case(["HashKnownHosts yes", f"HostKeyAlias {ALIAS}"], accept_new=True,
                                      connects=True),
    # IdentitiesOnly: the configured identities only, not the agent's other keys.
    "identities: the agent's key is offered without IdentitiesOnly": Case(
        identity="wrong", agent=("key",), files={"known_hosts": "ADDR RIGHT"}, connects=True),
    "identities: IdentitiesOnly keeps the agent's other keys back": Case(
        ["IdentitiesOnly yes"], identity="wrong", agent=("key",), files={"known_hosts": "ADDR RIGHT"}),
    "identities: IdentitiesOnly lets the agent sign for a configured identity": Case(
        ["IdentitiesOnly yes"], identity="locked", agent=("key",), files={"known_hosts": "ADDR RIGHT"},
        connects=True),
    "identities: IdentitiesOnly, only the public half on disk, the agent holds the key": Case(
        ["IdentitiesOnly yes"], identity="pubonly", agent=("key",), files={"known_hosts": "ADDR RIGHT"},
        connects=True),
    "identities: IdentitiesOnly and no IdentityFile: the agent's key stays back": Case(
        ["IdentitiesOnly yes"], identity=None, agent=("key",), files={"known_hosts": "ADDR RIGHT"}),
    "identities: no IdentityFile: the agent's key is offered": Case(
        identity=None, agent=("key",), files={"known_hosts": "ADDR RIGHT"}, connects=True),
}


def resolved(world: World, case: Case) -> Case:
    """``case`` with PORT, ME, UID, THISHOST, SHORT and CHASH (ssh's ``%C``) in its file names filled in."""
    this_host = socket.gethostname()
    values = {"PORT": str(world.port), "ME": ME, "UID": str(os.getuid()), "THISHOST": this_host,
              "SHORT": this_host.split(".")[0],
              "CHASH": hashlib.sha1(f"{this_host}127.0.0.1{world.port}{ME}".encode()).hexdigest()}

    def fill(text: str) -> str:
        if "PORT" not in text:
            return text
        for word, value in values.items():
            text = text.replace(word, value)
        return text

    return Case(case.options, {fill(k): v for k, v in case.files.items()}, case.user, case.global_, case.identity,
                case.agent, case.accept_new, case.connects)


@pytest.mark.parametrize("name", list(CASES))
def test_qjam_decides_as_openssh_does(world, agent, monkeypatch, name):
    case = resolved(world, CASES[name])
    sock = agent(*[client_key(world, k) for k in case.agent]) if case.agent else None
    write(world, case)
    by_openssh = openssh_connects(world.config, case.accept_new, sock)
    after_openssh = known_files(world)
    write(world, case)
    if sock:
        monkeypatch.setenv("SSH_AUTH_SOCK", sock)
    by_qjam, error = qjam_connects(case.accept_new)
    assert by_openssh == case.connects, f"ssh: {name}"
    assert by_qjam == by_openssh, f"qjam_nb decided otherwise than ssh ({error})"
    if error is not None:
        assert error.host == "target" and "'target'" in str(error)
    assert same_files(after_openssh, known_files(world))


def same_files(by_openssh: dict[str, str], by_qjam: dict[str, str]) -> bool:
    """The same files with the same lines; a hashed name (a random salt) need only hash the same name."""
    if by_openssh.keys() != by_qjam.keys():
        return False
    for name, text in by_openssh.items():
        ours = by_qjam[name].splitlines()
        theirs = text.splitlines()
        if len(ours) != len(theirs):
            return False
        for a, b in zip(theirs, ours, strict=True):
            if a.startswith("|1|") and b.startswith("|1|"):
                if a.split()[1:] != b.split()[1:]:
                    return False
            elif a != b:
                return False
    return True


# -- hashed names: what ssh-keygen and ssh then make of qjam_nb's line -------------------------


@pytest.mark.parametrize("alias", [None, ALIAS])
def test_a_hashed_recorded_line_is_found_by_ssh_keygen_and_trusted_by_ssh(world, alias):
    options = ["HashKnownHosts yes"] + ([f"HostKeyAlias {alias}"] if alias else [])
    write(world, Case(options))
    assert qjam_connects(accept_new=True) == (True, None)
    known = world.file("known_hosts")
    (recorded,) = known.read_text().splitlines()
    name = alias or f"[127.0.0.1]:{world.port}"
    assert recorded.startswith("|1|") and "127.0.0.1" not in recorded and ALIAS not in recorded
    assert recorded.split()[1:] == world.right.split()
    found = subprocess.run(["ssh-keygen", "-F", name, "-f", str(known)], capture_output=True, text=True)
    assert found.returncode == 0 and recorded in found.stdout
    assert openssh_connects(world.config)  # StrictHostKeyChecking=yes, on the line qjam_nb wrote
    assert qjam_connects() == (True, None)
    assert known.read_text() == recorded + "\n"


# -- what the messages say ----------------------------------------------------------------------


def test_a_stale_key_under_the_alias_is_refused_naming_the_alias(world):
    tunnel = "alias: stale key under the alias, the host's under its address (an old tunnel)"
    write(world, resolved(world, CASES[tunnel]))
    ok, error = qjam_connects(accept_new=True)
    assert not ok and isinstance(error, HostKeyError)
    message = str(error)
    assert f"THE HOST KEY OF {ALIAS} HAS CHANGED" in message
    assert f"{world.file('known_hosts')} line 1" in message
    assert f"ssh-keygen -f '{world.file('known_hosts')}' -R '{ALIAS}'" in message


def test_userknownhostsfile_none_says_where_the_key_could_go(world):
    write(world, resolved(world, CASES["user files: none, accepting has nowhere to record"]))
    ok, error = qjam_connects(accept_new=True)
    assert not ok and isinstance(error, HostKeyError)
    assert "UserKnownHostsFile" in str(error) and "none" in str(error)


# -- what ssh cannot be pointed at: checked on qjam_nb, against OpenSSH's source ---------------


def test_known_hosts_defaults_are_openssh_s(world):
    """readconf.c fill_default_options: ~/.ssh/known_hosts{,2} and /etc/ssh/ssh_known_hosts{,2}; no hashing."""
    world.config.write_text("Host target\n  HostName 127.0.0.1\n")
    target = resolve("target", SshOptions())
    home = Path(os.environ["HOME"])
    assert target.known_hosts.user_files == (home / ".ssh" / "known_hosts", home / ".ssh" / "known_hosts2")
    assert target.known_hosts.global_files == (Path("/etc/ssh/ssh_known_hosts"), Path("/etc/ssh/ssh_known_hosts2"))
    assert target.known_hosts.hash_names is False
    assert target.host_key_alias is None


def test_tilde_is_expanded_in_each_known_hosts_file(world):
    """OpenSSH's tilde_expand_filename on each file of both lists (ssh itself uses the passwd home, not $HOME)."""
    world.config.write_text("Host target\n  UserKnownHostsFile ~/a %d/b\n  GlobalKnownHostsFile ~/g /etc/g\n")
    target = resolve("target", SshOptions())
    home = Path(os.environ["HOME"])
    assert target.known_hosts.user_files == (home / "a", home / "b")
    assert target.known_hosts.global_files == (home / "g", Path("/etc/g"))


def test_default_key_files_are_not_tried_when_an_identity_is_configured(world):
    """readconf.c: the default ~/.ssh/id_* files are the identities only when none is configured."""
    shutil.copy(world.key, world.config.parent / "id_ed25519")  # a default key the host accepts
    write(world, Case(identity="wrong", files={"known_hosts": "ADDR RIGHT"}))
    ok, error = qjam_connects()
    assert not ok and "tried" in str(error) and "id_ed25519" not in str(error)
    write(world, Case(identity=None, files={"known_hosts": "ADDR RIGHT"}))
    assert qjam_connects() == (True, None)


def test_identitiesonly_without_identityfile_uses_the_default_files_only(world, agent, monkeypatch):
    """No IdentityFile: the defaults are the configured identities, and the agent's other keys stay back."""
    monkeypatch.setenv("SSH_AUTH_SOCK", agent(world.key))
    write(world, Case(["IdentitiesOnly yes"], identity=None, files={"known_hosts": "ADDR RIGHT"}))
    ok, error = qjam_connects()
    assert not ok and "tried no key; skipped 1 agent key (IdentitiesOnly yes in ~/.ssh/config)" in str(error)
    shutil.copy(world.key.with_suffix(".pub"), world.config.parent / "id_ed25519.pub")  # the agent signs for it
    assert qjam_connects() == (True, None)
