"""Differential chain fuzzing of ekko against a byte model of the disk (issue "No silent data loss").

plan.py   pure: a seed -> the configuration of one chain; the event kinds and EKKO_FUZZ_EVENTS;
          the guest writes of a round
diff.py   pure: where a restored image differs from the model, and what it holds instead
chain.py  drives one chain: real QEMU (tests/harness/qemu.py), the real `ekko` CLI, the events,
          and every check; collects findings instead of stopping at the first one

The driving test is tests/integration/test_chain_fuzz.py.
"""
