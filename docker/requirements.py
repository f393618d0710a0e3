"""Print requirements from pyproject.toml, one a line: the project's dependencies and those of the named
extras, or with --build the build system's (setuptools, wheel).

The Dockerfiles install these before copying the source, so a change to the code reuses the
dependency layers:  python3 docker/requirements.py pyproject.toml train > requirements.txt
"""

import sys

import tomllib


def requirements(pyproject: str, extras: list[str], build: bool) -> list[str]:
    with open(pyproject, "rb") as file:
        data = tomllib.load(file)
    if build:
        return list(data["build-system"]["requires"])
    project = data["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        sys.exit(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    return list(project["dependencies"]) + [req for extra in extras for req in optional[extra]]


if __name__ == "__main__":
    args = sys.argv[1:]
    build = "--build" in args
    args = [arg for arg in args if arg != "--build"]
    if not args:
        sys.exit("usage: requirements.py PYPROJECT [--build | EXTRA ...]")
    print("\n".join(requirements(args[0], args[1:], build)))
