"""Mutation testing of the core modules against the unit tests (mutmut), one module at a time.

    scripts/mutate.py [MODULE ...] [--rev REV] [--jobs N]      (make mutate MODULE=segment)

Each module runs in its own scratch copy, build/mutate/<module>/, so a run neither writes into the
working tree (mutmut's mutants/ directory) nor sees files that someone edits while it runs, and two
modules can run side by side. --rev HEAD copies a commit instead of the working tree.

A module is mutated against the unit test files of MODULES below plus every tests/unit file that
imports it; mutmut then runs, for each mutant, only the tests that reached the mutated function.
Results: build/mutate/<module>/summary.json (counts) and survivors.txt (each surviving mutant's diff);
browse them with `cd build/mutate/<module> && ../../../.venv/bin/mutmut browse`.
"""

import argparse
import glob
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTMUT = os.path.join(os.path.dirname(sys.executable), "mutmut")

# module name -> (source file, unit test files that exercise it beyond importing it)
MODULES = {
    "bitmaps": ("ekko_libvirt/engine/bitmaps.py", ["test_bitmaps.py", "test_crypto.py"]),
    "segment": ("ekko_libvirt/format/segment.py", ["test_manifest_segment.py", "test_copier.py", "test_restore*.py",
                                            "test_data_path.py", "test_gc.py", "test_crypto.py"]),
    "manifest": ("ekko_libvirt/format/manifest.py", ["test_manifest_segment.py", "test_copier.py", "test_crypto.py",
                                              "test_data_path.py", "test_gc.py", "test_prune.py"]),
    "restore": ("ekko_libvirt/restore/disk.py", ["test_restore*.py"]),
    "gc": ("ekko_libvirt/lifecycle/gc.py", ["test_gc.py", "test_crypto.py"]),
    "prune": ("ekko_libvirt/lifecycle/prune.py", ["test_prune.py", "test_agent_lifecycle.py"]),
    "reader": ("ekko_libvirt/nbd/reader.py", ["test_data_path.py", "test_reader*.py"]),
    "extents": ("ekko_libvirt/nbd/extents.py", ["test_extents.py", "test_data_path.py", "test_copier.py",
                                                "test_gc.py", "test_reader*.py"]),
}


def importers(src: str, unit_dir: str) -> set[str]:
    """tests/unit files that import the module of `src` (ekko_libvirt/nbd/reader.py -> nbd.reader)."""
    dotted = src[:-3].replace("/", ".")                       # ekko_libvirt.nbd.reader
    pkg, _, name = dotted.rpartition(".")
    pat = re.compile(rf"^\s*(from {re.escape(dotted)} import|import {re.escape(dotted)}\b|"
                     rf"from {re.escape(pkg)} import .*\b{name}\b)", re.M)
    found = set()
    for path in glob.glob(os.path.join(unit_dir, "test_*.py")):
        with open(path) as f:
            if pat.search(f.read()):
                found.add(os.path.basename(path))
    return found


def test_files(module: str, unit_dir: str) -> list[str]:
    src, patterns = MODULES[module]
    names = importers(src, unit_dir)
    for p in patterns:
        names |= {os.path.basename(x) for x in glob.glob(os.path.join(unit_dir, p))}
    return sorted("tests/unit/" + n for n in names)


def prepare(module: str, rev: str | None) -> str:
    work = os.path.join(ROOT, "build", "mutate", module)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    if rev:
        archive = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", work], input=archive, check=True)
    else:   # the working tree as git sees it: tracked files and new ones that .gitignore does not exclude
        files = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               check=True, capture_output=True, text=True).stdout.split("\0")
        for rel in filter(None, files):
            if os.path.isfile(os.path.join(ROOT, rel)):        # a deleted, not yet committed file is skipped
                os.makedirs(os.path.join(work, os.path.dirname(rel)), exist_ok=True)
                shutil.copy2(os.path.join(ROOT, rel), os.path.join(work, rel))
    src, _ = MODULES[module]
    tests = test_files(module, os.path.join(work, "tests", "unit"))
    with open(os.path.join(work, "setup.cfg"), "w") as f:
        f.write("[mutmut]\n"
                "source_paths = ekko_libvirt\n"
                f"only_mutate = {src}\n"
                "also_copy =\n" + "".join(f"    {n}\n" for n in sorted(os.listdir(work))
                                           if n not in ("ekko_libvirt", "tests")) +
                "pytest_add_cli_args =\n    -p\n    no:cacheprovider\n    -q\n"
                "pytest_add_cli_args_test_selection =\n" + "".join(f"    {t}\n" for t in tests))
    return work


