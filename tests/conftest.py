"""Shared pytest settings: small worker counts for 2-core machines, and a `slow` marker."""
import os

import pytest

# nnU-Net starts 8 worker processes by default; CI and developer machines have 2 cores.
os.environ.setdefault("nnUNet_def_n_proc", "2")
os.environ.setdefault("nnUNet_n_proc_DA", "1")


# Module fixtures that train a model, run nnU-Net, regenerate the phantoms or start a browser: every test using one
# is `slow` (`make test-fast` leaves them out; `make test` and CI run them).
SLOW_FIXTURES = {"trained", "generated", "lab", "demo_run"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (trains a model, runs nnU-Net or a "
                            "notebook, or downloads from PyPI); `make test-fast` leaves these out")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())): item.add_marker(pytest.mark.slow)
