"""The shared benchmark harness: side-by-side timing, peak memory, tables, JSON lines, plots.

How a comparison runs (:func:`compare`):

1. Warm-up: every provider is called ``warmup`` times (the first call is timed on its own and
   kept as ``first_call_s``: it includes ``torch.compile`` compilation, lazy inits, caches).
   A provider that raises is reported with its error and left out; it never stops the others.
2. Repeated runs, alternating order: in round ``i`` the providers run in the order rotated by
   ``i``, so slow drifts of the machine (thermal, other processes) hit every provider alike.
   The number of rounds adapts to the measured cost (``target_s`` of timed work per provider on
   average, clamped to ``[min_reps, max_reps]``). Calls faster than ``min_sample_s`` with no
   setup are repeated ``inner`` times per sample so the timer resolution does not dominate.
3. Statistics: median, p20 and p80 of the per-call times (seconds), and every sample (in round
   order). A provider's ratio to the baseline is the median of the per-round ratios (round ``i``
   of one over round ``i`` of the other, which ran next to each other), not the ratio of the two
   medians: a shared virtual machine has slow spells of seconds, and pairing the rounds cancels
   what a spell does to both, where the ratio of medians takes each provider's spread in full
   (:func:`paired_ratio`; the ratio of medians is kept in each record too).
4. Peak memory, in a separate un-timed call (so the measurement never perturbs the timings):
   * ``cuda``: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call.
   * ``cpu``: PyTorch has no CPU peak counter, and tracemalloc does not see ATen's allocator, so
     the call runs under ``torch.profiler`` with ``profile_memory=True``; the allocation and
     free events (bytes > 0 and < 0) are replayed in time order and the running sum's maximum is
     the peak. Both methods count bytes *allocated during the call and live at the same time*
     (outputs, autograd's saved tensors, temporaries, gradients), relative to what was already
     allocated before it (weights, inputs, optimizer state). They ignore allocator caching and
     fragmentation, so they compare providers, not processes. One difference: the CPU
     profiler does not report frees of blocks allocated *before* the call (a backward frees
     the forward's saved tensors), so on CPU the figure is the peak of the call's own
     allocations, an upper bound of the net growth; on CUDA those frees lower the running
     total. Compare providers on one device, not figures across devices.

A provider is a :class:`Case`: ``setup()`` (not timed, e.g. run the forward before timing a
backward) and ``fn(state)`` (timed).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

try:  # POSIX only: the page-fault counts of CPU timings
    import resource
except ImportError:
    resource = None  # type: ignore[assignment]

__all__ = [
    "RESULTS_DIR",
    "PEAK_MEMORY_METHOD",
    "Case",
    "Measurement",
    "compare",
    "measure_peak_bytes",
    "machine_info",
    "format_table",
    "append_jsonl",
    "read_jsonl",
    "plot_records",
    "base_parser",
    "resolve_device",
    "BenchRun",
    "paired_ratio",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

PEAK_MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() during the call minus memory_allocated() before it",
    "cpu": (
        "torch.profiler(profile_memory=True): allocation/free events of the call replayed in "
        "time order; peak of the running sum of live bytes allocated during the call"
    ),
}


@dataclass
class Case:
    """One provider's timed call. ``setup()`` runs untimed before every call; its result is
    passed to ``fn``. With ``setup=None``, ``fn`` gets None."""

    fn: Callable[[Any], Any]
    setup: Callable[[], Any] | None = None


@dataclass
class Measurement:
    """Per-call times (seconds) and peak memory (bytes) of one provider in one comparison."""

    provider: str
    times_s: list[float] = field(default_factory=list)
    #: Minor page faults per call, one count per sample (CPU runs on POSIX; else empty): a call
    #: that gets fresh pages from the kernel (glibc maps big blocks afresh, or regrows a trimmed
    #: heap) pays a fault and the zeroing of each page, a cost of the allocator's state.
    page_faults: list[float] = field(default_factory=list)
    first_call_s: float | None = None
    peak_bytes: int | None = None
    inner: int = 1
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and len(self.times_s) > 0

    def quantile(self, q: float) -> float | None:
        """Linear-interpolated quantile q in [0, 1] of the per-call times (None if failed)."""
        if not self.ok:
            return None
        xs = sorted(self.times_s)
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.ok else None

    @property
    def p20_s(self) -> float | None:
        return self.quantile(0.2)

    @property
    def p80_s(self) -> float | None:
        return self.quantile(0.8)

    def record(self) -> dict[str, Any]:
        """The JSON-ready summary (times in seconds)."""
        return {
            "provider": self.provider,
            "median_s": self.median_s,
            "p20_s": self.p20_s,
            "p80_s": self.p80_s,
            "reps": len(self.times_s),
            "times_s": list(self.times_s),
            "page_faults_median": (statistics.median(self.page_faults)
                                   if self.page_faults else None),
            "inner": self.inner,
            "first_call_s": self.first_call_s,
            "peak_bytes": self.peak_bytes,
            "error": self.error,
        }


def paired_ratio(times_a: Sequence[float] | None, times_b: Sequence[float] | None) -> float | None:
    """Median over rounds of ``times_a[i] / times_b[i]``: two providers' samples of one
    :func:`compare` (round ``i`` of each ran in the same round). None unless both have the same
    number of rounds (at least one) and every sample is positive."""
    if not times_a or not times_b or len(times_a) != len(times_b):
        return None
    if min(times_a) <= 0 or min(times_b) <= 0:
        return None
    return statistics.median(a / b for a, b in zip(times_a, times_b, strict=True))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:300]


class _QuietStderr:
    """Send fd 2 to a temporary file for the duration (the profiler's C++ side prints
    ``profiler_start``/``profiler_stop`` lines on every use); replay any other line after."""

    # The last one: a block allocated before the call and freed during it (e.g. the graph a
    # backward releases) is left out of the events, which is what "relative to before" means.
    _NOISE = ("profiler_start", "profiler_stop", "gpuGetDeviceCount", "SyncActivityProfiler",
              "Memory block of unknown size was allocated before the profiling started")

    def __enter__(self) -> _QuietStderr:
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._tmp = tempfile.TemporaryFile(mode="w+b")
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        lines = self._tmp.read().decode(errors="replace").splitlines()
        self._tmp.close()
        for line in lines:
            if line.strip() and not any(n in line for n in self._NOISE):
                print(line, file=sys.stderr)


def measure_peak_bytes(call: Callable[[], Any], device: torch.device | str) -> int:
    """Peak bytes allocated and live at once during ``call()``, relative to before it.

    See the module docstring for the method on each device. The call's return value is kept
    alive until the end of the measurement (an output is part of the peak).
    """
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = call()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with _QuietStderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = call()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    del out
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return int(peak)


def _minor_faults() -> int | None:
    """This process's minor page faults so far (None where ``resource`` is missing)."""
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _time_once(case: Case, device: torch.device, inner: int) -> tuple[float, float | None]:
    """Seconds per call of ``case.fn`` and, on the CPU, minor page faults per call (averaged
    over ``inner`` back-to-back calls)."""
    state = case.setup() if case.setup is not None else None
    _sync(device)
    faults = None
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            out = case.fn(state)
        end.record()
        end.synchronize()
        elapsed = start.elapsed_time(end) / 1e3
    else:
        f0 = _minor_faults()
        t0 = time.perf_counter()
        for _ in range(inner):
            out = case.fn(state)
        elapsed = time.perf_counter() - t0
        f1 = _minor_faults()
        faults = (f1 - f0) / inner if f0 is not None and f1 is not None else None
    del out, state
    return elapsed / inner, faults


