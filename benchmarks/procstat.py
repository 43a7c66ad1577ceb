"""Memory of the current process from /proc/self/status (Linux), for the benchmarks' driver-memory numbers.

VmHWM (peak resident set) is per process image and starts fresh at exec, unlike getrusage's ru_maxrss, which Linux
carries over from the parent across fork + exec: measure in a fresh child, read VmHWM there.
"""


def status_mib(field: str) -> float:
    """A /proc/self/status field given in kB (VmRSS, VmHWM, ...), in MiB; NaN where there is no such field."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")
