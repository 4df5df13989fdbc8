"""
Escapes from the sandbox (nanochat/execution.py), tried for real: each snippet is what an attacker
(or a careless model) would write, and each test checks the *effect* did not happen (no marker file,
no connection, the parent alive, the secret unread), not just that some error was raised.

The sandbox's parent is a driver process started under an outer `prlimit`, so a regression that
lets the code out still cannot fork-bomb or fill this machine, and a killed parent shows up as the
driver's exit status. CI runs this as root (as here), which is the hardest case: root must be
dropped to nobody or to no capabilities before the code runs.
"""
import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanochat.execution import ExecResult, sandbox_layers

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="the sandbox's kernel walls are Linux's"),
              pytest.mark.skipif(not shutil.which("prlimit"), reason="the outer guard needs prlimit (util-linux)")]
# asked of the kernel here, not of the sandbox: a sandbox that stopped using Landlock fails, it does not skip
LANDLOCK_ABI = max(0, ctypes.CDLL(None).syscall(444, None, 0, 1)) if sys.platform == "linux" else 0
needs_landlock = pytest.mark.skipif(not LANDLOCK_ABI, reason="this kernel has no Landlock: only file permissions guard "
                                    "reads and writes (see the README's sandbox table)")

DRIVER = """import json, sys
from nanochat.execution import execute_code
jobs = json.loads(sys.stdin.read())
print(json.dumps([execute_code(code, timeout=timeout).__dict__ for code, timeout in jobs]))"""

def escape(*codes, timeout=5.0):
    """execute_code(code) for each code, in a driver under an outer prlimit; the ExecResults."""
    env = dict(os.environ, NANOCHAT_SECRET="hunter2-in-the-parent")
    limits = ["--as=8589934592", "--cpu=120", "--nofile=512", f"--fsize={64 * 2**20}"]
    out = subprocess.run(["prlimit", *limits, sys.executable, "-c", DRIVER], cwd=REPO, env=env, capture_output=True,
                         text=True, input=json.dumps([(c, timeout) for c in codes]), timeout=60 + 10 * len(codes))
    assert out.returncode == 0, f"the sandbox's parent died (status {out.returncode}): {out.stderr[-2000:]}"
    return [ExecResult(**r) for r in json.loads(out.stdout)]

@pytest.fixture
def outside(tmp_path):
    """A world-writable directory outside the sandbox, holding a victim file: only the kernel walls guard it."""
    tmp_path.chmod(0o777)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    victim.chmod(0o666)
    return tmp_path

def assert_untouched(outside, before):
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    victim = outside / "victim.txt"
    after = victim.stat()  # atime aside: reading the file here changes it
    assert victim.read_text() == "precious" and (after.st_mode, after.st_size, after.st_mtime_ns) == before

def test_this_machine_gives_every_layer():
    layers = sandbox_layers()
    assert {"rlimits", "session", "no_new_privs", "seccomp"} <= set(layers), layers
    assert LANDLOCK_ABI == 0 or f"landlock{LANDLOCK_ABI}" in layers, layers
    if os.geteuid() == 0:
        assert "namespaces" in layers and ("nobody" in layers or "no_capabilities" in layers), layers

# -----------------------------------------------------------------------------
# Row 1 and 5 of the issue, and every other way to start a process

def spawners(marker):
    shell = f"echo pwned; id > {marker}"
    return [
        # row 1: the call under subprocess, which no audit hook sees
        "import _posixsubprocess, os\nr, w = os.pipe()\n"
        f"_posixsubprocess.fork_exec([b'/bin/sh', b'-c', {shell.encode()!r}], [b'/bin/sh'], True, (), None, None, "
        "-1, -1, -1, -1, -1, -1, r, w, False, True, -1, None, None, None, -1, None, False)\nimport time; time.sleep(1)",
        f"import os\nos.system({shell!r})",
        f"import os\nos.execv('/bin/sh', ['sh', '-c', {shell!r}])",
        f"import os\nos.posix_spawn('/bin/sh', ['sh', '-c', {shell!r}], {{}})",
        f"import subprocess\nsubprocess.run(['/bin/sh', '-c', {shell!r}])",
        f"import os\nif os.fork() == 0:\n    open({str(marker)!r}, 'w').write('child')\n    os._exit(0)",
        f"import multiprocessing as mp\np = mp.Process(target=print, args=('pwned',))\np.start()\np.join()",
        f"import pty\npty.spawn(['/bin/sh', '-c', {shell!r}])",
        f"import ctypes\nctypes.CDLL(None).system({shell.encode()!r})",
        f"import ctypes\nlibc = ctypes.CDLL(None)\nif libc.syscall(57) == 0:\n    open({str(marker)!r}, 'w').write('raw fork')\n    libc._exit(0)",
    ]

def test_no_process_can_be_started(outside):
    marker = outside / "pwned"
    for code, r in zip(spawners(marker), escape(*spawners(marker))):
        assert "pwned" not in r.stdout and not marker.exists(), code

def test_no_grandchild_outlives_the_timeout(outside):
    # row 5: a setsid grandchild once wrote its file 3 s after the timeout
    marker = outside / "late"
    late = f"import time; time.sleep(2); open({str(marker)!r}, 'w').write('alive')"
    code = ("import os, sys, time, _posixsubprocess\nr, w = os.pipe()\n"
            f"try:\n    _posixsubprocess.fork_exec([sys.executable.encode(), b'-c', {late.encode()!r}], [sys.executable.encode()], "
            "True, (), None, None, -1, -1, -1, -1, -1, -1, r, w, False, True, -1, None, None, None, -1, None, False)\n"
            "except OSError: pass\n"
            f"try:\n    if os.fork() == 0:\n        os.setsid()\n        exec({late!r})\nexcept OSError: pass\n"
            "time.sleep(60)")
    [r] = escape(code, timeout=1.0)
    assert r.timed_out
    time.sleep(3)
    assert not marker.exists(), "a process the code started outlived the timeout"

