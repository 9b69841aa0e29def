"""Shared pytest settings: small worker counts for 2-core machines, and a `slow` marker."""
import os

# nnU-Net starts 8 worker processes by default; CI and developer machines have 2 cores.
os.environ.setdefault("nnUNet_def_n_proc", "2")
os.environ.setdefault("nnUNet_n_proc_DA", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (trains a model or downloads from PyPI)")
