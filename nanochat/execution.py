"""Run untrusted Python (model-written code: tool calls, HumanEval completions) in a sandboxed child process.
Usage: result = execute_code("print(1 + 1)"); then result.success is True and result.stdout == "2\\n".
`python -m nanochat.execution` prints which of the kernel's isolation layers this machine gives the sandbox.

Python cannot contain Python (an audit hook is one `import _posixsubprocess` away from a shell), so
the walls are the kernel's, raised in the child before the code runs (README: "Model-written code"):
  - everywhere: rlimits (memory, CPU time, file size, open files, no core), its own session (killed
    whole on timeout), a fresh empty working dir, no environment secrets
  - Linux, as root: network, IPC and mount namespaces (the working dir a small tmpfs), then uid nobody,
    or uid 0 without capabilities where nobody cannot read Python (a pyenv under /root)
  - Linux: no_new_privs; Landlock (kernel >= 5.13): reads only system and Python dirs, writes only its
    own dir, no exec, no TCP (>= 6.7), no signals out (>= 6.12); seccomp (x86_64, aarch64): no fork,
    exec, sockets or ptrace, signals only to itself, no chmod/chown/utime/xattr/mount/bpf/io_uring/keyctl
Elsewhere (macOS) only the first line holds: run untrusted code in a VM or container there. Success is
the exit status (0), never what the code prints, so it cannot forge a pass (sys.exit(0) still counts)."""
import contextlib
import ctypes
import io
import json
import os
import platform
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

@dataclass
class ExecResult:
    success: bool             # the code ran to the end (or exited with status 0)
    stdout: str
    stderr: str
    error: str | None = None  # "ExceptionType: message", "timed out after 5.0s", ...
    timed_out: bool = False
    memory_exceeded: bool = False
    truncated: bool = False   # stdout or stderr went over max_output_bytes

NOBODY, MEMORY_ERROR_STATUS = 65534, 3
# the syscalls seccomp denies, as "name x86_64 aarch64" ("-": not on that architecture)
_DENIED = """fork 57 -  vfork 58 -  execve 59 221  execveat 322 281  clone3 435 435  socket 41 198
socketpair 53 199  ptrace 101 117  process_vm_readv 310 270  process_vm_writev 311 271  pidfd_open 434 434
pidfd_send_signal 424 424  pidfd_getfd 438 438  unshare 272 97  setns 308 268  mount 165 40  umount2 166 39
chroot 161 51  pivot_root 155 41  open_tree 428 428  move_mount 429 429  fsopen 430 430  fsmount 432 432
bpf 321 280  perf_event_open 298 241  io_uring_setup 425 425  keyctl 250 219  add_key 248 217
request_key 249 218  userfaultfd 323 282  chmod 90 -  fchmod 91 52  fchmodat 268 53  fchmodat2 452 452
chown 92 -  fchown 93 55  lchown 94 -  fchownat 260 54  utime 132 -  utimes 235 -  utimensat 280 88
futimesat 261 -  setxattr 188 5  lsetxattr 189 6  fsetxattr 190 7  removexattr 197 14  lremovexattr 198 15
fremovexattr 199 16  mknod 133 -  mknodat 259 33""".split()
# per architecture: its AUDIT_ARCH, clone, and the signal calls (kill, tkill, tgkill, rt_(tg)sigqueueinfo)
_ARCH = {"x86_64": (0xC000003E, 56, (62, 200, 234, 129, 297)), "aarch64": (0xC00000B7, 220, (129, 130, 131, 138, 240))}

