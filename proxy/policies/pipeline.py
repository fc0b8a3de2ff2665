"""One API's policies of one kind, in SPEC §3 pipeline order for each caller's product: the
global ones, then the product's, then the API's. Built once per config; a request's
`for_product` is one dict lookup, with no tuple made."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class ProductPipelines(Generic[T]):
    __slots__ = ("_by_product", "_default")

    def __init__(
        self, global_: Sequence[T], products: Mapping[str, Sequence[T]], api: Sequence[T]
    ) -> None:
        self._default: tuple[T, ...] = (*global_, *api)  # a caller without a product's policies
        self._by_product = {pid: (*global_, *ps, *api) for pid, ps in products.items()}

    def __bool__(self) -> bool:
        return bool(self._default or any(self._by_product.values()))

    def for_product(self, product_id: str) -> tuple[T, ...]:
        return self._by_product.get(product_id, self._default)
