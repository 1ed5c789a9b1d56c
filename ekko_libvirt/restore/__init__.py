"""Getting data back: a disk image (raw, qcow2, block device), a whole domain."""
