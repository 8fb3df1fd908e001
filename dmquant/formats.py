"""Number formats a quantized value lives on: integer grids ``[qmin, qmax]`` (:class:`IntFormat`) and
8-bit floats (:class:`FloatFormat`, e4m3: the values of ``torch.float8_e4m3fn``, up to 448).

A recipe names a format with a string of :data:`FORMAT_NAMES` (``format: int`` or ``format: fp8_e4m3``);
:func:`format_named` turns the name (and the integer grid's bits and sign) into the format object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dmquant.errors import DMQuantError

MIN_BITS, MAX_BITS = 2, 8
FORMAT_NAMES = ("int", "fp8_e4m3")
# the float8 encodings: torch dtype and largest finite value (e4m3fn: no infinities, NaN at 0x7f/0xff)
_FLOAT8 = {"e4m3": (torch.float8_e4m3fn, 448.0)}


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


@dataclass(frozen=True)
class FloatFormat:
    """An 8-bit float grid (``name`` ``"e4m3"``: 1 sign, 4 exponent, 3 mantissa bits, no infinities).

    A value ``x`` with scale ``s`` is stored as ``float8(clamp(x / s, -max, max))`` (round to nearest
    even, the cast of ``torch``), read back as ``code * s``. The grid is symmetric around zero: there is
    no zero point. Its 253 distinct finite values are not evenly spaced (relative steps of 1/8 to 1/16
    down to the subnormals, ``2^-9``), so it has no ``qmin``/``qmax``: integer kernels cannot read it.
    """

    name: str = "e4m3"
    bits = 8  # class constants, not fields
    signed = True

    def __post_init__(self) -> None:
        if self.name not in _FLOAT8:
            raise DMQuantError(f"float format {self.name!r} is not supported: use one of {', '.join(_FLOAT8)}")

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype that holds the codes (``torch.float8_e4m3fn``)."""
        return _FLOAT8[self.name][0]

    @property
    def max(self) -> float:
        """The largest finite value (448 for e4m3)."""
        return _FLOAT8[self.name][1]

    @property
    def levels(self) -> int:
        """Distinct finite values (253 for e4m3: 254 finite codes, +0 and -0 equal)."""
        return 253


def format_named(name: str, bits: int = 8, signed: bool = True, narrow: bool = False) -> IntFormat | FloatFormat:
    """The format named ``name`` (one of :data:`FORMAT_NAMES`): an integer grid of ``bits`` (``signed``,
    ``narrow``), or the 8-bit float ``fp8_e4m3`` (which needs ``bits=8``)."""
    if name == "int":
        return IntFormat(bits, signed=signed, narrow=narrow)
    if name == "fp8_e4m3":
        if bits != 8:
            raise DMQuantError(f"format 'fp8_e4m3' has 8 bits, not bits={bits!r}: set bits=8 (or leave it out)")
        return FloatFormat("e4m3")
    raise DMQuantError(f"number format {name!r} is not known: use one of {', '.join(FORMAT_NAMES)}")


def is_float(fmt: IntFormat | FloatFormat) -> bool:
    return isinstance(fmt, FloatFormat)
