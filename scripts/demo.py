"""make demo: a throwaway QEMU on a generated qcow2, guest-like writes, a full, more writes, an
incremental, both restored and compared byte for byte, on the embedded local store."""

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import yaml  # noqa: E402

from harness.qemu import QemuDisk  # noqa: E402

MiB = 1 << 20


def ekko(cfg_path, *args):
    cmd = [sys.executable, "-m", "ekko_libvirt.cli", "-c", cfg_path, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    if p.returncode != 0:
        sys.exit(f"demo: `ekko {' '.join(args)}` failed ({p.returncode}):\n{p.stderr}")
    return p.stdout


def main() -> int:
    work = tempfile.mkdtemp(prefix="ekko-demo-", dir="/tmp")
    disk = None
    try:
        disk = QemuDisk(work, 256 * MiB).start()
        cfg = {"store": {"type": "local", "path": os.path.join(work, "store")},
               "state_dir": os.path.join(work, "state"), "run_dir": os.path.join(work, "run"),
               "targets": {"demo-vda": {"engine": "qmp", "qmp_socket": disk.qmp_socket, "node": "disk0"}}}
        cfg_path = os.path.join(work, "ekko.yaml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump(cfg, f)
        rnd = random.Random(2016)
        print(f"demo: QEMU (pid {disk.proc.pid}) runs a 256 MiB qcow2; store: {cfg['store']['path']}")
        disk.write(0, rnd.randbytes(24 * MiB))
        disk.write(64 * MiB, b"".join(b"%08d kernel: eth0 link up, 1000 Mbps\n" % i for i in range(200000)))
        expected_full = disk.snapshot()
        t = time.monotonic()
        print("  " + ekko(cfg_path, "backup", "demo-vda").strip().replace("\n", "\n  "))
        for i in range(40):
            disk.write(rnd.randrange(0, 250) * MiB, rnd.randbytes(64 * 1024))
        expected_inc = disk.snapshot()
        print("  " + ekko(cfg_path, "backup", "demo-vda").strip().replace("\n", "\n  "))
        ids = [line.split()[0] for line in ekko(cfg_path, "list").splitlines()]
        for bid, exp, fmt in ((ids[0], expected_full, "raw"), (ids[1], expected_inc, "qcow2")):
            out = os.path.join(work, f"restore-{bid}.{fmt}")
            ekko(cfg_path, "restore", bid, "--to", out)
            raw = out
            if fmt == "qcow2":
                raw = out + ".raw"
                subprocess.run(["qemu-img", "convert", "-O", "raw", out, raw], check=True)
            with open(raw, "rb") as f:
                same = f.read() == exp
            print(f"  restore {bid} -> {fmt}: {'byte-identical' if same else 'MISMATCH'} to the disk at backup time")
            if not same:
                return 1
        print("  " + ekko(cfg_path, "verify", "--deep").strip().replace("\n", "\n  "))
        print(f"demo: done in {time.monotonic() - t:.1f} s")
        return 0
    finally:
        if disk is not None:
            disk.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
