"""The HumanEval sandbox: limits, guards and the meaning of `ok`, each shown by a real subprocess."""

import os
import resource
import socket
import time
import uuid
from pathlib import Path

import pytest

from trainer.tasks import sandbox
from trainer.tasks.sandbox import run_program


def test_output_is_captured_and_a_clean_run_is_ok():
    ok, output = run_program("import math\nprint('hello', math.factorial(5))\nimport sys; print('err', file=sys.stderr)")
    assert ok
    assert "hello 120" in output and "err" in output


def test_an_exception_fails_with_its_traceback():
    ok, output = run_program("def f():\n    raise ValueError('boom')\nf()")
    assert not ok
    assert "ValueError: boom" in output and "<program>" in output


def test_an_early_exit_is_a_failure():
    # a completion that exits before the tests after it would otherwise pass without running them
    ok, output = run_program("import sys\nsys.exit(0)\nraise AssertionError('tests')")
    assert not ok
    assert "exited early" in output


def test_an_infinite_loop_is_killed_within_the_timeout():
    start = time.monotonic()
    ok, output = run_program("while True:\n    pass", timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert not ok
    assert "time limit" in output
    assert elapsed < 10  # killed at 1 s (a loaded machine starts the process late), not left to run


@pytest.mark.parametrize("bomb", ["x = bytearray(10**10)", "xs = []\nwhile True:\n    xs.append(bytearray(10**6))"])
def test_a_memory_bomb_fails_without_harming_this_process(bomb):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ok, output = run_program(bomb, timeout_s=5.0, memory_mb=256)
    assert not ok
    assert "MemoryError" in output
    # peak RSS is in KiB on Linux: this process did not take the program's memory
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100 * 1024
    assert run_program("print(sum(range(10)))") == (True, "45\n")  # and the sandbox still works


@pytest.mark.parametrize(
    "write",
    [
        "open({path!r}, 'w').write('escaped')",
        "import pathlib\npathlib.Path({path!r}).write_text('escaped')",
        "import os\nos.close(os.open({path!r}, os.O_WRONLY | os.O_CREAT))",
        "import io\nio.FileIO({path!r}, 'w').write(b'escaped')",
        "import os\nos.symlink('/tmp', 'out')\nopen('out/' + {name!r}, 'w')",
        "import os\nos.mkdir('sub')\nopen('sub/../../' + {name!r}, 'w')",
    ],
)
def test_writing_outside_the_sandbox_directory_fails(write):
    name = f"escape-{uuid.uuid4().hex}"
    path = f"/tmp/{name}"
    ok, output = run_program(write.format(path=path, name=name))
    assert not ok
    assert "PermissionError" in output
    assert not Path(path).exists()


def test_the_working_directory_is_writable_and_deleted_afterwards():
    ok, output = run_program("import os\nopen('note.txt', 'w').write('kept?')\nprint(os.getcwd())\nprint(open('note.txt').read())")
    assert ok
    workdir, content = output.split()
    assert content == "kept?"
    assert workdir != os.getcwd()
    assert not Path(workdir).exists()


@pytest.mark.parametrize("namespace", [True, False], ids=["netns", "guard-only"])
def test_the_network_is_unreachable(namespace, monkeypatch):
    if not namespace:  # a machine where unshare is refused: the socket guard alone must hold
        monkeypatch.setattr(sandbox, "_netns_prefix", lambda: ())
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        ok, output = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        assert not ok
        server.settimeout(0.3)
        with pytest.raises(TimeoutError):  # nobody connected
            server.accept()
    assert "network access is disabled" in output


@pytest.mark.parametrize(
    "call", ["import os\nos.system('true')", "import subprocess\nsubprocess.run(['true'])", "import shutil\nshutil.rmtree('.')", "import os\nos.kill(os.getpid(), 0)"]
)
def test_destructive_calls_are_disabled(call):
    ok, output = run_program(call)
    assert not ok
    assert "disabled in the sandbox" in output
