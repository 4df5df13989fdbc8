"""The sandbox as a tool: untrusted code runs, its output and errors are captured, and it cannot
hang or hog memory. What it cannot escape to is tested in test_sandbox_escape.py."""
import time

import pytest

from nanochat.execution import execute_code

def test_runs_code_and_captures_stdout_and_stderr():
    r = execute_code("import sys\nprint('hello', 6 * 7)\nprint('warn', file=sys.stderr)\nprint('héllo ✓')")
    assert r.success and r.error is None
    assert r.stdout == "hello 42\nhéllo ✓\n"
    assert r.stderr == "warn\n"

def test_exception_is_reported_not_raised():
    r = execute_code("def f():\n    return 1 / 0\nf()")
    assert not r.success and not r.timed_out and not r.memory_exceeded
    assert r.error == "ZeroDivisionError: division by zero"
    assert "Traceback" in r.stderr and "line 2" in r.stderr

def test_humaneval_style_assertions():
    program = "def add(a, b):\n    return a + b\n\ndef check(f):\n    assert f(2, 3) == 5\n\ncheck(add)\n"
    assert execute_code(program).success
    failing = execute_code(program.replace("a + b", "a - b"))
    assert not failing.success and failing.error.startswith("AssertionError")

def test_sys_exit_status():
    assert execute_code("import sys\nprint('x')\nsys.exit(0)").success
    r = execute_code("exit(3)")
    assert not r.success and r.error == "SystemExit: 3"

def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = execute_code("while True:\n    pass", timeout=1.0)
    assert time.monotonic() - t0 < 5.0
    assert r.timed_out and not r.success

def test_sleeping_child_process_group_is_killed():
    # a blocking call that burns no CPU: only the wall clock catches it
    r = execute_code("import time\nprint('started', flush=True)\ntime.sleep(60)", timeout=1.0)
    assert r.timed_out and r.stdout == "started\n"

@pytest.mark.parametrize("code", ["x = 'a' * (4 * 1024**3)",
                                  "chunks = []\nwhile True:\n    chunks.append(bytearray(10**6))"])
def test_memory_bomb_hits_the_limit(code):
    r = execute_code(code, timeout=10.0, max_memory_bytes=256 * 1024**2)
    assert r.memory_exceeded and not r.success and not r.timed_out

def test_scratch_files_inside_its_own_directory_are_fine():
    # the escapes (network, processes, files outside, signals, /proc) are in test_sandbox_escape.py
    r = execute_code("import os\nprint(os.listdir('.'))\nopen('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())")
    assert r.success and r.stdout == "[]\nok\n"

def test_error_line_survives_a_flood_of_output():
    # the error comes from the end of stderr, past what max_output_bytes keeps
    r = execute_code("import sys\nsys.stderr.write('x' * 100000)\nraise KeyError('late')", max_output_bytes=1000)
    assert not r.success and r.truncated and r.error == "KeyError: 'late'"

def test_output_is_size_limited():
    r = execute_code("print('x' * 10**7)", max_output_bytes=1000)
    assert r.success and r.truncated and len(r.stdout) == 1000

def test_stdlib_and_site_packages_import():
    r = execute_code("import math, json, collections, numpy\nprint(math.comb(5, 2), int(numpy.arange(4).sum()))")
    assert r.success, r.stderr
    assert r.stdout == "10 6\n"

def test_environment_is_not_leaked(monkeypatch):
    monkeypatch.setenv("NANOCHAT_SECRET_TOKEN", "hunter2")
    r = execute_code("import os\nprint(os.environ.get('NANOCHAT_SECRET_TOKEN'))")
    assert r.stdout == "None\n"
