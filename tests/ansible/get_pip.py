"""Stands in for pip's get-pip.py, which ansible-test downloads from
Ansible's CI file server (outside the package registries these machines
reach) to put pip into each sanity test's venv: installs the pip that
Python's own ensurepip bundles, then runs `pip install` with get-pip's
arguments (the pinned pip and the sanity test's requirements, from PyPI)."""

import ensurepip
import runpy
import sys

ensurepip.bootstrap()
# get-pip's own options for what it bootstraps beside pip.
args = [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]
sys.argv = ["pip", "install", *args]
runpy.run_module("pip", run_name="__main__", alter_sys=True)
