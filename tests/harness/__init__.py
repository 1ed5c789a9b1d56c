"""Real components for the tests: QEMU, libvirtd, Swift, each started and stopped by PID."""
