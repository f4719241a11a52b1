"""A private JupyterLab on 127.0.0.1 for the browser test, and the Chromium to look at it.

Everything JupyterLab, IPython and the kernel would read or write of the user's
(HOME, Jupyter's config, data and runtime dirs, lab settings and workspaces)
points into a temporary directory, so a run touches nothing of the user's and
no user setting changes what the test sees. The server fetches no news and
checks for no updates; Chromium runs with its background networking off.
Nothing listens on or connects to an address outside 127.0.0.0/8.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

#: The kernelspec the test notebook names; it starts this interpreter (which has qjam_nb).
KERNEL = "qjam-browser-python"

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")

#: Flags that keep a root, headless Chromium quiet on a machine without a network.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-proxy-server", "--disable-dev-shm-usage",
]


def find_chromium() -> str | None:
    """Chromium's path: ``QJAM_CHROMIUM`` if set, else Debian's (``apt-get install chromium``)."""
    env = os.environ.get("QJAM_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    return next((p for p in CHROMIUM_CANDIDATES if Path(p).exists()), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabServer:
    """``jupyter lab`` on 127.0.0.1 with a random token, rooted in ``root``; a context manager."""

    def __init__(self, tmp: Path, startup_timeout: float = 60.0) -> None:
        self.tmp = tmp
        self.root = tmp / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.log_path = tmp / "jupyterlab.log"
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def lab_url(self, path: str) -> str:
        return f"{self.url}/lab/tree/{path}?token={self.token}"

    def env(self) -> dict[str, str]:
        """This process's environment with every per-user Jupyter/IPython location moved into ``tmp``."""
        dirs = {
            "HOME": "home", "JUPYTER_CONFIG_DIR": "home/.jupyter", "JUPYTER_DATA_DIR": "data",
            "JUPYTER_RUNTIME_DIR": "runtime", "JUPYTER_PATH": "path", "IPYTHONDIR": "ipython",
            "JUPYTERLAB_SETTINGS_DIR": "lab/settings", "JUPYTERLAB_WORKSPACES_DIR": "lab/workspaces",
            "MPLCONFIGDIR": "mpl", "XDG_CONFIG_HOME": "home/.config", "XDG_CACHE_HOME": "home/.cache",
            "XDG_DATA_HOME": "home/.local/share",
        }
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        for var, rel in dirs.items():
            (self.tmp / rel).mkdir(parents=True, exist_ok=True)
            env[var] = str(self.tmp / rel)
        env["JUPYTER_PLATFORM_DIRS"] = "1"
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        spec = self.tmp / "path" / "kernels" / KERNEL
        spec.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
        return env

    def start(self) -> LabServer:
        cmd = [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
            "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}", "--ServerApp.terminals_enabled=False",
            "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
        ]
        if os.geteuid() == 0:
            cmd.append("--allow-root")  # CI runs as root
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=self.env(), stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ready()
        return self

    def _api(self, path: str, method: str = "GET", timeout: float = 5) -> object:
        """A call to the server's REST API (never through a proxy)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(f"{self.url}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with opener.open(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self._api("status", timeout=2)
                return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"jupyter lab did not answer on {self.url} within {self.startup_timeout:.0f} s:\n"
                           f"{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Shut the kernels down (their workers exit with them), SIGTERM the server, SIGKILL it after 15 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            for kernel in self._api("kernels"):
                self._api(f"kernels/{kernel['id']}", method="DELETE", timeout=15)
        except (urllib.error.URLError, OSError, ValueError):
            pass  # the server is stopped below all the same
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self) -> LabServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def copy_notebook(src: Path, server: LabServer) -> str:
    """Copy ``src`` into the server's root; returns its path relative to the root."""
    shutil.copy(src, server.root / src.name)
    return src.name
