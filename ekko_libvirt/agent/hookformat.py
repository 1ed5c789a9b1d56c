"""The hook event format: the ONE rule for what a valid event is, its file name, and spool coalescing.

Two programs use this file, so it imports nothing but `os` (and `fcntl` when it coalesces):

    hooks/qemu          loads it BY PATH (it runs as `python3 -IS`, outside any virtualenv; the
                        path is baked into the installed hook by spool.render_hook) and refuses to
                        write an event that `check_event` refuses
    events.parse_event  imports it and quarantines exactly what `check_event` refuses

so an event the hook writes is an event the agent reads, and the other way round
(tests/unit/test_hook_agent_rule.py runs both on the same generated inputs).

What a valid event is
---------------------
An event file holds one JSON object. REQUIRED fields -- any problem refuses the event (the hook
drops the call with one line on stderr, the agent moves the file to bad/):

    v           FORMAT_VERSION
    domain      1-MAX_NAME characters of NAME_CHARS, not "." or ".." (argv[1]; libvirt names
                outside this set are refused: see NAME_CHARS)
    op, subop   1-MAX_OP characters of OP_CHARS (argv[2], argv[3])
    wall_ns, mono_ns, pid   integers >= 0 (written by the hook, never taken from its input)

Every other field is informational or comes from the untrusted domain XML: a bad value is KEPT AS
"UNKNOWN" (None, False, "unknown") with a note, never a reason to lose the event:

    extra       argv[4]: 1-MAX_EXTRA characters of EXTRA_CHARS, else None ("" and a missing
                argv[4] are None)
    uuid        a UUID (any case; stored lower-case), else None -- the agent then ignores it
    boot_id     a UUID, else None
    xml         one of XML_STATUSES, else "unknown"
    xml_name    clean_text, else None
    nova        {name, flavor: clean_text; project_uuid, user_uuid: UUID}; a bad member is left out
    vetoed      true/false, else false
    known       recomputed from op (op in KNOWN_OPS); the file's value is not trusted

`check_event` is the rule; `call_from_argv` is the same rule applied to the hook's argv.
Text checks use no Unicode database (plain ASCII ranges), so a hook run by /usr/bin/python3 and an
agent run by another Python version cannot disagree about a character.

The event file's name
---------------------
    WALLNS-MONONS-PID-RAND-L-UUID.json      (UUID is "none" for an event without one)
    WALLNS-MONONS-PID-RAND.json             (written by hooks before the tag: still read)

WALLNS and MONONS are 20 digits, PID 1-10 digits, RAND 16 hex digits: sorting names sorts events
by the time of the hook call. L (`kind_letter`) says what the event can change in the agent's
state of the domain, so that coalescing needs the names only, no file reads:

    P  prepare begin (not vetoed)  the domain starts; if the agent last saw it RUNNING, its
                                   previous run ended without stop events: unclean, a full is due
    S  started                     running; the chain is checked before the next incremental
    C  reconnect                   running; jobs are reconciled with libvirt
    X  stopped, release            stopped cleanly
    M  migrate                     incoming migration: a full is due (or a chain check)
    R  start, restore, attach, a vetoed prepare      recorded only
    I  unknown operation, or no UUID                 ignored by the agent

Coalescing (a bounded spool)
----------------------------
While the agent is down the hook keeps writing. When the spool holds more than `bound` events,
the hook calling `coalesce_spool` removes the events whose removal changes nothing the agent
will decide (`plan_coalesce`). An event is ESSENTIAL -- never removed -- when it is

  * the newest event of its domain (the agent's "last event", its running / stopped state), or
  * the newest carrier of an effect: the newest S (chain check), C (reconcile) and M (migration)
    of the domain, and for each possible state the agent may hold, the newest P that finds the
    domain running (the unclean-shutdown full), or
  * needed so that every essential P still finds the domain in the same state (running or not),
    and the domain ends in the same state (running, clean shutdown or not).

A backup that runs between two events (`ekko backup` while the agent is down) cannot make a
removed event matter: the effects kept are those of the NEWEST carriers, which come after it.
Events without a tag (older hooks) are kept, and so is everything older than the newest of them.
What is lost is history: the intermediate events of a domain's start/stop cycles, and the
cancellation of a backup job by a stop that a later stop repeats.

The agent holds LOCK_NAME (flock) while it drains; the hook coalesces only if it gets the lock at
once (else the agent is reading the spool, which then shrinks anyway) -- the hook never waits.
"""

