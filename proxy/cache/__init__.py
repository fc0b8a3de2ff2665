"""The semantic cache (SPEC §6 `llm-semantic-cache-lookup` / `-store`): embedders, vector
indexes, cached entries, and the policy that uses them.

numpy's OpenBLAS splits a matrix-vector product across one thread per core by default. A
gateway worker shares its core with the event loop (and, with `--workers N`, N workers share
N cores), so the split only adds hand-offs: a lookup among 3,000 entries of 256 dimensions
took 320 µs with the default threads and 86 µs with one on a gateway core here (10,000
entries: 3,450 and 421 µs). Importing this package therefore makes it one thread, unless
OPENBLAS_NUM_THREADS is set; it must run before numpy is imported (the cache's modules are
the gateway's only users of numpy, and import it after this).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
