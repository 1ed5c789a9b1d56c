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


def test_the_c_extensions_and_their_stubs_are_part_of_the_install():
    """setup.py builds format/_segcore.c (the native segment path) and _directio.c (the store's
    and the restore's direct I/O) into every install, editable or not, and ships the stubs mypy
    reads; the Debian package builds both too."""
    from distutils.core import run_setup

    dist = run_setup(os.path.join(ROOT, "setup.py"), stop_after="init")
    exts = {e.name: e for e in dist.ext_modules}
    assert sorted(exts) == ["ekko_libvirt._directio", "ekko_libvirt.format._segcore"]
    assert exts["ekko_libvirt.format._segcore"].libraries == ["zstd", "crypto"]
    for e in exts.values():
        assert all(os.path.exists(os.path.join(ROOT, s)) for s in e.sources)
    assert "_segcore.pyi" in dist.package_data["ekko_libvirt.format"]
    assert "_directio.pyi" in dist.package_data["ekko_libvirt"]
    for stub in ("format/_segcore.pyi", "_directio.pyi"):
        assert os.path.exists(os.path.join(ROOT, "ekko_libvirt", stub))
    with open(os.path.join(ROOT, "packaging", "build-deb.sh")) as f:
        script = f.read()
    assert "ekko_libvirt/format/_segcore.c" in script and "ekko_libvirt/_directio.c" in script
