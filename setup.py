"""The package's metadata is in pyproject.toml (PEP 621); this file lets tools that look for a
setup.py (and `pip install -e .` with an old pip) find the project."""

from setuptools import setup

setup()
