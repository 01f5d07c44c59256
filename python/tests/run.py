"""Runs the Python test suite; exit 77 (skipped) where torch, NumPy or
pytest is missing (Debian: python3-torch python3-numpy python3-pytest)."""
import os
import sys

try:
    import numpy  # noqa: F401
    import pytest
    import torch  # noqa: F401
except ImportError as e:
    print(f"skipped: {e}")
    sys.exit(77)

sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", os.path.dirname(os.path.abspath(__file__))] + sys.argv[1:]))
