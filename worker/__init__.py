"""Daemons that own a model: the stream worker (live frames, ``python -m worker.stream_worker``) and the
job worker (RQ bulk folders). Both read their settings from ``DENSECAP_*`` (``densecap_core.settings``)."""
