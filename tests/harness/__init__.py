"""Real components for the tests: QEMU, libvirtd, Swift, each started and stopped by PID."""

import os


def in_ci(environ=None) -> bool:
    """CI=true (or 1, yes): a missing real component fails the run instead of skipping it."""
    env = os.environ if environ is None else environ
    return env.get("CI", "").strip().lower() in ("1", "true", "yes")
