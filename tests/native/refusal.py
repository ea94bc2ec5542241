"""Running a llama.cpp tool that must refuse, and reading its message.

Flag errors are printed by the argument parser (fprintf to stderr); the refusals of the rules themselves are
logged through llama.cpp's common logger, a queue that a worker thread drains and that nothing flushes at
exit. The patch flushes it before a tool exits on a fake-quant refusal (common_fake_quant_refused in
common/common.cpp): without that the message was lost on a loaded machine (3 runs of 3 once in CI), while
the exit status was not. So one run must both fail and show the message."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence


def refused(command: Sequence[str], message: str, timeout: int = 120) -> str:
    """Run `command` once: it must exit nonzero with `message` in its output. Returns the output."""
    result = subprocess.run(list(command), capture_output=True, text=True, errors="replace", timeout=timeout,
                            stdin=subprocess.DEVNULL)
    output = result.stderr + result.stdout
    assert result.returncode != 0, f"exit 0, expected a refusal: {output[-2000:]}"
    assert message in output, f"refused without the message {message!r}; it said: {output[-2000:]}"
    return output
