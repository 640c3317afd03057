"""The Ultralytics versions the integration patches are tested on."""

from __future__ import annotations

import re

TESTED = ("8.4.115", "8.4.190")  # inclusive; keep in step with pyproject.toml and CI


def _key(v: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def supported(version: str) -> bool:
    return _key(TESTED[0]) <= _key(version) <= _key(TESTED[1])


def message(version: str) -> str:
    return (
        f"so-det-ultra supports ultralytics {TESTED[0]} to {TESTED[1]} (the versions its tests cover), but "
        f"ultralytics {version} is installed. Install a supported version: pip install 'ultralytics>={TESTED[0]},"
        f"<={TESTED[1]}'. Set SO_DET_ULTRA_ALLOW_UNTESTED=1 to try anyway."
    )
