"""The exception tree. Every error carries the data an operator needs and keeps its cause.

    EkkoError                      exit code 1 unless stated
     +-- ConfigError               bad config file / key (exit 2)
     +-- UsageError                bad CLI arguments, unknown target/backup/disk (exit 2)
     +-- EngineError               QEMU / libvirt refused or failed a step
     |    +-- QMPUnavailable       nothing answers on the QMP socket
     |    +-- DiskNotFound         the node/disk is not there (exit 2)
     |    +-- IncrementalImpossible  an incremental was demanded but cannot be done (exit 2)
     |    +-- GuestAgentError      the guest agent is absent, refused, or did not answer in time
     |    +-- FreezeRequired       `consistency: filesystem` and the guest could not be frozen:
     |                             nothing committed, nothing lost
     +-- ReaderError               NBD export unusable (e.g. no dirty-bitmap context negotiated)
     +-- ReadBackMismatch          the export reads differently from what the backup was about to
     |                             commit (a dirty bitmap missed writes?): nothing committed, next is a full
     +-- EncodeMismatch            verify-before-store: a segment changed while it was encoded (a
     |                             fault in this process, not in the store): nothing is committed
     +-- StoreError                the object store failed
     |    +-- ObjectNotFound
     +-- IntegrityError            data in the store does not match its hash / checksum (exit 3)
     +-- ManifestError             a manifest cannot be parsed (subclass of IntegrityError)
     +-- KeyMismatch               an object is sealed with a key we do not hold, or not sealed where
     |                             a key is configured (exit 2); names the fingerprints, never a key
     +-- LockBusy                  another ekko job holds the target
"""


class EkkoError(Exception):
    exit_code = 1


class ConfigError(EkkoError):
    exit_code = 2

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"config: {key}: {problem}")


class UsageError(EkkoError):
    exit_code = 2


class EngineError(EkkoError):
    pass


class QMPUnavailable(EngineError):
    def __init__(self, socket_path: str, reason: str):
        self.socket_path = socket_path
        super().__init__(f"QMP socket {socket_path} does not answer: {reason}. Nothing was changed.")


class DiskNotFound(EngineError):
    exit_code = 2


class IncrementalImpossible(EngineError):
    exit_code = 2


class GuestAgentError(EngineError):
    """A guest agent call failed or timed out. `reason` is what a manifest records when the
    backup goes on crash-consistent (`consistency: auto`). `refused`: the agent answered, with an
    error (a command it does not offer or blocks): it is alive."""

    def __init__(self, reason: str, timed_out: bool = False, refused: bool = False):
        self.reason = reason
        self.timed_out = timed_out
        self.refused = refused
        super().__init__(reason)


class FreezeRequired(EngineError):
    def __init__(self, target: str, reason: str):
        self.target = target
        self.reason = reason
        super().__init__(f"{target}: consistency: filesystem, but the guest cannot be frozen ({reason}); "
                         "nothing was committed and nothing is lost")


class ScratchSpaceLow(EngineError):
    """Too little room for copy-before-write on the scratch file system (backup/scratch.py)."""

    def __init__(self, path: str, reason: str):
        self.path = path
        super().__init__(f"scratch space for the backup's point-in-time view is low on {path}: {reason}. "
                         "Nothing was committed; free space there, or move state_dir, or lower scratch_reserve")


class ReaderError(EkkoError):
    pass


class ReadBackMismatch(EkkoError):
    """The read-back check before a commit (backup.copy._read_back) read a segment of the still-open
    point-in-time view and got other bytes than the segment the manifest was going to name."""

    def __init__(self, target: str, index: int, offset: int, expected: str, found: str):
        self.target, self.index, self.offset = target, index, offset
        super().__init__(f"{target}: read-back check failed: segment {index} (offset {offset}) of the point-in-time "
                         f"view holds {found}, the backup was about to commit {expected}. The chain's change "
                         "tracking missed writes, or the view changed under the backup. Nothing was committed; "
                         "the next backup of this disk is a full")


class EncodeMismatch(EkkoError):
    """What was about to be stored does not decode to the bytes it was named after. The store is
    fine (exit 1, not 3): the bytes changed in memory between hashing and encoding."""

    def __init__(self, key: str, problem: str):
        self.key = key
        super().__init__(f"segment {key}: verify-before-store failed ({problem}): the data changed in memory "
                         "while it was encoded; nothing was stored or committed")


class StoreError(EkkoError):
    pass


class RestoreTargetError(EkkoError):
    """The restored image could not be written (its file system is full, read-only, ...)."""

    def __init__(self, path: str, cause: Exception,
                 outcome: str = "nothing restored: the partial image was removed"):
        self.path = path
        super().__init__(f"cannot write the restored image {path}: {getattr(cause, 'strerror', None) or cause} "
                         f"({outcome})")


class ObjectNotFound(StoreError):
    def __init__(self, key: str):
        self.key = key
        super().__init__(f"object not found in store: {key}")


class IntegrityError(EkkoError):
    exit_code = 3


class ManifestError(IntegrityError):
    pass


class LockBusy(EkkoError):
    pass


class KeyMismatch(EkkoError):
    """`needed`: fingerprint of the key the object is sealed with (None: it is not encrypted);
    `have`: fingerprint of the configured key (None: encryption is off)."""
    exit_code = 2

    def __init__(self, key: str, needed, have, hint: str = ""):
        self.key = key
        self.needed = needed
        self.have = have
        sealed = f"is encrypted with key fingerprint {needed}" if needed else "is not encrypted"
        held = f"the configured key has fingerprint {have}" if have else "encryption is not configured"
        super().__init__(f"{key} {sealed}, but {held}" + (f". {hint}" if hint else ""))


def describe_error(e: BaseException) -> str:
    """An error for an operator: ours as they are, anything else with its type."""
    return str(e) if isinstance(e, EkkoError) else f"{type(e).__name__}: {e}"
