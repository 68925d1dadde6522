"""Measuring: median wall times of interleaved repeats, the memory one call needs, the machine, the tables.

Both benchmarks time and size their steps with these helpers. glibc's mmap threshold is part of the measurement:
`bench.py` fixes it at TIMING_MMAP_THRESHOLD for the whole run, so that every run allocates alike, and
`peak_bytes` lowers it to 4 KiB for the one call it measures, so that the resident set follows the live tensors.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

# glibc's mmap threshold while timing, fixed so that every run allocates alike (memory is measured at 4 KiB)
TIMING_MMAP_THRESHOLD = 1 << 16
# a table column: (key of the row's dict, title, format of a value)
Column = tuple[str, str, str]


def sync_for(device: torch.device) -> Callable[[], None]:
    """What to call before reading a clock: wait for queued GPU work; nothing on the CPU."""
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


def median_times(fns: dict[str, Callable[[], object]], warmup: int, repeats: int, sync: Callable[[], None]) -> dict:
    """Median wall seconds of each function; the functions take turns so that drifting load hits them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def kernel_profile(fn: Callable[[], object], device: torch.device) -> tuple[float | None, int | None]:
    """Milliseconds that the GPU kernels of one call of `fn` run for, and how many kernels (and copies) it
    launches; (None, None) on a CPU. When the kernels' time is far under the wall time, the host (Python,
    dispatch, launches) and not the GPU bounds the call."""
    if device.type != "cuda":
        return None, None
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in kernels) / 1e3, len(kernels)


def _proc_status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def set_mmap_threshold(size: int) -> None:
    """Make glibc serve (and on free, return to the system) every block of `size` bytes or more with its own
    mapping; setting it also stops glibc from raising the threshold by itself. Linux only, a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, size)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Memory that one call of `fn` needs above what is live before it: the CUDA allocator's peak on a GPU; on a
    CPU the rise of the resident set's high-water mark (None where /proc cannot reset it), measured with every
    block of 4 KiB or more mapped on its own, so that the resident set follows the live tensors."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    set_mmap_threshold(4096)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        before = _proc_status("VmRSS")
        fn()
        return _proc_status("VmHWM") - before
    except OSError:
        return None
    finally:
        set_mmap_threshold(TIMING_MMAP_THRESHOLD)


def machine() -> dict:
    """What the numbers were measured on: torch's version and threads, the CPU, its cores and the load at the
    start (a loaded machine explains slow numbers)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average_1min_at_start": load,
    }


def print_table(rows: list[dict], columns: list[Column]) -> None:
    """Print `rows` as a Markdown table of `columns`, missing values shown as -, and flush, so that a long run
    shows each table as soon as it is measured."""
    cells = [[title for _, title, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines) + "\n", flush=True)
