"""Progress bars for a person at a terminal, silence for logs."""

import fcntl
import os
import pty
import struct
import sys
import termios

from conftest import ROOT, cli, env, tiny_params, write_params


def _run_on_a_terminal(cwd, args) -> str:
    pid, fd = pty.fork()
    if pid == 0:  # the child: a real terminal of 120 x 40 on stdout / stderr
        os.chdir(cwd)
        os.execve(sys.executable, [sys.executable, *args], env(PYTHONPATH=str(ROOT)))
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text[-2000:]
    return text


def test_bar_with_loss_on_a_terminal_and_none_in_logs(tiny_repo):
    # Small batches for enough steps to draw a bar with a loss readout; few images to keep it seconds.
    write_params(tiny_repo, tiny_params(**{"pretrain.batch_size": 4, "pretrain.train_limit": 200}))
    assert cli(tiny_repo, "data").returncode == 0
    shown = _run_on_a_terminal(tiny_repo, ["-m", "pipeline", "pretrain", "--patch", "4", "--mask", "0.5"])
    assert "pretrain p4-m0.5 epoch 1/2:" in shown and "step/s" in shown and "loss=" in shown, shown[-2000:]
    logged = cli(tiny_repo, "pretrain", "--patch", "4", "--mask", "0.5")
    assert logged.returncode == 0
    assert "step/s" not in logged.stdout + logged.stderr
    assert "pretrain p4-m0.5 epoch 2/2:" in logged.stdout
