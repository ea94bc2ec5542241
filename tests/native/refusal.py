"""Running a llama.cpp tool that must refuse, and reading its message.

The tools log through llama.cpp's common logger: a queue that a worker thread drains, never flushed at exit
(common/log.cpp: "logs may be lost if not flushed before the program exits"). A refusal logged just before
the tool exits can therefore be lost on a loaded machine, while the exit status cannot. So every run must
fail, and the message must come through in one of `tries` runs."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence


def refused(command: Sequence[str], message: str, tries: int = 3, timeout: int = 120) -> str:
    """Run `command` until its output shows `message` (at most `tries` times); every run must exit nonzero.
    Returns the output of the last run, which holds the message or fails the assertion."""
    for _ in range(tries):
        result = subprocess.run(list(command), capture_output=True, text=True, errors="replace", timeout=timeout,
                                stdin=subprocess.DEVNULL)
        output = result.stderr + result.stdout
        assert result.returncode != 0, f"exit 0, expected a refusal: {output[-2000:]}"
        if message in output:
            return output
    raise AssertionError(f"{tries} runs refused without the message {message!r}; the last said: {output[-2000:]}")
