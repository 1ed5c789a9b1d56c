"""Ekko: incremental-forever block backups of libvirt/QEMU disks.

Data flow, and the module that owns each step:

    engine (qmp / libvirt)  point-in-time NBD export + dirty bitmap generation
    nbd.extents / nbd.reader  which segments to read, and reading them
    segment                 hash (xxh3-128), compress (zstd), verify before store
    store                   put/get/exists/list/delete of objects (local dir, Swift)
    manifest / catalog      the commit point: one manifest per backup lists every segment
    engine (again)          the old bitmap generation is retired only after the commit
"""

__version__ = "0.1.0"
