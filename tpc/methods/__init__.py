"""Scoring and selection algorithms as plain tensor functions, one file per paper.

These functions know nothing about graphs: the ``tpc::`` ops in :mod:`tpc.kernels` call
them as their reference implementations, and the tests compare them with slow loops.
"""