import os

FORMAT_VERSION = 1
MAX_NAME = 128
MAX_OP = 16
MAX_EXTRA = 64
MAX_TEXT = 255              # any string taken from the XML

KNOWN_OPS = frozenset(("prepare", "start", "started", "stopped", "release",
                       "migrate", "restore", "reconnect", "attach"))
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
# libvirt allows more in a domain name (spaces, any UTF-8 but '/'); Nova's names are instance-%08x.
NAME_CHARS = frozenset(_ALNUM + "._-+:@=,~")
OP_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz-")
EXTRA_CHARS = frozenset(_ALNUM + "._-+:@=,/")
HEX = frozenset("0123456789abcdef")
XML_STATUSES = frozenset(("ok", "empty", "oversize", "unreadable", "malformed", "name-mismatch", "unparsed"))

LOCK_NAME = ".lock"
OFFLINE_SUFFIX = ".offline-backup"


def offline_marker_path(state_dir, uuid):
    """The marker an offline backup of domain `uuid` holds while it runs (agent/state.py writes
    it, the hook refuses the domain's start while it is there): one rule for both."""
    return os.path.join(state_dir, "locks", uuid + OFFLINE_SUFFIX)

DEFAULT_BOUND = 1000        # pending events before the hook coalesces (config agent.spool_max_events)
LETTERS = "PSCXMRI"


