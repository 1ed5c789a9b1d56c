"""A backup's bytes without a restore: one backup's disk served read-only over NBD.

    disk.py     ServedDisk: reads (every segment re-hashed first; damage fails the read) and block
                status from a manifest; bounded segment cache, read-ahead
    plugin.py   the nbdkit Python plugin around it (runs inside nbdkit's embedded python3.11)
    server.py   start / serving / stop_pid: nbdkit as ekko's child, its URI and PID (the API for
                `ekko serve`, `ekko mount`, and whatever else needs an export of a backup)
    mount.py    `ekko mount` / `ekko umount`: the export as the file DIR/disk.raw through nbdfuse
"""
