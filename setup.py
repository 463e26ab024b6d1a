"""Packaging lives in setup.cfg; this file lets older tools install the project."""
from setuptools import setup

setup()