def compare(
    cases: Mapping[str, Case | Callable[[Any], Any]],
    device: torch.device | str = "cpu",
    *,
    warmup: int = 2,
    min_reps: int = 5,
    max_reps: int = 100,
    target_s: float = 1.0,
    min_sample_s: float = 1e-3,
    max_inner: int = 100,
    memory: bool = True,
    verbose: bool = True,
) -> dict[str, Measurement]:
    """Time every provider side by side; returns ``{provider: Measurement}`` in input order.

    ``cases`` maps a provider name to a :class:`Case` (or a bare callable taking one ignored
    argument). A provider that raises anywhere gets ``error`` set and is left out of the rest.
    """
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (the first call is timed separately), got {warmup}")
    if not 1 <= min_reps <= max_reps:
        raise ValueError(f"need 1 <= min_reps <= max_reps, got {min_reps}, {max_reps}")
    device = torch.device(device)
    norm: dict[str, Case] = {k: v if isinstance(v, Case) else Case(fn=v) for k, v in cases.items()}
    results = {name: Measurement(provider=name) for name in norm}

    def fail(name: str, exc: BaseException) -> None:
        results[name].error = _error_text(exc)
        results[name].times_s.clear()
        results[name].page_faults.clear()
        if verbose:
            print(f"  [{name}] failed: {results[name].error}", file=sys.stderr)
            traceback.print_exception(exc, limit=-3, file=sys.stderr)

    estimates: dict[str, float] = {}
    for name, case in norm.items():
        try:
            t0 = time.perf_counter()
            _time_once(case, device, 1)
            results[name].first_call_s = time.perf_counter() - t0
            est = [_time_once(case, device, 1)[0] for _ in range(warmup - 1)]
            estimates[name] = min(est) if est else results[name].first_call_s
        except Exception as exc:  # a failing provider is reported, not fatal
            fail(name, exc)

    alive = [n for n in norm if results[n].error is None]
    if alive:
        mean_est = sum(max(estimates[n], 1e-9) for n in alive) / len(alive)
        reps = int(min(max_reps, max(min_reps, math.ceil(target_s / mean_est))))
        for n in alive:
            if norm[n].setup is None and estimates[n] < min_sample_s:
                results[n].inner = int(min(max_inner, math.ceil(min_sample_s / max(estimates[n], 1e-9))))
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection in the middle of one provider's call is noise
        try:
            for i in range(reps):
                k = i % len(alive)
                for name in alive[k:] + alive[:k]:
                    if results[name].error is not None:
                        continue
                    try:
                        secs, faults = _time_once(norm[name], device, results[name].inner)
                        results[name].times_s.append(secs)
                        if faults is not None:
                            results[name].page_faults.append(faults)
                    except Exception as exc:
                        fail(name, exc)
        finally:
            if gc_was_enabled:
                gc.enable()

    if memory:
        for name in alive:
            if results[name].error is not None:
                continue
            case = norm[name]
            try:
                state = case.setup() if case.setup is not None else None
                results[name].peak_bytes = measure_peak_bytes(
                    lambda c=case, s=state: c.fn(s), device)
                del state
            except Exception as exc:
                # Timings stand; only the memory figure is missing.
                if verbose:
                    print(f"  [{name}] peak memory failed: {_error_text(exc)}", file=sys.stderr)
    return results


