"""Kubernetes resource quantities ("500m", "8Gi", "5Ti", "1e3") parsed to exact numbers.

Used by config validation (requests <= limits, sums against a quota) so that capacity mistakes are
caught before anything reaches the cluster. Follows the grammar of k8s.io/apimachinery's Quantity.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
            "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
            "P": Decimal("1e15"), "E": Decimal("1e18")}
_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?\d+|[numkMGTPE])?$")


class QuantityError(ValueError):
    pass


def parse_quantity(value: str | int | float) -> Decimal:
    """Return the quantity as an exact Decimal in base units (cores, bytes, counts)."""
    if isinstance(value, bool):
        raise QuantityError(f"{value!r} is not a quantity")
    if isinstance(value, (int, float)):
        return Decimal(str(value))
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise QuantityError(f"{value!r} is not a Kubernetes quantity (examples: 500m, 4, 8Gi, 5Ti)")
    number, suffix = match.group(1), match.group(2) or ""
    try:
        base = Decimal(number)
    except InvalidOperation as exc:  # pragma: no cover - the regex already guards this
        raise QuantityError(f"{value!r} is not a Kubernetes quantity") from exc
    if suffix in _BINARY:
        return base * _BINARY[suffix]
    if suffix[:1] in ("e", "E"):
        return base * (Decimal(10) ** int(suffix[1:]))
    return base * _DECIMAL[suffix]


def format_bytes_gib(value: Decimal) -> str:
    """Bytes as a short GiB string for messages ("16 GiB", "0.5 GiB")."""
    gib = value / _BINARY["Gi"]
    return f"{gib.normalize():f} GiB" if gib == gib.to_integral() else f"{float(gib):.2f} GiB"
