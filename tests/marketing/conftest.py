"""Shared checks of the marketing tests."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest


@pytest.fixture
def assert_valid_html5() -> Callable[[Path], None]:
    """Parse a page with html5lib in strict mode: any parse error (stray end tag, bad nesting) fails the test."""
    html5lib = pytest.importorskip("html5lib", reason="html5lib is in the 'test' extra")

    def check(path: Path) -> None:
        parser = html5lib.HTMLParser(strict=True)
        parser.parse(Path(path).read_text())
        assert not parser.errors, parser.errors

    return check
