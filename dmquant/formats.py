"""Integer number formats: the grid ``[qmin, qmax]`` a quantized value lives on."""

from __future__ import annotations

from dataclasses import dataclass

from dmquant.errors import DMQuantError

MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` if it is an integer in 2..8, else raise a DMQuantError naming the fix."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise DMQuantError(
            f"{what}={bits!r} is not supported: use an integer bit-width from {MIN_BITS} to {MAX_BITS}"
        )
    return bits


@dataclass(frozen=True)
class IntFormat:
    """A ``bits``-wide integer grid.

    Signed grids are ``[-2^(b-1), 2^(b-1)-1]``, or the narrow, symmetric ``[-2^(b-1)+1, 2^(b-1)-1]``
    when ``narrow`` is set; unsigned grids are ``[0, 2^b - 1]``.
    """

    bits: int
    signed: bool = True
    narrow: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.narrow and not self.signed:
            raise DMQuantError("a narrow grid must be signed: set signed=True or narrow=False")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1
