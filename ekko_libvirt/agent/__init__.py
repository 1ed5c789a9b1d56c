"""The host agent: hook events in, backup jobs out.

    hooks/qemu (libvirt hook)  writes one event file per lifecycle step into the spool
    hookformat                 the ONE rule for a valid event, its file name, spool coalescing:
                               loaded by path by the hook, imported by the agent (stdlib only)
    spool                      reads, validates, acks or quarantines those files, in order
    events                     (pure) hook (op, sub-op) -> EventKind; the reaction table, as data
    state                      per-domain state and job records on disk; per-domain lock;
                               the offline-backup marker the hook checks before a start
    scheduler                  (pure) which domains are due now, under which policy
    settings                   the agent's part of ekko.yaml, typed
    daemon                     `ekko agent`: the Agent wires the parts below and runs the loop
    connection                 the libvirt connection, its domain events, reconnection
    intake                     spool and libvirt events -> domain state
    job_runner                 backup workers, cancel, settling interrupted jobs
    jobs                       one recorded backup job (what `ekko backup DOMAIN` runs too)
    maintenance_runner         prune after a backup, gc and verify, their records (maintenance)
    status                     `ekko status`
"""
