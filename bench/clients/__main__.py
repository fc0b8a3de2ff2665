"""``python -m bench.clients``: compare upstream HTTP clients (see :mod:`bench.clients`)."""

from bench.clients.run import main

main()
