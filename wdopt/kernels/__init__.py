"""Compiled kernels, one subpackage per backend (``triton``; ``cpu``/``cuda`` C++ in csrc/).

Nothing here is imported by ``import wdopt``; ``wdopt.backends`` loads a backend on first use.
"""
