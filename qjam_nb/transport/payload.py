"""What a host needs to run workers: the worker package and cloudpickle, as one zip.

The zip is built deterministically (sorted names, fixed timestamps), so its
hash names a version directory, ``~/.cache/qjam_nb/<version>-<hash>``, on
the host: a host that has that directory needs nothing uploaded, and a
changed worker (or cloudpickle) gets a directory of its own.

The two small programs here run on the host's Python before anything is
uploaded, so they stay valid Python 2 and 3: a too-old interpreter must live
long enough to say its version.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from functools import lru_cache
from pathlib import Path

import cloudpickle

from .._version import __version__
from .base import WORKER_PACKAGE

#: The first lines of every program run on a host: ``python -c`` puts the current directory (the
#: home directory there) first on ``sys.path``, so a stray ``~/random.py`` or ``~/json.py`` would
#: shadow the standard library; it goes before anything else is imported. (``python -P`` does the
#: same from 3.11 on only, and the probe must run on any Python long enough to say its version.)
SAFE_PATH = "import sys\nsys.path[:]=[p for p in sys.path if p]\n"

#: What the probe's answer starts with: anything before it was printed by someone else (a shell greeting).
PROBE_MARK = "qjam_nb-probe:"

#: Prints the host's Python version, home cache, whether version argv[1] is there, and what is
#: unsafe about the cache: a symbolic link, or a path that belongs to another user, is not used.
#: Also the command that started it (argv[2]) and the login shell, for the messages; one line after PROBE_MARK.
PROBE = SAFE_PATH + (
    "import os,json\n"
    "r=os.path.join(os.path.expanduser('~'),'.cache','qjam_nb')\n"
    "bad=''\n"
    "for p in (r,os.path.join(r,sys.argv[1])):\n"
    "    if os.path.islink(p): bad=p+' is a symbolic link'\n"
    "    elif os.path.exists(p) and os.lstat(p).st_uid!=os.getuid(): bad=p+' belongs to another user'\n"
    "    elif os.path.exists(p) and not os.path.isdir(p): bad=p+' is not a directory'\n"
    "    if bad: break\n"
    "sys.stdout.write(PROBE_MARK+json.dumps({'python':'%d.%d.%d'%tuple(sys.version_info[:3]),'executable':sys.executable,"
    "'root':r,'ready':os.path.exists(os.path.join(r,sys.argv[1],'.complete')),'unsafe':bad,"
    "'command':sys.argv[2:3] and sys.argv[2] or '','shell':os.environ.get('SHELL','')})+'\\n')\n"
).replace("PROBE_MARK", repr(PROBE_MARK))

#: Unpacks the zip of argv[3] bytes on stdin into root/argv[2] (argv[1] = root), privately and
#: atomically: into a temporary directory, renamed into place once complete. Any failure (a full
#: disk, a quota, a file size limit) removes the temporary directory and ends with one line on
#: stderr, ``UPLOAD_ERROR <errno name> <what>``. The input's length is given, not its end: the
#: master never sends EOF on a channel (see ``ssh.run``).
UPLOAD_ERROR = "qjam_nb-upload-error"
UNPACK = SAFE_PATH + (
    "import io,os,errno,zipfile,shutil,tempfile\n"
    "root,name,size=sys.argv[1],sys.argv[2],int(sys.argv[3])\n"
    "data=sys.stdin.buffer.read(size)\n"
    "final=os.path.join(root,name)\n"
    "tmp=None\n"
    "try:\n"
    "    if len(data)!=size: raise EOFError('the upload was cut short: %d of %d bytes came' % (len(data),size))\n"
    "    if not os.path.isdir(root): os.makedirs(root,0o700)\n"
    "    os.chmod(root,0o700)\n"
    "    if not os.path.exists(os.path.join(final,'.complete')):\n"
    "        tmp=tempfile.mkdtemp(prefix='.upload-',dir=root)\n"
    "        zipfile.ZipFile(io.BytesIO(data)).extractall(tmp)\n"
    "        for d,dirs,files in os.walk(tmp):\n"
    "            os.chmod(d,0o700)\n"
    "            for f in files: os.chmod(os.path.join(d,f),0o600)\n"
    "        os.close(os.open(os.path.join(tmp,'.complete'),os.O_CREAT|os.O_WRONLY,0o600))\n"
    "        try:\n"
    "            os.rename(tmp,final)\n"
    "            tmp=None\n"
    "        except OSError:\n"
    "            if not os.path.exists(os.path.join(final,'.complete')): raise\n"
    "except Exception as e:\n"
    "    code=getattr(e,'errno',None)\n"
    f"    sys.stderr.write('{UPLOAD_ERROR} %s %s\\n' % (errno.errorcode.get(code,'-') if code else '-',e))\n"
    "    sys.exit(1)\n"
    "finally:\n"
    "    if tmp: shutil.rmtree(tmp,True)\n"
    "print('ok')\n"
)


@lru_cache(maxsize=1)
def payload() -> tuple[str, bytes]:
    """(version directory name, zip bytes) of ``qjam_worker/`` and ``deps/cloudpickle/``."""
    files: list[tuple[str, Path]] = []
    for path in sorted(WORKER_PACKAGE.glob("*.py")):
        files.append((f"qjam_worker/{path.name}", path))
    cloudpickle_dir = Path(cloudpickle.__file__).resolve().parent
    for path in sorted(cloudpickle_dir.rglob("*.py")):
        files.append((f"deps/cloudpickle/{path.relative_to(cloudpickle_dir).as_posix()}", path))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, path in files:
            info = zipfile.ZipInfo(name, date_time=(2010, 11, 29, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    data = buffer.getvalue()
    return f"v{__version__}-{hashlib.sha256(data).hexdigest()[:12]}", data
