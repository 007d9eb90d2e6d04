"""How much memory this process can still allocate, for refusals made before allocating."""

from __future__ import annotations

import resource


def _meminfo_kib(field: str, path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _own_kib(field: str) -> int | None:
    return _meminfo_kib(field, "/proc/self/status")


def available_bytes() -> int | None:
    """The kernel's MemAvailable, or less where an address-space limit (`ulimit -v`, Slurm's
    memory limits set as RLIMIT_AS) leaves less; None where neither can be read."""
    limits = []
    avail = _meminfo_kib("MemAvailable")
    if avail is not None:
        limits.append(avail * 1024)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    used = _own_kib("VmSize")
    if soft != resource.RLIM_INFINITY and used is not None:
        limits.append(max(soft - used * 1024, 0))
    return min(limits) if limits else None


def human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if nbytes < 1000 or unit == "PB":
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} PB"