# ----------------------------------------------------------------------------------------------
# Machine and versions


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) if sha else None


def _version(dist: str) -> str | None:
    """The installed version of a distribution, without importing it (peft, timm take seconds)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Machine, library versions and gslora backends, for the JSON lines and the report."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "mem_total_gib": _mem_total_gib(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": _version("numpy"),
        "triton": _version("triton"),
        "git": _git_commit(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "peft": _version("peft"),
        "timm": _version("timm"),
    }
    try:
        import gslora
        from gslora.backends import describe_backends, select_backend

        info["gslora"] = gslora.__version__
        info["gslora_backend"] = select_backend(device).name
        info["gslora_backends"] = describe_backends(device)
    except Exception as exc:  # the report must still say what happened
        info["gslora"] = f"import failed: {_error_text(exc)}"
    return info


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------------------------
# Output: tables, JSON lines, plots


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                 min_widths: Sequence[int] | None = None) -> str:
    """A fixed-width text table; numbers right-aligned, text left-aligned.

    ``min_widths`` keeps columns aligned across tables printed piece by piece.
    """
    rows = [["" if c is None else str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    if min_widths is not None:
        widths = [max(w, m) for w, m in zip(widths, min_widths, strict=True)]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells for {len(headers)} headers: {row}")
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def is_num(c: str) -> bool:
        try:
            float(c.removesuffix("x"))
        except ValueError:
            return False
        return True

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if is_num(c) else c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def append_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Append one JSON object per line (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True) + "\n")


def read_jsonl(paths: str | Path | Iterable[str | Path]) -> list[dict[str, Any]]:
    """All records of one or several JSON-lines files, in file order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[dict[str, Any]] = []
    for p in paths:
        with Path(p).open() as f:
            for i, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{p}:{i}: not a JSON line ({exc})") from None
    return out


