"""What setup.py installs is the whole package: a folder of modules without __init__.py imports
fine from a checkout (a namespace package) and is left out of a real install (find_packages)."""

import os

from setuptools import find_packages

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_folder_of_modules_is_installed():
    found = set(find_packages(ROOT, include=["ekko_libvirt", "ekko_libvirt.*"]))
    folders = {os.path.relpath(d, ROOT).replace(os.sep, ".")
               for d, _, files in os.walk(os.path.join(ROOT, "ekko_libvirt"))
               if "__pycache__" not in d and any(f.endswith(".py") for f in files)}
    assert folders and folders <= found, sorted(folders - found)


def test_the_c_extension_and_its_stub_are_part_of_the_install():
    """setup.py builds format/_segcore.c (the native segment path) into every install, editable or
    not, and ships the stub mypy reads."""
    from distutils.core import run_setup

    dist = run_setup(os.path.join(ROOT, "setup.py"), stop_after="init")
    [ext] = dist.ext_modules
    assert ext.name == "ekko_libvirt.format._segcore" and ext.libraries == ["zstd", "crypto"]
    assert all(os.path.exists(os.path.join(ROOT, s)) for s in ext.sources)
    assert "_segcore.pyi" in dist.package_data["ekko_libvirt.format"]
    assert os.path.exists(os.path.join(ROOT, "ekko_libvirt", "format", "_segcore.pyi"))
