"""Run untrusted Python (model-written code: tool calls, HumanEval completions) in a sandboxed child process.
Usage: result = execute_code("print(1 + 1)"); then result.success is True and result.stdout == "2\\n"."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

@dataclass
class ExecResult:
    success: bool             # the code ran to the end (or exited with status 0)
    stdout: str
    stderr: str
    error: str | None = None  # "ExceptionType: message", "timed out after 5.0s", ...
    timed_out: bool = False
    memory_exceeded: bool = False
    truncated: bool = False   # stdout or stderr went over max_output_bytes

# The code runs in a fresh interpreter (`python -I`: no user site, no PYTHON* variables) in its own
# process group and a throwaway working directory. This bootstrap, run with `python -I -c`, reads the
# job {"code", limits...} as JSON from stdin, locks the process down, and only then runs the code,
# reporting how it ended on the status pipe (fd argv[1]); stdout/stderr are the code's own.
# It defends against accidents and sloppy model output, not a determined attacker: real isolation
# needs a container or VM around the whole server.
_CHILD = r'''
import builtins, io, json, os, resource, sys, traceback
status_fd = int(sys.argv[1])
sys.dont_write_bytecode = True
job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
sys.stdin = io.StringIO("")  # user code reading input() gets EOF, not our job spec

# the status has its own pipe, so nothing the code prints can forge it
def report(kind, message=None):
    try:
        os.write(status_fd, json.dumps({"kind": kind, "message": message}).encode())
        os.close(status_fd)
    except OSError:
        pass

# 1. resource limits (hard limits too, so the code cannot raise them back); RLIMIT_AS makes a runaway
# allocation raise MemoryError instead of eating the machine
mem = job["max_memory_bytes"]
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
fsize = job["max_file_bytes"]
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
cpu = int(job["timeout"]) + 2  # backstop for the parent's wall clock
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))

# 2. an audit hook (PEP 578: once installed it cannot be removed) refuses what a snippet has no business
# doing: sockets, processes, signals, deleting or renaming files, writes outside its directory, ctypes
workdir = os.path.realpath(os.getcwd())
BLOCKED_EVENTS = {
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
    "socket.gethostbyname", "socket.gethostbyaddr",
    "subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
    "os.forkpty", "os.kill", "os.killpg", "os.remove", "os.rmdir", "os.rename", "os.truncate",
    "os.chmod", "os.chown", "os.link", "os.symlink", "os.chroot",
    "shutil.rmtree", "shutil.chown", "resource.setrlimit", "resource.prlimit",
    "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function", "ctypes.cdata", "pty.spawn",
    "webbrowser.open", "urllib.Request", "http.client.connect", "ftplib.connect",
    "smtplib.connect", "poplib.connect", "imaplib.open", "telnetlib.Telnet.open",
}
def audit(event, args):
    if event in BLOCKED_EVENTS:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2]
        if isinstance(mode, str):
            writing = any(c in mode for c in "wax+")
        else:
            writing = isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        if writing:
            path = os.fsdecode(args[0])
            full = os.path.realpath(os.path.join(workdir, path))
            if full != workdir and not full.startswith(workdir + os.sep):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory is not allowed")
sys.addaudithook(audit)

# 3. the usual foot-guns raise at once, so the error says what was blocked (the hook is the real barrier)
def _disabled(name):
    def fn(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is disabled")
    return fn
import shutil, subprocess
for name in ["system", "popen", "remove", "unlink", "rmdir", "removedirs", "rename", "renames",
             "replace", "truncate", "kill", "killpg", "fork", "forkpty", "setuid", "chmod", "chown", "chroot", "execv", "execve", "execl", "execvp",
             "spawnv", "spawnl", "posix_spawn", "posix_spawnp"]:
    if hasattr(os, name):
        setattr(os, name, _disabled(f"os.{name}"))
for name in ["rmtree", "move", "chown"]:
    setattr(shutil, name, _disabled(f"shutil.{name}"))
for name in ["Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"]:
    setattr(subprocess, name, _disabled(f"subprocess.{name}"))
builtins.exit = builtins.quit = sys.exit  # the site-module versions close stdin

# 4. run
try:
    exec(compile(job["code"], "<sandbox>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except MemoryError:
    report("memory")
    os._exit(1)
except SystemExit as e:
    ok = e.code is None or e.code == 0
    report("ok" if ok else "error", None if ok else f"SystemExit: {e.code}")
    os._exit(0 if ok else 1)
except BaseException as e:
    try:
        traceback.print_exc()
    except MemoryError:
        pass
    report("error", f"{type(e).__name__}: {e}")
    os._exit(1)
sys.stdout.flush()
sys.stderr.flush()
report("ok")
os._exit(0)
'''

def _drain(stream, limit, out):
    """Read a pipe to EOF, keeping the first `limit` bytes (reading on, so the child never blocks)."""
    kept, overflow = bytearray(), False
    while chunk := stream.read1(65536):
        room = limit - len(kept)
        kept += chunk[:max(room, 0)]
        overflow = overflow or len(chunk) > room
    out["data"], out["overflow"] = bytes(kept), overflow

def execute_code(code, timeout=5.0, max_memory_bytes=256 * 1024 * 1024, max_output_bytes=64 * 1024,
                 max_file_bytes=16 * 1024 * 1024):
    """Run `code` in a locked-down child interpreter; never raises for problems in the code itself."""
    status_r, status_w = os.pipe()
    job = json.dumps({"code": code, "timeout": timeout, "max_memory_bytes": int(max_memory_bytes),
                      "max_file_bytes": int(max_file_bytes)}).encode("utf-8")
    with tempfile.TemporaryDirectory(prefix="nanochat_sandbox_") as workdir:
        # a minimal environment: the parent's variables (API keys, tokens) never reach the code
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        try:
            # a session (and process group) of its own, so that a timeout kills all that the code started
            proc = subprocess.Popen([sys.executable, "-I", "-c", _CHILD, str(status_w)], cwd=workdir, env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=(status_w,), start_new_session=True)
        finally:
            os.close(status_w)  # the child holds its own copy; ours must go so reads see EOF
        # read the pipes while the child runs: one blocked on a full pipe would never finish
        outputs = {"stdout": {}, "stderr": {}, "status": {}}
        readers = [threading.Thread(target=_drain, args=(proc.stdout, max_output_bytes, outputs["stdout"]), daemon=True),
                   threading.Thread(target=_drain, args=(proc.stderr, max_output_bytes, outputs["stderr"]), daemon=True),
                   threading.Thread(target=_drain, args=(os.fdopen(status_r, "rb"), 65536, outputs["status"]), daemon=True)]
        for t in readers:
            t.start()
        # a child that died before reading its job is reported below, from its exit status
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(job)
            proc.stdin.close()
        timed_out = False
        try:
            proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            # SIGKILL (it cannot be caught or ignored) to the whole group: anything the code started dies with
            # it. The group may have exited by itself already
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
        # a grandchild that escaped the kill could hold a pipe open: do not wait on it forever
        for t in readers:
            t.join(timeout=2.0)
        for f in (proc.stdout, proc.stderr):
            f.close()

    # the code may print any bytes: what is not UTF-8 reads as U+FFFD rather than failing the whole run
    text = {name: out.get("data", b"").decode("utf-8", errors="replace") for name, out in outputs.items()}
    truncated = outputs["stdout"].get("overflow", False) or outputs["stderr"].get("overflow", False)
    result = ExecResult(success=False, stdout=text["stdout"], stderr=text["stderr"], truncated=truncated)
    try:
        status = json.loads(text["status"])
    except ValueError:
        status = None
    if timed_out:
        result.timed_out, result.error = True, f"timed out after {timeout}s"
    elif status is None:  # it died before it could report: killed by a signal, or the bootstrap itself failed
        rc = proc.returncode
        if rc is not None and rc < 0:
            name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
            result.error = f"killed by signal {name}"
            # SIGXCPU: the CPU-time backstop fired, which only happens on a busy loop
            result.timed_out = -rc == signal.SIGXCPU
        else:
            result.error = f"the sandbox exited with status {rc} without reporting"
        if "MemoryError" in result.stderr:
            result.memory_exceeded = True
    elif status["kind"] == "ok":
        result.success = True
    elif status["kind"] == "memory":
        result.memory_exceeded, result.error = True, f"MemoryError: over the {max_memory_bytes // 2**20} MiB memory limit"
    else:
        result.error = status["message"]
    return result