def plot_records(
    records: Sequence[Mapping[str, Any]], x_key: str, path: str | Path, *,
    series_key: str | None = None, title: str = "",
) -> Path:
    """Median time vs ``x_key`` per provider (one panel per phase), log-log, saved to ``path``.

    ``series_key`` (e.g. the LoRA rank) splits a provider into one line per value.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r.get("type") == "result" and r.get("median_s")]
    phases = list(dict.fromkeys(r["phase"] for r in rows))
    if not phases:
        raise ValueError("no successful result records to plot")
    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 4), squeeze=False)
    for ax, phase in zip(axes[0], phases, strict=True):
        lines: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r["phase"] != phase:
                continue
            label = r["provider"] + (f" {series_key}={r['params'][series_key]}" if series_key else "")
            lines.setdefault(label, []).append((float(r["params"][x_key]), r["median_s"] * 1e3))
        for label, pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(x_key)
        ax.set_ylabel("median time per call (ms)")
        ax.set_title(f"{title} {phase}".strip())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# The process's memory allocator

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> str | None:
    """Make glibc keep the memory a process frees (no trimming of the heap, no mmap for big
    blocks), as a caching allocator (jemalloc, tcmalloc: PyTorch's CPU tuning guide recommends
    one) would: a block that the allocator gave back costs page faults, the kernel zeroing every
    page, when it is taken again. Off by default (``--keep-freed-memory`` turns it on): glibc's
    default is what most users run, and under it an implementation's [M, N] temporaries pay
    these faults on every call (above 32 MiB glibc always maps a block afresh), which is part of
    what such temporaries cost. Every provider of a run runs under the same setting; the meta
    record says which. Returns what was set, or None where the C library is not glibc."""
    import ctypes

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, -1)):
        return None
    return "glibc mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1): freed memory is kept, not returned to the OS"


# ----------------------------------------------------------------------------------------------
# Command line and the run object shared by the bench scripts


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every bench script has: --device, --quick, --out, --plot, repetitions."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where to time (cuda: the same providers on the GPU)")
    p.add_argument("--quick", action="store_true", help="a small subset of the cases (seconds)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON-lines file to append to (default benchmarks/results/<bench>.jsonl)")
    p.add_argument("--plot", type=Path, default=None, help="also save a time-vs-size plot (PNG)")
    p.add_argument("--run-id", default=None, help="tag for the records (run_all sets one per run)")
    p.add_argument("--providers", default=None,
                   help="comma-separated subset of the providers (default: all)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (>= 1)")
    p.add_argument("--min-reps", type=int, default=5, help="fewest timed rounds")
    p.add_argument("--max-reps", type=int, default=50, help="most timed rounds")
    p.add_argument("--target-time", type=float, default=1.0,
                   help="seconds of timed work per provider and case (sets the rounds)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc keeps freed memory, as a caching allocator would (see "
                        "keep_freed_memory in benchmarks/harness.py); default: glibc's defaults")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice, all usable cores)")
    return p


def resolve_device(name: str) -> torch.device:
    """torch.device for --device, with a clear error when CUDA is asked for but absent."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available on this machine")
    return torch.device(name)


def select_providers(requested: str | None, known: Sequence[str]) -> list[str]:
    """Parse --providers against the bench's known provider names (all when None)."""
    if requested is None:
        return list(known)
    names = [n.strip() for n in requested.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; known: {', '.join(known)}")
    return names


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def fmt_mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.2f}"


def fmt_faults(per_call: Sequence[float]) -> str:
    """The median of the minor page faults per call ("-" where none were counted)."""
    return "-" if not per_call else f"{statistics.median(per_call):.0f}"


