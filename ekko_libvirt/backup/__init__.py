"""Taking a backup: the one backup transaction (transaction.py) and what it is made of, from the
chain as the store and this host's ledger see it (chain.py, ledger.py) to one disk's data path
(copy.py); a libvirt domain's disks and labels (domain.py) and a shut-off domain's storage
daemon (offline.py)."""
