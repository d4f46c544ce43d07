"""Kernel families, one folder each: reference (naive.py), backends, dispatching API."""
