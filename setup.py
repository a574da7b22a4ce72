"""Packaging beyond what pyproject.toml can say: the recipes (recipes/ at the top of the source tree, where users
and the Makefile look for them) are installed inside the package as pipeline/recipes/, so an installed
`trtllm-pipeline ls` finds them."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["pipeline", "pipeline.*"]), "pipeline.recipes"],
      package_dir={"pipeline.recipes": "recipes"},
      package_data={"pipeline.recipes": ["*.yaml"]})
