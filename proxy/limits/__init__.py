"""Token-limit stores for `llm-token-limit` (SPEC §6): the `Limiter` protocol and its backends.

`proxy.limits.memory.MemoryLimiter` counts in-process; `proxy.limits.redis.RedisLimiter`
shares counters through Redis and is imported from its module, so nothing here loads redis.
"""

from proxy.limits.base import (
    Limit,
    Limiter,
    Refused,
    Reservation,
    StoreUnavailableError,
    period_bounds,
)
from proxy.limits.memory import MemoryLimiter

__all__ = [
    "Limit",
    "Limiter",
    "MemoryLimiter",
    "Refused",
    "Reservation",
    "StoreUnavailableError",
    "period_bounds",
]
