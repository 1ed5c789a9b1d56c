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
