"""No acknowledged write is lost when the process ends without close(): a normal exit, SIGTERM and SIGINT
in a program that called handle_exit_signals(). Each case runs in a subprocess; qemu-io and qemu-img
check are the judges."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

WRITER = textwrap.dedent("""
    import sys, time
    import pyrep
    path, how = sys.argv[1], sys.argv[2]
    if how != "plain":
        pyrep.handle_exit_signals()
    pyrep.create_image(path, "qcow2", "16M")
    blk = pyrep.open_backend(path)                      # never closed
    for i in range(8):                                  # allocating writes: L2 and refcount updates cached
        blk.pwrite(i * 1048576, bytes([0xa0 + i]) * 65536)
    node = pyrep.blockdev_add({"driver": "qcow2", "file.filename": path + ".2", "node-name": "n2"}) \\
        if how == "plain" and pyrep.create_image(path + ".2", "qcow2", "16M") is None else None
    if node is not None:
        node.pwrite(0, b"\\xee" * 65536)                  # a node without a backend: closed at exit too
    print("ready", flush=True)
    if how != "plain":
        # the test's signal ends this; short sleeps, as the signal may be delivered to another thread,
        # which does not interrupt the main thread's sleep (the handler runs when it returns)
        for _ in range(600):
            time.sleep(0.1)
        print("not interrupted", flush=True)
""")


def run_writer(tmp_path, how):
    path = str(tmp_path / "a.qcow2")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, path, how], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        if how != "plain":
            proc.send_signal(getattr(signal, how))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return path, proc.returncode, out, err


def judge(path, pattern):
    for i in range(8):
        r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -P {0xa0 + i:#x} {i}M 64k", path],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    r = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_normal_exit_without_close_keeps_every_write(tmp_path):
    path, rc, out, err = run_writer(tmp_path, "plain")
    assert rc == 0, err
    judge(path, 0xa0)
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0xee 0 64k", path + ".2"],
                       capture_output=True, text=True)
    assert "Pattern verification failed" not in r.stdout and r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_signal_in_a_console_script_keeps_every_write(tmp_path, how):
    path, rc, out, err = run_writer(tmp_path, how)
    assert rc == 128 + getattr(signal, how), err
    assert "not interrupted" not in out and "Traceback" not in err
    judge(path, 0xa0)


def test_pyrep_demo_handles_exit_signals():
    import pyrep.tools.demo as demo
    import inspect
    assert "handle_exit_signals()" in inspect.getsource(demo.main)
