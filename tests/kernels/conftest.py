"""Kernel tests run Triton kernels on CPU tensors through Triton's interpreter.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here, before any test module
imports the (lazily loaded) Triton kernel modules; ``dmquant.kernels._dispatch.launcher`` also wraps
a compiled kernel in the interpreter explicitly when the tensors are on the CPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
