"""The rules the suite enforces on itself: a missing referee skips on a developer's machine and fails
under CI=true; an exception in a worker thread fails the test, even one nobody joined."""
import os
import subprocess
import sys
import textwrap

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


def run_pytest(tmp_path, body, ci):
    # the suite's own conftest (hooks and fixtures), loaded under another name into the inner one
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.insert(0, {TESTS!r})
        spec = importlib.util.spec_from_file_location("suite_conftest", {TESTS!r} + "/conftest.py")
        suite = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(suite)
        globals().update({{k: v for k, v in vars(suite).items() if not k.startswith("__")}})
    """))
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           "-W", "error::pytest.PytestUnhandledThreadExceptionWarning", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


MISSING = """
    from helpers.referees import needs, qimg

    @needs("pyrep-no-such-referee")
    def test_marked():
        pass

    def test_called():
        from helpers.referees import run
        run("pyrep-no-such-referee", "--version")
"""


@pytest.mark.parametrize("ci", [False, True])
def test_a_missing_referee_skips_here_and_fails_under_ci(tmp_path, ci):
    p = run_pytest(tmp_path, MISSING, ci)
    out = p.stdout + p.stderr
    if ci:
        assert p.returncode == 1 and "1 failed, 1 error" in out, out      # in setup (marker), in the test (runner)
        assert "CI=true: referee(s) not installed: pyrep-no-such-referee" in out
    else:
        assert p.returncode == 0 and "2 skipped" in out, out


def test_a_failing_worker_fails_its_test(tmp_path):
    p = run_pytest(tmp_path, """
        from helpers.threads import spawn

        def test_forgotten_worker():
            spawn(lambda: 1 / 0)            # never joined: conftest reaps it and fails the test
    """, ci=False)
    out = p.stdout + p.stderr
    assert p.returncode == 1 and "ZeroDivisionError" in out and "1 error" in out, out


def test_the_project_config_turns_thread_exceptions_into_errors(tmp_path):
    """pyproject's filterwarnings makes pytest's unhandled-thread warning an error: a plain thread
    that raises fails the test that started it (run here with the project's own configuration)."""
    try:
        import tomllib
    except ImportError:                 # Python 3.10
        import tomli as tomllib
    root = os.path.dirname(TESTS)
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        ini = tomllib.load(f)["tool"]["pytest"]["ini_options"]
    assert "error::pytest.PytestUnhandledThreadExceptionWarning" in ini["filterwarnings"]
    (tmp_path / "test_plain.py").write_text(textwrap.dedent("""
        import threading

        def test_plain_thread():
            t = threading.Thread(target=lambda: 1 / 0)
            t.start()
            t.join()
    """))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                        os.path.join(root, "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 1 and "ZeroDivisionError" in out, out
