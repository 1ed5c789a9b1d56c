from setuptools import Extension, find_packages, setup

setup(
    name="ekko-libvirt",
    version="0.1.0",
    description="Incremental-forever block backups of libvirt/QEMU disks to local storage or OpenStack Swift",
    packages=find_packages(include=["ekko_libvirt", "ekko_libvirt.*"]),
    package_data={"ekko_libvirt.format": ["_segcore.pyi"], "ekko_libvirt": ["_directio.pyi"]},
    # The per-segment data path in C with the GIL released (format/segment.py, issue 15): links
    # Debian's libzstd (libzstd-dev), the library Debian's python3-zstandard links too, so both
    # paths write the same bytes; xxhash.h (libxxhash-dev) is inlined, nothing more to link. libcrypto
    # (libssl-dev): AES-256-GCM of encrypted stores (format/crypto.py), GIL released as well.
    ext_modules=[Extension("ekko_libvirt.format._segcore", sources=["ekko_libvirt/format/_segcore.c"],
                           libraries=["zstd", "crypto"],
                           extra_compile_args=["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"]),
                 # directio.py's object writes and reads (O_DIRECT through an aligned buffer), GIL released
                 Extension("ekko_libvirt._directio", sources=["ekko_libvirt/_directio.c"],
                           extra_compile_args=["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"])],
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
        "prometheus_client>=0.16",     # the agent's metrics (Debian's python3-prometheus-client 0.16)
    ],
    # ekko-api (issue 19): requirements-api.txt pins what was tested; Debian's OpenStack libraries are older
    extras_require={"api": ["Flask>=3.0", "gunicorn>=21", "keystonemiddleware>=10", "oslo.config>=9",
                            "oslo.policy>=4", "oslo.messaging>=14"]},
    entry_points={
        "console_scripts": ["ekko = ekko_libvirt.cli:main", "ekko-api = ekko_libvirt.api.cmd:main"],
        # the samples: oslo-config-generator --namespace ekko.api, oslopolicy-sample-generator --namespace ekko
        "oslo.config.opts": ["ekko.api = ekko_libvirt.api.conf:list_opts", "ekko.api.bus = ekko_libvirt.api.bus:list_opts"],
        "oslo.policy.policies": ["ekko = ekko_libvirt.api.policy:list_rules"],
        # the OpenStack CLI plugin: `openstack ekko ...` (python-openstackclient, requirements-api.txt)
        "openstack.cli.extension": ["ekko = ekko_libvirt.osc.plugin"],
        "openstack.ekko.v1": [
            "ekko_instance_list = ekko_libvirt.osc.v1.instance:ListInstance",
            "ekko_backup_list = ekko_libvirt.osc.v1.backup:ListBackup",
            "ekko_backup_show = ekko_libvirt.osc.v1.backup:ShowBackup",
            "ekko_backup_create = ekko_libvirt.osc.v1.backup:CreateBackup",
            "ekko_backup_delete = ekko_libvirt.osc.v1.backup:DeleteBackup",
            "ekko_backup_protect = ekko_libvirt.osc.v1.backup:ProtectBackup",
            "ekko_backup_unprotect = ekko_libvirt.osc.v1.backup:UnprotectBackup",
            "ekko_backup_restore = ekko_libvirt.osc.v1.backup:RestoreBackup",
            "ekko_file_list = ekko_libvirt.osc.v1.file:ListFile",
            "ekko_file_get = ekko_libvirt.osc.v1.file:GetFile",
            "ekko_usage_show = ekko_libvirt.osc.v1.usage:ShowUsage",
            "ekko_job_show = ekko_libvirt.osc.v1.job:ShowJob",
        ],
    },
    data_files=[("share/ekko/hooks", ["hooks/qemu"])],
)
