"""Known vulnerabilities in the runtime dependencies (requirements.txt and what they pull in), from PyPI.

pip-audit cannot work from this machine: PyPI's per-version JSON API answers nothing through its network and
OSV is unreachable, so pip-audit "finds no vulnerabilities" only by skipping every package. PyPI's project JSON
does answer, and lists the known vulnerabilities of the latest release. So each installed runtime package that is
at its latest release is checked for real; one that is not is reported as unchecked. Exit 1 if a vulnerability is
known, 0 otherwise (unchecked packages and failed lookups are warnings).

    .venv/bin/python .ci/audit_dependencies.py
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def runtime_packages() -> dict[str, str]:
    """Installed name -> version for requirements.txt and everything it requires, recursively."""
    wanted = [
        re.split(r"[=<>\[ ]", line.strip())[0]
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    found: dict[str, str] = {}
    while wanted:
        name = wanted.pop()
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        key = dist.metadata["Name"].lower()
        if key in found:
            continue
        found[key] = dist.version
        for requirement in dist.requires or []:
            if "extra ==" not in requirement:
                wanted.append(re.split(r"[=<>!~;\[ (]", requirement.strip())[0])
    return found


def main() -> int:
    vulnerable, unchecked = [], []
    packages = runtime_packages()
    for name, version in sorted(packages.items()):
        try:
            with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=15) as response:
                data = json.load(response)
        except OSError as exc:
            unchecked.append(f"{name} {version}: lookup failed ({exc})")
            continue
        if data["info"]["version"] != version:
            unchecked.append(f"{name} {version}: not the latest release ({data['info']['version']})")
            continue
        for vulnerability in data.get("vulnerabilities") or []:
            vulnerable.append(f"{name} {version}: {vulnerability.get('id')} (fixed in {vulnerability.get('fixed_in')})")
    print(f"audited {len(packages) - len(unchecked)} of {len(packages)} runtime packages against PyPI's advisories")
    for line in unchecked:
        print(f"  unchecked: {line}")
    for line in vulnerable:
        print(f"  VULNERABLE: {line}")
    if not vulnerable:
        print("no known vulnerabilities")
    return 1 if vulnerable else 0


if __name__ == "__main__":
    sys.exit(main())
