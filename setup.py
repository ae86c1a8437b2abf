"""Installs the checkout's compiler/ and runtime/ as `forgec.compiler` and `forgec.runtime`.

The repository keeps its top-level folders; the installed import names live under
`forgec`, so they cannot collide with other distributions' `compiler` or `runtime`.
Everything else (metadata, dependencies, package data) is in pyproject.toml; only the
package list is computed here, so that a new op folder needs no edit of the metadata.
"""

from setuptools import find_packages, setup

FOLDERS = ("compiler", "runtime")  # generated/ holds test data (golden packages): not installed
found = find_packages(include=[f"{f}{tail}" for f in FOLDERS for tail in ("", ".*")])

setup(
    packages=[f"forgec.{name}" for name in found],
    package_dir={f"forgec.{name}": name.replace(".", "/") for name in found},
)
