"""Imported at start-up by the gateways `python -m bench.stages` runs (this directory is put
first on their PYTHONPATH): installs bench/stagetimer.py's wrappers."""

from bench import stagetimer

stagetimer.install()
