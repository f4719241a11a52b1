"""``python -m qjam_nb.worker``: run a worker on this process's stdin/stdout."""

from .main import main

main()
