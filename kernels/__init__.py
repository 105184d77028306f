"""Triton kernels of blipfast, installed as ``blipfast.kernels``.

Import lazily: importing this package must not require Triton; each kernel module imports triton
itself and is only loaded when its backend is selected.
"""
