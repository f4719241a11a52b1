"""qjam_nb's benchmarks (``python benchmarks/run.py``; ``benchmarks/README.md`` says how to run them).

``run.py`` is the command line; ``rows`` says which rows exist and their targets, ``measure`` how each is
measured, ``limits`` the raw limits of the same paths, ``peers/`` the other systems, ``samples`` the
results, ``report`` the tables and the plot. ``ssh_transfer.py``, ``sparse_autoencoder.py`` and
``qjam2010_autoencoder.py`` are workloads of their own, also importable alone (the tests import the
paper's).
"""