class BenchRun:
    """Collects one script invocation's records, prints the table as it goes, writes the file.

    Every record carries ``bench``, ``run_id``, ``device`` and ``dtype``; the first one written
    is a ``type: "meta"`` record with :func:`machine_info` and the command line.
    """

    HEADERS = ("case", "phase", "provider", "median ms", "p20 ms", "p80 ms", "ratio", "peak MiB",
               "faults", "reps")
    WIDTHS = (28, 11, 16, 9, 9, 9, 7, 8, 6, 4)

    def __init__(self, bench: str, args: argparse.Namespace, dtype: torch.dtype = torch.float32,
                 argv: Sequence[str] | None = None) -> None:
        self.bench = bench
        self.args = args
        self.device = resolve_device(args.device)
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise SystemExit(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        self.dtype = dtype
        allocator = keep_freed_memory() if getattr(args, "keep_freed_memory", False) else None
        self.run_id = args.run_id or _dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        self.out = args.out if args.out is not None else RESULTS_DIR / f"{bench}.jsonl"
        self.records: list[dict[str, Any]] = []
        self._printed_header = False
        argv = list(sys.argv[1:] if argv is None else argv)
        meta = {
            "type": "meta", "bench": bench, "run_id": self.run_id, "device": str(self.device),
            "dtype": str(dtype).replace("torch.", ""),
            "time": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": f"python -m benchmarks.{bench_module(bench)} " + " ".join(argv),
            "quick": bool(args.quick),
            "peak_memory_method": PEAK_MEMORY_METHOD[self.device.type],
            "allocator": allocator or "default",
            "machine": machine_info(self.device),
        }
        self.records.append(meta)
        print(f"# {bench} on {self.device} ({meta['machine']['cpu'] if self.device.type == 'cpu' else meta['machine']['gpu']}), "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"gslora backend {meta['machine'].get('gslora_backend')}, run {self.run_id}")

    def compare(self, cases: Mapping[str, Case | Callable[[Any], Any]], **kw: Any) -> dict[str, Measurement]:
        """:func:`compare` with the command line's repetition settings."""
        a = self.args
        kw.setdefault("warmup", a.warmup)
        kw.setdefault("min_reps", a.min_reps)
        kw.setdefault("max_reps", a.max_reps)
        kw.setdefault("target_s", a.target_time)
        kw.setdefault("memory", not a.no_memory)
        return compare(cases, self.device, **kw)

    def add(self, case_label: str, params: Mapping[str, Any], phase: str,
            results: Mapping[str, Measurement], baseline: str | None = None,
            provider_info: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Record (and print) one case × phase; ``ratio`` = the median of the per-round ratios to
        the baseline (:func:`paired_ratio`), ``ratio_of_medians`` = median / the baseline's."""
        base = results.get(baseline) if baseline else None
        base_ok = base is not None and base.ok
        new = []
        rows = []
        for name, m in results.items():
            ratio = of_medians = None
            if m.ok and base_ok:
                of_medians = m.median_s / base.median_s
                ratio = paired_ratio(m.times_s, base.times_s) or of_medians  # same rounds: always paired
            rec = {
                "type": "result", "bench": self.bench, "run_id": self.run_id,
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "case": case_label, "params": dict(params), "phase": phase,
                "baseline": baseline, "ratio_vs_baseline": ratio, "ratio_of_medians": of_medians,
                **m.record(),
                "info": dict((provider_info or {}).get(name, {})),
            }
            new.append(rec)
            rows.append((case_label, phase, name, fmt_ms(m.median_s), fmt_ms(m.p20_s), fmt_ms(m.p80_s),
                         "-" if ratio is None else f"{ratio:.2f}x", fmt_mib(m.peak_bytes),
                         fmt_faults(m.page_faults),
                         len(m.times_s) if m.ok else f"FAILED: {m.error}"))
        self.records.extend(new)
        table = format_table(self.HEADERS, rows, self.WIDTHS)
        lines = table.splitlines()
        if not self._printed_header:
            print("(ratio = median over rounds of time / the baseline provider's time in the same "
                  "round; times per call)")
            print("\n".join(lines[:2]))
            self._printed_header = True
        print("\n".join(lines[2:]), flush=True)
        return new

    def finish(self, plot_x: str | None = None, series_key: str | None = None) -> list[dict[str, Any]]:
        """Append the records to --out (and plot if asked); returns all records of this run."""
        self.records[0]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        append_jsonl(self.out, self.records)
        print(f"# appended {len(self.records)} records to {self.out}")
        if self.args.plot is not None and plot_x is not None:
            try:
                path = plot_records(self.records, plot_x, self.args.plot, series_key=series_key,
                                    title=self.bench)
                print(f"# plot saved to {path}")
            except Exception as exc:  # a plot is optional; never lose the results over it
                print(f"# plot failed: {_error_text(exc)}", file=sys.stderr)
        return self.records


def bench_module(bench: str) -> str:
    """The module name of a bench (``lora_linear`` → ``bench_lora_linear``)."""
    return f"bench_{bench}"


def require_float_dtype(name: str) -> torch.dtype:
    """--dtype string → torch dtype, with a clear error."""
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp64": torch.float64, "float64": torch.float64}
    if name not in table:
        raise SystemExit(f"--dtype must be one of {', '.join(table)}, got {name!r}")
    return table[name]
