"""What the benchmark scripts share about processes: free ports and waiting
for a listener (the tests' own helpers, from tests/harness.py), and a
process's CPU time and peak memory from /proc."""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from harness import free_port, wait_port  # noqa: E402,F401  (re-exported for the bench scripts)


def cpu_seconds(pid):
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_kib(pid):
    """Peak resident memory (VmHWM) of a process so far, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0
