"""One API's policies of one kind, in SPEC §3 pipeline order for each caller's product: the
global ones, then the product's, then the API's. Built once per config; a request's
`for_product` is one dict lookup in C (no Python frame), with no tuple made."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class _ByProduct(dict[str, tuple[T, ...]]):
    """Product id -> its pipeline; an id without policies of its own (a caller without a
    product: "") gets the default, remembered (product ids come from the config)."""

    __slots__ = ("default",)

    def __init__(self, pipelines: Mapping[str, tuple[T, ...]], default: tuple[T, ...]) -> None:
        super().__init__(pipelines)
        self.default = default

    def __missing__(self, product_id: str) -> tuple[T, ...]:
        self[product_id] = self.default
        return self.default


class ProductPipelines(Generic[T]):
    __slots__ = ("_by_product", "for_product")

    def __init__(
        self, global_: Sequence[T], products: Mapping[str, Sequence[T]], api: Sequence[T]
    ) -> None:
        default: tuple[T, ...] = (*global_, *api)  # a caller without a product's policies
        pipelines = {pid: (*global_, *ps, *api) for pid, ps in products.items()}
        self._by_product = _ByProduct(pipelines, default)
        self.for_product: Callable[[str], tuple[T, ...]] = self._by_product.__getitem__

    def __bool__(self) -> bool:
        return bool(self._by_product.default or any(self._by_product.values()))