class Refused(ValueError):
    """Not a valid event; `reason` says why, for stderr or the bad/NAME.reason file."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


# --- texts ---------------------------------------------------------------------------------------

def _charset_ok(text, chars, max_len, min_len=1):
    return isinstance(text, str) and min_len <= len(text) <= max_len and all(c in chars for c in text)


def plain(text):
    """No control characters (C0, DEL, C1), no lone surrogates. Needs no Unicode database."""
    return all(" " <= c < "\x7f" or "\xa0" <= c < "\ud800" or c > "\udfff" for c in text)


def clean_text(text):
    """A string from the XML: ASCII-whitespace stripped, plain, 1-MAX_TEXT characters; else None."""
    if not isinstance(text, str):
        return None
    t = text.strip(" \t\r\n")
    if not t or len(t) > MAX_TEXT or not plain(t):
        return None
    return t


def valid_uuid(text):
    """'6f1c...-...' (36 chars, any case) -> lower-case form, or None."""
    if not isinstance(text, str) or len(text) != 36:
        return None
    t = text.lower()
    for i, c in enumerate(t):
        if i in (8, 13, 18, 23):
            if c != "-":
                return None
        elif c not in HEX:
            return None
    return t


def check_name(name):
    """-> None, or why the domain name is refused."""
    if not _charset_ok(name, NAME_CHARS, MAX_NAME) or name in (".", ".."):
        shown = name[:MAX_NAME] if isinstance(name, str) else name
        return "domain name refused (1-%d characters of [A-Za-z0-9._-+:@=,~]): %r" % (MAX_NAME, shown)
    return None


def check_op(value, what):
    """-> None, or why the operation / sub-operation is refused."""
    if not _charset_ok(value, OP_CHARS, MAX_OP):
        return "%s refused (1-%d characters of [a-z-]): %r" % (what, MAX_OP, value[:MAX_OP] if isinstance(
            value, str) else value)
    return None


def normalize_extra(extra):
    """argv[4] -> itself when valid, else None (it only informs: never a reason to drop an event)."""
    return extra if _charset_ok(extra, EXTRA_CHARS, MAX_EXTRA) else None


# --- argv ----------------------------------------------------------------------------------------

def call_from_argv(args):
    """The hook's argv after the program: DOMAIN OPERATION SUB-OPERATION EXTRA -> dict(domain, op,
    subop, extra, known). Raises Refused."""
    if len(args) != 4:
        raise Refused("expected 4 arguments (domain operation sub-operation extra), got %d" % len(args))
    name, op, subop, extra = args
    problem = check_name(name) or check_op(op, "operation") or check_op(subop, "sub-operation")
    if problem:
        raise Refused(problem)
    return {"domain": name, "op": op, "subop": subop, "extra": normalize_extra(extra), "known": op in KNOWN_OPS}


# --- the event -----------------------------------------------------------------------------------

def _count(raw, key):
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise Refused("%s: expected a non-negative integer, got %r" % (key, value))
    return value


def check_event(raw):
    """The decoded JSON of one event -> (event, notes). Raises Refused.

    `event` is a new dict with every field of the format, normalized (see the module docstring);
    `notes` lists the informational fields that were unusable and are kept as unknown."""
    if not isinstance(raw, dict):
        raise Refused("expected a JSON object, got %s" % type(raw).__name__)
    if raw.get("v") != FORMAT_VERSION or isinstance(raw.get("v"), bool):
        raise Refused("unsupported format version %r (this reader knows %d)" % (raw.get("v"), FORMAT_VERSION))
    problem = (check_name(raw.get("domain")) or check_op(raw.get("op"), "operation")
               or check_op(raw.get("subop"), "sub-operation"))
    if problem:
        raise Refused(problem)
    event = {"v": FORMAT_VERSION, "wall_ns": _count(raw, "wall_ns"), "mono_ns": _count(raw, "mono_ns"),
             "pid": _count(raw, "pid"), "domain": raw["domain"], "op": raw["op"], "subop": raw["subop"],
             "known": raw["op"] in KNOWN_OPS}
    notes = []

    def lenient(key, value, ok, unknown=None):
        if value is None or ok is not None:
            return ok if value is not None else unknown
        notes.append("%s %r unusable: kept as %r" % (key, value if not isinstance(value, str) else value[:80],
                                                      unknown))
        return unknown

    extra = raw.get("extra")
    event["extra"] = None if extra == "" else lenient("extra", extra, normalize_extra(extra))
    event["uuid"] = lenient("uuid", raw.get("uuid"), valid_uuid(raw.get("uuid")))
    event["boot_id"] = lenient("boot_id", raw.get("boot_id"), valid_uuid(raw.get("boot_id")))
    xml = raw.get("xml")
    event["xml"] = lenient("xml", xml, xml if xml in XML_STATUSES else None, "unknown")
    event["xml_name"] = lenient("xml_name", raw.get("xml_name"), clean_text(raw.get("xml_name")))
    nova = raw.get("nova")
    if nova is not None and not isinstance(nova, dict):
        notes.append("nova %r unusable: kept as None" % type(nova).__name__)
        nova = None
    if nova is not None:
        kept = {}
        for key, check in (("name", clean_text), ("flavor", clean_text),
                           ("project_uuid", valid_uuid), ("user_uuid", valid_uuid)):
            value = lenient("nova." + key, nova.get(key), check(nova.get(key)))
            if value is not None:
                kept[key] = value
        nova = kept or None
    event["nova"] = nova
    vetoed = raw.get("vetoed", False)
    event["vetoed"] = lenient("vetoed", vetoed, vetoed if isinstance(vetoed, bool) else None, False)
    return event, tuple(notes)


def kind_letter(event):
    """What a (checked) event can change in the agent's state: one of LETTERS (module docstring)."""
    op = event["op"]
    if event["uuid"] is None or op not in KNOWN_OPS:
        return "I"
    if op == "prepare":
        return "R" if event["vetoed"] else "P"
    return {"started": "S", "reconnect": "C", "stopped": "X", "release": "X", "migrate": "M"}.get(op, "R")


# --- the file name -------------------------------------------------------------------------------

def event_name(wall_ns, mono_ns, pid, rand_hex, letter, uuid):
    return "%020d-%020d-%010d-%s-%s-%s.json" % (wall_ns, mono_ns, pid, rand_hex, letter, uuid or "none")


def parse_name(name):
    """An event file name -> (wall_ns, letter, uuid): letter and uuid None for an untagged (older)
    name, uuid None for "none". -> None: not an event file name."""
    if not isinstance(name, str) or not name.endswith(".json"):
        return None
    parts = name[:-5].split("-", 4)
    if len(parts) < 4:
        return None
    wall, mono, pid, rand = parts[:4]
    if not (len(wall) == 20 and len(mono) == 20 and 1 <= len(pid) <= 10 and len(rand) == 16
            and (wall + mono + pid).isdigit() and (wall + mono + pid).isascii() and all(c in HEX for c in rand)):
        return None
    if len(parts) == 4:
        return int(wall), None, None
    tag = parts[4]
    if len(tag) < 3 or tag[0] not in LETTERS or tag[1] != "-":
        return None
    key = tag[2:]
    if key == "none":
        return int(wall), tag[0], None
    uuid = valid_uuid(key)
    if uuid is None or uuid != key:
        return None
    return int(wall), tag[0], uuid


