from setuptools import find_packages, setup

setup(
    name="ekko-libvirt",
    version="0.1.0",
    description="Incremental-forever block backups of libvirt/QEMU disks to local storage or OpenStack Swift",
    packages=find_packages(include=["ekko_libvirt", "ekko_libvirt.*"]),
    python_requires=">=3.11",
    # libnbd's binding (`import nbd`) is Debian's python3-libnbd: not on PyPI, so not listed here.
    install_requires=[
        "qemu.qmp==0.0.6",
        "xxhash>=3.0",
        "zstandard>=0.19",
        "PyYAML>=6.0",
        "python-swiftclient>=4.0",
        "keystoneauth1>=4.0",              # Swift behind Keystone v3 (application credentials)
        "python-keystoneclient>=4.0",      # Swift behind Keystone v3 (password auth)
        "cryptography>=38.0",     # encryption at rest (crypto.py): AES-256-GCM and HKDF
        "libvirt-python>=9.0",
    ],
    entry_points={"console_scripts": ["ekko = ekko_libvirt.cli:main"]},
    data_files=[("share/ekko/hooks", ["hooks/qemu"])],
)
