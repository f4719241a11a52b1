"""The systems measured next to qjam_nb, one module each, behind ``base.System``.

``qjam`` (qjam_nb itself), ``pools`` (multiprocessing.Pool, ProcessPoolExecutor), ``ipp`` (ipyparallel),
``dask_distributed``, ``execnet_gateways``, ``joblib_loky``. Each imports its library only when it starts,
so a peer that is not installed costs nothing until its row says "not installed".
"""
