"""Print pip constraints pinning nbdist's dependencies to the oldest versions pyproject allows.

    python .ci/oldest.py > constraints.txt

Every runtime dependency in ``[project] dependencies``, and every framework of the
``frameworks`` extra, becomes ``name==lower-bound``,
torch aside: CI keeps the local CPU build (see .ci/tier). Test-only packages stay free:
nbdist makes no promise about them. A dependency without one ``>=`` lower bound is an
error, since the oldest run could not test what pyproject then allows.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
SKIP = {"torch"}  # CI tests the installed CPU build only: other versions pull gigabytes

# name, optional [extras], then the specifiers up to an environment marker
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)")


def oldest(requirement: str) -> tuple[str, str] | None:
    """``("rich", "13")`` for ``"rich>=13"``; None for a package CI does not pin."""
    match = REQUIREMENT.match(requirement)
    if not match:
        raise SystemExit(f"{PYPROJECT.name}: cannot parse requirement {requirement!r}")
    name, specifiers = match.groups()
    if re.sub(r"[-_.]+", "-", name).lower() in SKIP:
        return None
    bounds = [s.strip()[2:].strip() for s in specifiers.split(",") if s.strip().startswith(">=")]
    if len(bounds) != 1:
        raise SystemExit(f"{PYPROJECT.name}: {requirement!r} needs one '>=' lower bound, "
                         "so that CI's oldest run tests what pyproject allows")
    return name, bounds[0]


def main() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    # the frameworks nbdist adapts to (nbdist/frameworks.py) are promised at their
    # lower bounds too
    for requirement in project["dependencies"] + project["optional-dependencies"]["frameworks"]:
        pin = oldest(requirement)
        if pin is not None:
            sys.stdout.write(f"{pin[0]}=={pin[1]}\n")


if __name__ == "__main__":
    main()