def results(work: str) -> dict:
    out = subprocess.run([MUTMUT, "results", "--all", "true"], cwd=work, capture_output=True, text=True).stdout
    status = {}
    for line in out.splitlines():
        name, sep, st = line.strip().rpartition(": ")
        if sep:
            status[name] = st
    return status


# One process for all the diffs: `mutmut show` per mutant costs seconds each (imports, re-parsing).
_DIFFS = """
import sys
from mutmut.mutation.diff_apply import find_mutant, get_diff_for_mutant
names = sys.stdin.read().split()
path = find_mutant(names[0]).path if names else None
for name in names:
    print("# " + name + ": survived")
    print(get_diff_for_mutant(name, path=path).rstrip())
    print()
"""


def collect(module: str, work: str, seconds: int, returncode: int, rev: str | None) -> dict:
    """Counts and survivors of the mutmut run in `work` -> summary.json, survivors.txt."""
    status = results(work)
    counts: dict = {}
    for st in status.values():
        counts[st] = counts.get(st, 0) + 1
    # "timeout", "segfault", "suspicious": the mutant hung or crashed its test process (an endless
    # loop filling memory): killed, and counted together in the report's "timeout/crash".
    # "no tests": no unit test reaches the mutated function; listed by name in summary.json.
    survivors = sorted(n for n, st in status.items() if st == "survived")
    untested = sorted(n for n, st in status.items() if st == "no tests")
    with open(os.path.join(work, "survivors.txt"), "w") as f:
        subprocess.run([sys.executable, "-c", _DIFFS], cwd=work, input="\n".join(survivors), text=True,
                       stdout=f, check=True)
    summary = {"module": module, "source": MODULES[module][0], "mutants": len(status), "counts": counts,
               "seconds": seconds, "exit": returncode, "rev": rev or "working tree",
               "tests": test_files(module, os.path.join(work, "tests", "unit")), "no_tests": untested}
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _limit_memory(gib: float):
    """RLIMIT_DATA for mutmut and every test process it forks: a mutant that loops appending to a
    list (split_reads with `length` never decreasing) otherwise grows until mutmut's timeout, 19 GB
    on the shared machine; with the limit its test fails with MemoryError, and the mutant is killed."""
    def apply():
        n = int(gib * (1 << 30))
        resource.setrlimit(resource.RLIMIT_DATA, (n, n))
    return apply


def run(module: str, rev: str | None, jobs: int, max_memory: float) -> dict:
    work = prepare(module, rev)
    started = time.monotonic()
    with open(os.path.join(work, "mutmut.log"), "w") as log:
        p = subprocess.run([MUTMUT, "run", "--max-children", str(jobs)], cwd=work, stdout=log, stderr=subprocess.STDOUT,
                           preexec_fn=_limit_memory(max_memory))
    return collect(module, work, round(time.monotonic() - started), p.returncode, source_label(rev))


def source_label(rev: str | None) -> str:
    """What was mutated, as a commit: "1a2b3c4" for --rev, "1a2b3c4+" for the working tree on it
    (HEAD moves while other work is committed; the label says which code a run saw)."""
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", rev or "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    return head if rev else head + "+"


def score(killed: int, survived: int) -> str:
    """The mutation score: killed / (killed + survived); timeouts and "no tests" count in neither."""
    return f"{100 * killed / (killed + survived):.1f}%" if killed + survived else "-"


def _function(name: str) -> str:
    """mutmut's mutant name -> the function: x_func__mutmut_3 -> func, x__private__mutmut_3 -> _private,
    xǁClassǁmethod__mutmut_3 -> Class.method (xǁClassǁ__init____mutmut_3 -> Class.__init__)."""
    func = re.sub(r"^x(ǁ[^ǁ]+ǁ|_)", "", name.rsplit("__mutmut_", 1)[0])
    cls = re.match(r"^xǁ([^ǁ]+)ǁ", name)
    return f"{cls.group(1)}.{func}" if cls else func


