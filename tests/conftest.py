"""Shared fixtures: a per-session cache (so the backbone is exported once), the real demo digits,
and one trained run reused by the read-only tests."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before foldernet is imported anywhere: a fresh cache for this session, no hub access.
_CACHE = Path(tempfile.mkdtemp(prefix="foldernet-test-cache-"))
os.environ["FOLDERNET_CACHE"] = str(_CACHE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from foldernet.demo import write_digits

    return write_digits(tmp_path_factory.mktemp("digits") / "data", per_class=20)


@pytest.fixture(scope="session")
def trained_run(digits_dir, tmp_path_factory):
    import foldernet

    out = tmp_path_factory.mktemp("runs") / "digits"
    return foldernet.train(digits_dir, out=out, progress=False)


@pytest.fixture(scope="session")
def sample_photos() -> dict[str, Path]:
    """Real photos that ship inside scikit-learn."""
    import sklearn

    base = Path(sklearn.__file__).parent / "datasets" / "images"
    return {"china": base / "china.jpg", "flower": base / "flower.jpg"}
