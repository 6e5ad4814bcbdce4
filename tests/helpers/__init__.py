"""What the tests share, one module per concern.

- ``threads``: worker threads whose exceptions fail the test (``spawn``, ``run_in_threads``);
- ``wait``: polling a condition with a deadline instead of sleeping (``wait_until``);
- ``referees``: the outside programs that judge our results (qemu-img, qemu-io, ...), one runner for
  them all, and the rule for a missing one (skip on a developer's machine, fail under ``CI=true``);
- ``nbd_peers``: NBD servers nobody here wrote (qemu-nbd, nbdkit), always stopped after the test;
- ``drivers``: registering a test-only driver for the length of one test;
- ``qcow2``, ``replication``, ``jobs``: graph builders and models of those test trees.

``tests/conftest.py`` puts ``tests/`` on ``sys.path``: import as ``from helpers.wait import wait_until``.
"""
