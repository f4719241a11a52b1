"""Executors: how a call is carried out, behind one small interface (``base``).

The face (``qjam_nb.cluster``) hands each call to its executor as a
``base.CallSpec``; ``frames`` is our own workers over byte streams (local
pipes, ssh channels, memory), with ``pool`` (their lifecycles), ``liveness``
(who went silent) and ``handshake`` (can we talk). A new executor (Dask)
goes here, implementing ``base.Executor`` and ``base.CallRun``.
"""