def report(modules) -> str:
    """The last run of each module as markdown: a table of counts and scores with a total row, then
    each survivor as `function#n: - old line / + new line` (what the tests let through)."""
    rows = ["| module | mutants | killed | survived | timeout/crash | no tests | score | run (s) | source |",
            "|---|---|---|---|---|---|---|---|---|"]
    details = []
    total = dict.fromkeys(("mutants", "killed", "survived", "timeout", "no tests", "seconds"), 0)
    for module in modules:
        work = os.path.join(ROOT, "build", "mutate", module)
        try:
            with open(os.path.join(work, "summary.json")) as f:
                s = json.load(f)
        except FileNotFoundError:
            continue
        c = s["counts"]
        row = {"mutants": s["mutants"], "seconds": s["seconds"],
               **{k: c.get(k, 0) for k in ("killed", "survived", "no tests")},
               "timeout": s["mutants"] - sum(c.get(k, 0) for k in ("killed", "survived", "no tests"))}
        for k, v in row.items():
            total[k] += v
        rows.append(f"| {module} | {row['mutants']} | {row['killed']} | {row['survived']} | {row['timeout']} | "
                    f"{row['no tests']} | {score(row['killed'], row['survived'])} | {row['seconds']} | "
                    f"{s['rev']} |")
        with open(os.path.join(work, "survivors.txt")) as f:
            text = f.read()
        details.append(f"\n### {module}\n")
        for block in filter(None, text.split("\n\n")):
            head = block.splitlines()[0]                    # "# ekko_libvirt.x.x_func__mutmut_7: survived"
            name = head[2:].split(":")[0].rsplit(".", 1)[-1]
            func = _function(name)
            changed = [ln for ln in block.splitlines()[1:] if ln[:1] in "-+" and ln[:3] not in ("---", "+++")]
            details.append(f"- `{func}#{name.rsplit('_', 1)[-1]}`: " + " / ".join(
                f"`{ln[0]} {ln[1:].strip()}`" for ln in changed))
        untested: dict = {}
        for name in s.get("no_tests", []):
            f = _function(name.rsplit(".", 1)[-1])
            untested[f] = untested.get(f, 0) + 1
        if untested:
            details.append("- no tests: " + ", ".join(f"`{f}` {n}" for f, n in untested.items()))
    if len(rows) > 3:
        t = total
        rows.append(f"| **total** | {t['mutants']} | {t['killed']} | {t['survived']} | {t['timeout']} | "
                    f"{t['no tests']} | {score(t['killed'], t['survived'])} | {t['seconds']} | |")
    return "\n".join(rows + details) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    ap.add_argument("--rev", help="mutate this commit (git archive) instead of the working tree")
    ap.add_argument("--jobs", type=int, default=1, help="mutants tested at once (default 1)")
    ap.add_argument("--max-memory", type=float, default=4, metavar="GIB",
                    help="data size limit of mutmut and each test process, GiB (default 4)")
    ap.add_argument("--report", action="store_true", help="print the last runs' results as markdown, run nothing")
    a = ap.parse_args()
    bad = [m for m in a.modules if m not in MODULES]
    if bad:
        ap.error(f"unknown module(s) {bad}; known: {', '.join(MODULES)}")
    if a.report:
        sys.stdout.write(report(a.modules or list(MODULES)))
        return 0
    rc = 0
    for module in a.modules or list(MODULES):
        s = run(module, a.rev, a.jobs, a.max_memory)
        c = s["counts"]
        print(f"{module:9} {s['mutants']:4} mutants: killed {c.get('killed', 0)}, survived {c.get('survived', 0)}, "
              f"timeout {c.get('timeout', 0)}, no tests {c.get('no tests', 0)}"
              + "".join(f", {k} {v}" for k, v in c.items()
                        if k not in ("killed", "survived", "timeout", "no tests"))
              + f"  ({s['seconds']} s; survivors in build/mutate/{module}/survivors.txt)", flush=True)
        if s["exit"] != 0 or not s["mutants"]:
            print(f"{module}: mutmut exited {s['exit']}, see build/mutate/{module}/mutmut.log", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
