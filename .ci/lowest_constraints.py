"""Print pip constraints that pin each library tokenq builds on to the lowest version pyproject.toml declares,
so that CI's second environment tests exactly the declared lower bounds (the tested range is the declared range).

    python .ci/lowest_constraints.py > lowest.txt && pip install -e ".[dev]" -c lowest.txt
"""

import re
import sys
import tomllib
from pathlib import Path

PINNED = ("transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub")


def lowest(pyproject: Path) -> dict[str, str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    found = {}
    for dep in deps:
        match = re.match(r"^([A-Za-z0-9_.-]+)\s*(?:\[[^]]*\])?\s*>=\s*([0-9][^,;\s]*)", dep)
        if match and match.group(1).lower().replace("-", "_") in PINNED:
            found[match.group(1).lower().replace("-", "_")] = match.group(2)
    missing = sorted(set(PINNED) - set(found))
    if missing:
        sys.exit(f"pyproject.toml declares no lower bound (>=) for {missing}")
    return found


if __name__ == "__main__":
    for name, version in lowest(Path(__file__).resolve().parent.parent / "pyproject.toml").items():
        print(f"{name}=={version}")
