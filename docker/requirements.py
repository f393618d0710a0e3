"""Print one section of pyproject.toml's requirements, one a line:
`build` (the build system's), `core` (the project's dependencies) or the name of an extra (its own only).

The Dockerfiles install these before copying the source, so a change to the code reuses the
dependency layers, and both images share the layers up to `core`:
    python3 docker/requirements.py pyproject.toml core > requirements.txt
"""

import sys
import tomllib


def requirements(pyproject: str, section: str) -> list[str]:
    with open(pyproject, "rb") as file:
        data = tomllib.load(file)
    if section == "build":
        return list(data["build-system"]["requires"])
    project = data["project"]
    if section == "core":
        return list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    if section not in optional:
        sys.exit(f"unknown section {section!r}: build, core or an extra of {sorted(optional)}")
    return list(optional[section])


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: requirements.py PYPROJECT build|core|EXTRA")
    print("\n".join(requirements(sys.argv[1], sys.argv[2])))
