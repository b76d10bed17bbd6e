"""Triton kernels for the training hot path, each with a pure-torch reference.

The model calls the functional entry points below; each one routes on the single switch
in kernels.dispatch ("torch": the reference, "triton": the kernel). One file per op:
kernels, launchers (torch custom ops), an autograd.Function, the entry point and its
`*_reference`. bench/kernel_testing.py checks a kernel against its reference.
"""

from .cross_entropy import cross_entropy, cross_entropy_reference
from .dispatch import get_backend, resolve, set_backend, use
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from .relu_squared import relu_squared, relu_squared_reference
from .rms_norm import rms_norm, rms_norm_reference
from .rotary import apply_rotary, apply_rotary_reference
from .xxt import xxt, xxt_reference

__all__ = [
    "apply_rotary",
    "apply_rotary_reference",
    "cross_entropy",
    "cross_entropy_reference",
    "get_backend",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "relu_squared",
    "relu_squared_reference",
    "resolve",
    "rms_norm",
    "rms_norm_reference",
    "set_backend",
    "use",
    "xxt",
    "xxt_reference",
]