def _seccomp_program(arch, pid):
    """A classic-BPF seccomp filter for `arch`, as (code, jt, jf, k) tuples."""
    LD, JEQ, JSET, JGE, RET = 0x20, 0x15, 0x45, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JSET/JGE|K, BPF_RET|K
    ALLOW, EPERM, ENOSYS, KILL = 0x7FFF0000, 0x00050001, 0x00050026, 0x80000000
    audit_arch, clone, signal_calls = _ARCH[arch]
    column = 1 if arch == "x86_64" else 2
    denied = [int(_DENIED[i + column]) for i in range(0, len(_DENIED), 3) if _DENIED[i + column] != "-"]
    # another architecture's numbering (x86's i386 entry point) would bypass the table: kill the process
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, audit_arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]
    if arch == "x86_64":
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, EPERM)]  # the x32 ABI's numbers
    # clone3 gets ENOSYS so that glibc falls back to clone, whose flags (args[0]) a filter can read
    prog += [(JEQ, 0, 1, 435), (RET, 0, 0, ENOSYS)]
    prog += [(JEQ, 0, 4, clone), (LD, 0, 0, 16), (JSET, 0, 1, 0x10000), (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]
    for nr in signal_calls:  # signals: only to itself (args[0] is the target pid or tgid)
        prog += [(JEQ, 0, 4, nr), (LD, 0, 0, 16), (JEQ, 0, 1, pid), (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]
    for nr in denied:
        prog += [(JEQ, 0, 1, nr), (RET, 0, 0, EPERM)]
    return prog + [(RET, 0, 0, ALLOW)]

def _landlock(libc, workdir):
    """Confine the filesystem, TCP and signals with Landlock; returns its ABI version (0: not available)."""
    abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return 0
    fs = (1 << {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)) - 1  # every filesystem right this ABI knows
    attr = struct.pack("QQQ", fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)[:8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = libc.syscall(444, attr, len(attr), 0)
    READ, FILE_RIGHTS = (1 << 2) | (1 << 3), (1 << 1) | (1 << 2) | (1 << 14) | (1 << 15)
    WRITE = READ | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 7) | (1 << 8) | (1 << 14)  # files and dirs; no fifo/dev/sock
    # not the user's home, /tmp, /proc (the parent's environ and memory) or /sys; the venv is under sys.prefix
    rules = [(p, READ) for p in ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc", sys.prefix, sys.base_prefix)]
    for path, access in rules + [(workdir, WRITE), ("/dev/null", (1 << 1) | (1 << 2))]:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            access &= fs if os.path.isdir(path) else fs & FILE_RIGHTS
            libc.syscall(445, ruleset, 1, struct.pack("=Qi", access, fd), 0)  # LANDLOCK_RULE_PATH_BENEATH
            os.close(fd)
    return abi if libc.syscall(446, ruleset, 0) == 0 else 0  # landlock_restrict_self

def _sandbox_uid():
    """As root, the child's uid: nobody, or 0 (without capabilities) where nobody cannot read Python; else None."""
    if os.geteuid() != 0:
        return None
    # nobody needs o+x on every directory down to the stdlib and the venv, and o+r on them
    paths = [os.path.realpath(p) for p in (os.path.dirname(os.__file__), sys.prefix)]
    readable = all(os.stat(d).st_mode & 0o001 for p in paths for d in [p, *Path(p).parents]) and \
        all(os.stat(p).st_mode & 0o004 for p in paths)
    return NOBODY if readable else 0

def _lock_down(job):
    """Raise every wall this kernel offers around this process; returns the names of those raised."""
    for limit, value in [(resource.RLIMIT_AS, job["max_memory_bytes"]), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_FSIZE, job["max_file_bytes"]), (resource.RLIMIT_NOFILE, 64),
                         (resource.RLIMIT_CPU, int(job["timeout"]) + 2)]:  # CPU: a backstop for the wall clock
        resource.setrlimit(limit, (value, value))  # the hard limit too, so the code cannot raise it back
    layers = ["rlimits", "session"]
    if sys.platform != "linux":
        return layers
    libc, workdir = ctypes.CDLL(None, use_errno=True), os.getcwd()
    if (uid := _sandbox_uid()) is not None:
        # CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWNS; mount propagation private, so the tmpfs stays ours
        if libc.unshare(0x40000000 | 0x08000000 | 0x00020000) == 0 and libc.mount(b"none", b"/", None, 0x44000, None) == 0:
            opts = f"size={job['max_file_bytes']},nr_inodes=256,mode=0700,uid={uid},gid={uid}".encode()
            if libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", 0x6, opts) == 0:  # MS_NOSUID | MS_NODEV
                os.chdir(workdir)  # into the new mount
                layers.append("namespaces")
        if uid == NOBODY:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            layers.append("nobody")
        # capset(version 3, this process, every capability set empty): root by name, with no privilege
        elif libc.syscall({"x86_64": 126, "aarch64": 91}.get(platform.machine(), -1), struct.pack("Ii", 0x20080522, 0), bytes(24)) == 0:
            layers.append("no_capabilities")
    if libc.prctl(38, 1, 0, 0, 0) == 0:  # PR_SET_NO_NEW_PRIVS: needed for Landlock and seccomp without root
        layers.append("no_new_privs")
        if abi := _landlock(libc, workdir):
            layers.append(f"landlock{abi}")
        if (arch := platform.machine()) in _ARCH:
            prog = _seccomp_program(arch, os.getpid())
            filters = (ctypes.c_ubyte * (8 * len(prog))).from_buffer_copy(b"".join(struct.pack("HBBI", *f) for f in prog))
            fprog = struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(filters))
            if libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) == 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
                layers.append("seccomp")
    return layers

