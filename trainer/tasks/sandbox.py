"""
Run model-written Python (HumanEval completions) in a throwaway subprocess.

Notable:
- a fresh interpreter (`python -I -S -B`: no user site, no site-packages, no environment variables read),
  its own session (so a timeout kills the whole process group), a minimal environment, and a fresh
  temporary working directory that is deleted afterwards
- the program arrives on stdin and is run by a small guard (`_GUARD`) that first applies the limits, then
  disables what generated code has no business doing, then execs the program:
  - `resource.setrlimit`: address space (memory_mb), CPU seconds (a backstop should the parent die),
    file size (16 MiB, which also caps the captured output), open files, no core dumps, no new processes
    for a non-root user. The limits are set in the child's own first lines rather than in `preexec_fn`:
    `preexec_fn` is unsafe in a process with threads (Ray workers have many) and the effect is the same,
    since no line of the program runs before them
  - like nanochat's `reliability_guard`: process control, deleting/renaming/chmod, `subprocess`,
    `shutil.rmtree` and `os.fork`/`exec*`/`spawn*` raise PermissionError (patched in `os` and in `posix`)
  - writes (open for w/a/x/+, os.open with write flags, io.FileIO, mkdir) outside the working directory
    raise PermissionError; symbolic links are resolved first, so a link cannot point the way out
  - `socket.socket`, `create_connection` & co raise; on top of that the interpreter runs in a new,
    empty network namespace (`unshare --net`) where the kernel allows it (probed once per process)
  - `ok` means the program ran to its last line: an exception, a timeout, a kill and also an early
    `sys.exit()`/`exit()` are failures, so a completion cannot skip the tests that follow it and pass
- output: stdout and stderr together, the first 64 KiB
- safe to call from several threads at once (no `preexec_fn`, no shared state but the cached probe), so
  an eval can grade HumanEval samples in a thread pool

What this is not: a security boundary against adversarial code. It runs as the calling user (root in
most containers: the Python install is usually not readable by an unprivileged user, so dropping to
`nobody` is not an option), and the guards are Python-level: `ctypes` or a frame walk can undo them.
It protects the host from the accidents and bad habits of generated code (infinite loops, memory bombs,
stray files, network calls, `rm -rf`), as OpenAI's and nanochat's HumanEval harnesses do; put the
evaluation in a container or VM for more.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 64 * 1024  # bytes of output returned
FILE_SIZE_LIMIT = 16 * 1024 * 1024  # RLIMIT_FSIZE: any one file the program writes, its output included
OPEN_FILES_LIMIT = 64

# Runs in the child before the program. Kept in a function so that the program's globals hold none of
# its names; the program gets a fresh __main__ namespace.
_GUARD = r"""
def _sandbox(memory_bytes, cpu_seconds, fsize_bytes, nofile):
    import builtins, io, os, posix, resource, sys, traceback
    import _io, _socket, shutil, socket, subprocess

    code = sys.stdin.read()
    sys.stdin = io.StringIO("")

    for limit, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_CPU, cpu_seconds),
                         (resource.RLIMIT_FSIZE, fsize_bytes), (resource.RLIMIT_NOFILE, nofile),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, 0)):
        resource.setrlimit(limit, (value, value))

    root = os.path.realpath(os.getcwd())
    realpath, fsdecode = os.path.realpath, os.fsdecode

    def inside(path):
        if isinstance(path, int):  # an already open descriptor
            return True
        resolved = realpath(fsdecode(path))
        return resolved == root or resolved.startswith(root + os.sep)

    def refuse(what):
        def disabled(*args, **kwargs):
            raise PermissionError(f"{what} is disabled in the sandbox")
        return disabled

    def check_write(path):
        if not inside(path):
            raise PermissionError(f"writing outside the sandbox directory is not allowed: {path!r}")

    real_open, real_os_open, real_mkdir, RealFileIO = builtins.open, os.open, os.mkdir, _io.FileIO
    real_exit = os._exit  # the exit status is the guard's, not the program's
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            check_write(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            if dir_fd is not None:
                raise PermissionError("os.open with dir_fd and write flags is disabled in the sandbox")
            check_write(path)
        return real_os_open(path, flags, mode)

    def guarded_mkdir(path, mode=0o777, *, dir_fd=None):
        if dir_fd is not None:
            raise PermissionError("os.mkdir with dir_fd is disabled in the sandbox")
        check_write(path)
        return real_mkdir(path, mode)

    class GuardedFileIO(RealFileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                check_write(file)
            super().__init__(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open
    io.FileIO = _io.FileIO = GuardedFileIO
    for module in (os, posix):
        module.open, module.mkdir = guarded_os_open, guarded_mkdir

    # destructive or escaping calls: process control, file removal/renaming/permissions, new processes
    disabled = ["kill", "killpg", "system", "popen", "putenv", "unsetenv", "remove", "removedirs", "rmdir",
                "unlink", "rename", "renames", "replace", "truncate", "ftruncate", "chmod", "fchmod", "lchmod",
                "chown", "fchown", "lchown", "chroot", "chdir", "fchdir", "setuid", "seteuid", "setgid",
                "setegid", "setreuid", "setresuid", "setsid", "fork", "forkpty", "vfork", "symlink", "link",
                "mkfifo", "mknod", "abort", "_exit", "execv", "execve", "execl", "execle", "execlp", "execlpe",
                "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe",
                "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "register_at_fork", "pidfd_open"]
    for name in disabled:
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, refuse(f"os.{name}"))
    shutil.rmtree, shutil.move, shutil.chown = refuse("shutil.rmtree"), refuse("shutil.move"), refuse("shutil.chown")
    subprocess.Popen = refuse("subprocess")
    no_network = refuse("network access")
    for module in (socket, _socket):
        for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
            if hasattr(module, name):
                setattr(module, name, no_network)
    for name in ("ctypes", "_ctypes", "resource", "multiprocessing", "_posixsubprocess"):
        sys.modules[name] = None  # import fails
    builtins.help = refuse("help")

    try:
        exec(compile(code, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as e:
        print(f"the program exited early (SystemExit {e.code!r}): its last line was not reached", file=sys.stderr)
        status = 1
    except BaseException as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from the program's frame on
        status = 1
    else:
        status = 0
    sys.stdout.flush()
    sys.stderr.flush()
    real_exit(status)  # also ends threads the program left running
"""


def _child_script(memory_bytes: int, cpu_seconds: int) -> str:
    return _GUARD + f"\n_sandbox({memory_bytes}, {cpu_seconds}, {FILE_SIZE_LIMIT}, {OPEN_FILES_LIMIT})\n"


@functools.cache
def _netns_prefix() -> tuple[str, ...]:
    """`unshare` arguments that put the child into an empty network namespace, or () where the kernel or
    the container does not allow it (then the socket guard alone stands)."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    for prefix in ((exe, "--net", "--"), (exe, "--map-root-user", "--net", "--")):
        try:
            probe = subprocess.run([*prefix, sys.executable, "-I", "-S", "-c", "pass"], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return prefix
    log.info("no network namespace available (unshare refused): the sandbox relies on its socket guard")
    return ()


def run_program(code: str, timeout_s: float = 5.0, memory_mb: int = 256) -> tuple[bool, str]:
    """Run code as a Python program in the sandbox: (ran to its end without error, stdout+stderr)."""
    workdir = tempfile.mkdtemp(prefix="nanochat-sandbox-")
    script = _child_script(memory_mb * 1024 * 1024, math.ceil(timeout_s) + 1)
    env = {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    argv = [*_netns_prefix(), sys.executable, "-I", "-S", "-B", "-c", script]
    try:
        # the output goes to an unnamed file, not a pipe: RLIMIT_FSIZE then caps it, and a program that
        # prints without end cannot fill this process' memory
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=workdir, env=env, start_new_session=True)
            try:
                proc.communicate(code.encode("utf-8"), timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                # not yet reaped, so the process group id cannot have been reused
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                timed_out = True
            out.seek(0)
            raw = out.read(OUTPUT_LIMIT + 1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    output = raw[:OUTPUT_LIMIT].decode("utf-8", errors="replace")
    if len(raw) > OUTPUT_LIMIT:
        output += "\n[sandbox] output truncated"
    if timed_out:
        return False, output + f"\n[sandbox] killed after the time limit of {timeout_s:g} s"
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        return False, output + f"\n[sandbox] killed by {name} (a resource limit)"
    return proc.returncode == 0, output
