"""Print the runtime dependencies of pyproject.toml (plus the named extras), one per line.

Used by the Dockerfile to install (and cache) the dependency layer before the source is copied:
    python3 pyproject_deps.py pyproject.toml assets | xargs pip install -c requirements/lock.txt
"""
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

path = sys.argv[1]
extras = [e for arg in sys.argv[2:] for e in arg.replace(",", " ").split()]  # "a b" or "a,b"
with open(path, "rb") as f:
    project = tomllib.load(f)["project"]
deps = list(project.get("dependencies", []))
for extra in extras:
    deps += project.get("optional-dependencies", {})[extra]
print("\n".join(deps))
