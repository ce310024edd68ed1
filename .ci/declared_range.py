"""The range of releases pyproject.toml declares for the libraries tokenq builds on, which is the range CI tests.

    python .ci/declared_range.py lowest > lowest.txt && pip install -e ".[dev]" -c lowest.txt
        pip constraints pinning each library to its declared lower bound (CI's second environment)
    python .ci/declared_range.py newer
        one line `NEWER RELEASE OUTSIDE RANGE: <package> <version>` per library whose newest release on the index is
        beyond its declared upper bound (information for the maintainers: it never fails, exit code 0)
"""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

PINNED = ("transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub")  # CI's second env: their lower bounds
BOUNDED = (*PINNED, "bitsandbytes", "optuna")  # an upper bound each: the newest release CI passed on
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def declared(pyproject: Path = PYPROJECT) -> dict[str, dict[str, str]]:
    """{library: {">=": lower bound, "<": upper bound}} for `BOUNDED`, as pyproject.toml declares them (read with the
    standard library alone: CI runs this before anything is installed)."""
    found = {}
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = [dep for group in project.get("optional-dependencies", {}).values() for dep in group]
    for dep in project["dependencies"] + extras:
        name = re.match(r"^([A-Za-z0-9_.-]+)", dep).group(1)
        if name.lower().replace("-", "_") in BOUNDED:
            found[name.lower().replace("-", "_")] = dict(re.findall(r"(>=|<)\s*([0-9][^,;\s]*)", dep))
    for name in BOUNDED:
        if set(found.get(name, {})) != {">=", "<"}:
            sys.exit(f"pyproject.toml must declare a lower (>=) and an upper (<) bound for {name}, got {found.get(name)}")
    return found


def lowest() -> None:
    for name, bounds in declared().items():
        if name in PINNED:
            print(f"{name}=={bounds['>=']}")


def newer() -> None:
    from packaging.version import InvalidVersion, Version  # installed with the project (transformers needs it)

    for name, bounds in declared().items():
        try:
            listing = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True,
                                     text=True, timeout=120).stdout
        except (OSError, subprocess.SubprocessError) as e:
            print(f"newer releases: could not list {name}'s releases ({e})")
            continue
        line = next((ln for ln in listing.splitlines() if ln.startswith("Available versions:")), "")
        versions = []
        for text in line.removeprefix("Available versions:").split(","):
            try:
                versions.append(Version(text.strip()))
            except InvalidVersion:
                continue
        ceiling = Version(bounds["<"])
        beyond = sorted(v for v in versions if v >= ceiling and not v.is_prerelease)
        if not versions:
            print(f"newer releases: could not list {name}'s releases")
        for version in beyond[-1:]:  # the newest
            print(f"NEWER RELEASE OUTSIDE RANGE: {name} {version}")


if __name__ == "__main__":
    {"lowest": lowest, "newer": newer}[sys.argv[1] if len(sys.argv) > 1 else "lowest"]()