# --- coalescing ----------------------------------------------------------------------------------
# The agent's view of a domain, as far as events decide it: 0 stopped (clean shutdown unknown),
# 1 stopped cleanly, 2 stopped uncleanly, 3 running. The plan follows the state from each of the
# four states the agent may hold when it reads the first pending event, all at once.

_INITS = (0, 1, 2, 3)


def _step(letter, states):
    if letter in "SC":
        return (3, 3, 3, 3)
    if letter == "X":
        return (1, 1, 1, 1)
    if letter == "P":
        return tuple(2 if s == 3 else s for s in states)
    return states


def _fires(letter, states):
    """The effects an event has from `states`: a frozenset of (effect, initial state index)."""
    if letter == "P":
        return frozenset(("full", i) for i, s in enumerate(states) if s == 3)
    if letter in "SCM":
        return frozenset((letter, i) for i in range(len(states)))
    return frozenset()


def _plan_domain(letters):
    """Indexes (into `letters`, one domain's events oldest first) that can be removed."""
    n = len(letters)
    before = [_INITS]
    for x in letters:
        before.append(_step(x, before[-1]))
    kept = [n - 1]                      # newest first; the domain's newest event is always kept
    carried = set(_fires(letters[n - 1], before[n - 1]))
    drop = []
    for i in range(n - 2, -1, -1):
        x = letters[i]
        if not _fires(x, before[i]) <= carried or not _same_after(before[i], x, kept, letters):
            kept.append(i)
            carried |= _fires(x, before[i])
        else:
            drop.append(i)
    return drop


def _same_after(states, letter, kept, letters):
    """Removing `letter` (applied to `states`) leaves every later kept P and the end state alone."""
    a, b = _step(letter, states), states
    for j in reversed(kept):            # the later kept events, oldest first
        if a == b:
            return True
        if letters[j] == "P" and tuple(s == 3 for s in a) != tuple(s == 3 for s in b):
            return False
        a, b = _step(letters[j], a), _step(letters[j], b)
    return a == b


def plan_coalesce(names):
    """Spool file names -> the names that can be removed (module docstring). Pure."""
    parsed = []
    for name in names:
        p = parse_name(name)
        if p is not None:
            parsed.append((name, p))
    parsed.sort(key=lambda np: np[0])
    start = 0
    for k, (_name, (_wall, letter, _uuid)) in enumerate(parsed):
        if letter is None:
            start = k + 1               # an untagged event: it and everything before it stay
    drop = []
    by_domain: dict[str, list[tuple[str, str]]] = {}     # uuid -> (name, letter), oldest first
    for name, (_wall, letter, uuid) in parsed[start:]:
        if letter == "I" or uuid is None:
            drop.append(name)           # the agent ignores it
        else:
            by_domain.setdefault(uuid, []).append((name, letter))
    for events in by_domain.values():
        drop.extend(events[i][0] for i in _plan_domain([x for _n, x in events]))
    return sorted(drop)


def coalesce_spool(spool_dir, bound):
    """If more than `bound` events wait in `spool_dir`, remove those `plan_coalesce` allows, under
    LOCK_NAME taken without waiting. -> the number removed (0: nothing to do, or the lock is held).
    Raises OSError.

    When the essential events alone exceed the bound (very many domains), the number kept is
    written into the lock file and the next coalescing waits until bound/4 more events came, so
    the hook does not plan on every call; the agent's drain clears it."""
    try:
        names = os.listdir(spool_dir)
    except FileNotFoundError:
        return 0
    count = sum(1 for n in names if n.endswith(".json") and not n.startswith("."))
    if count <= bound:
        return 0
    import fcntl
    fd = os.open(os.path.join(spool_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0                    # the agent drains (or another hook coalesces)
        try:
            last_kept = int(os.pread(fd, 32, 0) or b"0")
        except ValueError:
            last_kept = 0
        if last_kept > bound and count <= last_kept + max(1, bound // 4):
            return 0
        names = os.listdir(spool_dir)
        removed = 0
        for name in plan_coalesce(names):
            try:
                os.unlink(os.path.join(spool_dir, name))
                removed += 1
            except FileNotFoundError:
                pass
        kept = sum(1 for n in names if n.endswith(".json") and not n.startswith(".")) - removed
        os.ftruncate(fd, 0)
        if kept > bound:
            os.pwrite(fd, b"%d" % kept, 0)
        if removed:
            dfd = os.open(spool_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return removed
    finally:
        os.close(fd)                    # releases the lock