def _child_main():
    """The sandboxed side (`python -I execution.py --child`): read the job, lock down, run the code."""
    sys.dont_write_bytecode = True
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    sys.stdin = io.StringIO("")  # user code reading input() gets EOF, not our job spec
    layers = _lock_down(job)
    if job.get("probe"):
        print(" ".join(layers))
    status = 0
    try:
        exec(compile(job["code"], "<sandbox>", "exec"), {"__name__": "__main__"})
    except MemoryError:
        os._exit(MEMORY_ERROR_STATUS)  # at once: reporting it could need memory
    except SystemExit as e:
        if e.code not in (None, 0):
            print(f"SystemExit: {e.code}", file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    with contextlib.suppress(Exception):  # what it printed before failing is part of the answer
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)

def _drain(stream, limit, out):
    """Read a pipe to EOF, keeping the first `limit` bytes and the last 4 kB (the traceback's end)."""
    kept, tail, overflow = bytearray(), b"", False
    while chunk := stream.read1(65536):
        room = limit - len(kept)
        kept += chunk[:max(room, 0)]
        overflow, tail = overflow or len(chunk) > room, (tail + chunk)[-4096:]
    out["data"], out["overflow"], out["tail"] = bytes(kept), overflow, tail

def execute_code(code, timeout=5.0, max_memory_bytes=256 * 1024 * 1024, max_output_bytes=64 * 1024,
                 max_file_bytes=16 * 1024 * 1024, probe=False):
    """Run `code` in a locked-down child interpreter; never raises for problems in the code itself."""
    job = json.dumps({"code": code, "timeout": timeout, "max_memory_bytes": int(max_memory_bytes),
                      "max_file_bytes": int(max_file_bytes), "probe": probe}).encode("utf-8")
    with tempfile.TemporaryDirectory(prefix="nanochat_sandbox_") as workdir:
        if _sandbox_uid() == NOBODY:
            os.chown(workdir, NOBODY, NOBODY)  # the child runs as nobody; the dir must stay its own
        # a minimal environment: the parent's variables (API keys, tokens) never reach the code
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        # a session (and process group) of its own, so that a timeout kills all that the code started
        proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), "--child"], cwd=workdir, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        # read the pipes while the child runs: one blocked on a full pipe would never finish
        outputs = {"stdout": {}, "stderr": {}}
        readers = [threading.Thread(target=_drain, args=(getattr(proc, name), max_output_bytes, out), daemon=True)
                   for name, out in outputs.items()]
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
            # SIGKILL (it cannot be caught or ignored) to the whole group: anything the code started dies with it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
        for t in readers:  # a grandchild that escaped the kill could hold a pipe open: do not wait on it forever
            t.join(timeout=2.0)
        for f in (proc.stdout, proc.stderr):
            f.close()
    # the code may print any bytes: what is not UTF-8 reads as U+FFFD rather than failing the whole run
    text = {name: out.get("data", b"").decode("utf-8", errors="replace") for name, out in outputs.items()}
    rc, truncated = proc.returncode, any(out.get("overflow", False) for out in outputs.values())
    result = ExecResult(success=rc == 0 and not timed_out, **text, truncated=truncated)
    last_line = ([""] + outputs["stderr"].get("tail", b"").decode("utf-8", errors="replace").strip().splitlines())[-1]
    if timed_out:
        result.timed_out, result.error = True, f"timed out after {timeout}s"
    elif rc == MEMORY_ERROR_STATUS or rc == 1 and "MemoryError" in last_line:
        result.memory_exceeded, result.error = True, f"MemoryError: over the {max_memory_bytes // 2**20} MiB memory limit"
    elif rc is not None and rc < 0:
        result.error = f"killed by signal {signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else -rc}"
        result.timed_out = -rc == signal.SIGXCPU  # the CPU-time backstop fired: only a busy loop does that
    elif rc != 0:
        result.error = last_line or f"exited with status {rc}"
    return result

def sandbox_layers():
    """The isolation layers the sandbox gets on this machine, e.g. ['rlimits', 'session', ..., 'seccomp']."""
    return execute_code("", probe=True).stdout.split()

if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    _child_main()
elif __name__ == "__main__":
    print("sandbox layers on this machine:", " ".join(sandbox_layers()))