# -----------------------------------------------------------------------------
# Row 2: signals to the parent (or anything else)

def test_the_parent_cannot_be_killed():
    results = escape(
        "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)",
        "import os\nos.kill(os.getppid(), 9)",
        "import os\nos.killpg(os.getpgid(os.getppid()), 9)",
        "import os, ctypes\nassert ctypes.CDLL(None).kill(os.getppid(), 9) == 0",
        "import os, ctypes\nassert ctypes.CDLL(None).syscall(234, os.getppid(), os.getppid(), 9) == 0",  # tgkill
        "import os\nos.kill(1, 0)",  # even probing init
    )
    assert not any(r.success for r in results)  # and escape() saw its driver, the parent, survive

# -----------------------------------------------------------------------------
# Row 3: writing outside its directory, every way

@needs_landlock
def test_nothing_outside_can_be_written(outside):
    victim = outside / "victim.txt"
    before = (victim.stat().st_mode, victim.stat().st_size, victim.stat().st_mtime_ns)
    d = str(outside)
    codes = [
        f"import os\nos.chdir({d!r})\nopen('x', 'w').write('p')",
        f"import os\nfd = os.open({d!r}, os.O_RDONLY)\nos.write(os.open('y', os.O_WRONLY | os.O_CREAT, dir_fd=fd), b'p')",
        f"import sqlite3\nsqlite3.connect({d + '/db.sqlite'!r}).execute('create table t (x)')",
        f"import os\nos.mkdir({d + '/newdir'!r})",
        f"import os\nos.mkfifo({d + '/fifo'!r})",
        f"import os\nos.symlink('/etc/passwd', {d + '/link'!r})",
        f"import os\nos.link({str(victim)!r}, 'hardlink')",
        f"import os\nos.utime({str(victim)!r}, (0, 0))",
        f"import os\nos.chmod({str(victim)!r}, 0o600)",
        f"import os\nos.truncate({str(victim)!r}, 0)",
        f"open({str(victim)!r}, 'r+').truncate(0)",
        f"open({str(victim)!r}, 'a').write('more')",
        f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
        f"import os\nos.remove({str(victim)!r})",
        f"import shutil\nshutil.rmtree({d!r})",
        "open('/tmp/nanochat_sandbox_escape_marker', 'w').write('p')",
    ]
    for code, r in zip(codes, escape(*codes)):
        assert not r.success, code
    assert_untouched(outside, before)
    assert not os.path.exists("/tmp/nanochat_sandbox_escape_marker")

def test_its_own_directory_is_bounded():
    if "namespaces" not in sandbox_layers():
        pytest.skip("the working dir is a size- and inode-limited tmpfs only when the sandbox runs as root")
    [r] = escape("import os\nn = 0\ntry:\n    while n < 100000:\n        open(f'f{n}', 'w').close()\n        n += 1\n"
                 "finally:\n    print(n)")
    assert not r.success and int(r.stdout) < 1000  # the tmpfs has 256 inodes

# -----------------------------------------------------------------------------
# Row 4: the parent's secrets

@needs_landlock
def test_the_parents_secrets_cannot_be_read():
    code = ("import os\nppid = os.getppid()\nread = []\n"
            "for name in ['environ', 'mem', 'cmdline', 'maps', 'status', 'cwd/README.md', 'root/etc/hostname']:\n"
            "    try:\n        with open(f'/proc/{ppid}/{name}', 'rb') as f:\n            read.append((name, f.read(4096)))\n"
            "    except OSError:\n        pass\n"
            "print(read)\nprint(os.environ.get('NANOCHAT_SECRET'))")
    [r] = escape(code)
    assert "hunter2" not in r.stdout and r.stdout.splitlines() == ["[]", "None"], r.stdout + r.stderr

@needs_landlock
def test_files_of_the_repo_and_home_cannot_be_read():
    codes = [f"print(open({str(REPO / 'README.md')!r}).read(100))", "import os\nprint(os.listdir(os.path.expanduser('~root')))"]
    for code, r in zip(codes, escape(*codes)):
        assert not r.success and not r.stdout, code

# -----------------------------------------------------------------------------
# The network

def test_no_connection_leaves_the_sandbox():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        codes = [f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
                 f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'x', ('127.0.0.1', {port}))",
                 "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('/run/systemd/private')",
                 f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)",
                 "import ctypes\nassert ctypes.CDLL(None).syscall(41, 2, 1, 0) >= 0"]  # raw socket(AF_INET, SOCK_STREAM)
        results = escape(*codes)
        with pytest.raises(BlockingIOError):
            listener.accept()
    for code, r in zip(codes, results):
        assert not r.success, code

# -----------------------------------------------------------------------------
# Row 8: the verdict cannot be forged

def test_a_forged_status_does_not_pass_failing_code():
    # an "ok" on every descriptor that might be a status pipe, then closed, so no later report can follow it
    forge = ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'{\"kind\": \"ok\", \"message\": null}')\n"
             "        os.close(fd)\n    except OSError:\n        pass\n")
    failing, passing = escape(forge + "assert 0, 'the tests failed'", forge + "print('fine')")
    assert not failing.success and failing.error == "AssertionError: the tests failed"
    assert passing.success
