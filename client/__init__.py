"""Clients of a DenseCap Live gateway: ``densecap submit`` (bulk folder jobs over REST) and the browser pages
in ``client/static/`` (live webcam client, results viewer, jobs upload page). Torch-free."""
