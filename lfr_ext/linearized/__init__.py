"""The exact linearized tangent pass (see :mod:`lfr_ext.linearized.tape`)."""

from .calls import DeclinedOpError
from .rules import SUPPORTED_OPS, UnsupportedOpError
from .tape import TangentTape

__all__ = ["DeclinedOpError", "TangentTape", "UnsupportedOpError", "SUPPORTED_OPS"]
