"""Upstream HTTP client comparison for Tollway's hot path.

Run from the repository root (after ``bash bench/setup.sh``)::

    python -m bench.clients            # full run, ~10 minutes (more on a busy machine)
    python -m bench.clients --quick    # smoke test, 1 round of 2 s

Method (2-core machine): an nginx mock (:mod:`bench.nginx`) runs on core 0.

1. Client alone: ``bench.clients.loop`` on core 1 keeps N = 1, 8, 64 requests in flight
   (uvloop) with httpx, httpx + aiohttp transport, and aiohttp, for a fixed time.
2. Pass-through: ``bench.clients.app`` (raw ASGI) under one Granian worker on core 1 with
   each client; ``wrk`` (one thread, core 0) at c = 1 and 64 with ``--latency``, and the
   same wrk straight at nginx as the baseline ("added p50" = pass-through minus direct, per
   round).
3. SSE: the aiohttp pass-through streaming ``/v1/sse`` with each way of reading the body.

Two interleaved rounds (order reversed in the second); medians. Each run waits for the
machine to be quiet and is retried when processes outside the bench used more than
``--max-other-load`` cores meanwhile (see :mod:`bench.quiet`). Markdown tables go to
stdout; one JSON line per row is appended to ``bench/results/clients.jsonl``. Results and
the conclusion: ``bench/RESULTS.md``, section "Upstream client choice".
"""
