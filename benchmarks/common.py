"""Helpers shared by the benchmark scripts: arguments, machine description, timing, output.

Every headline figure is a RATIO of two things measured side by side in one process, in
alternating repetitions (A, B, A, B, ...), so that load from other work on shared cores hits
both sides alike; the scripts report the median ratio and its spread (min, max over the
repetitions) next to the median absolute figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks" / "out"
BASE_MODEL = "all-MiniLM-L6-v2"
CACHE_MAX_LEN = 256  # the cache entry the study and the tests use


# -- arguments -----------------------------------------------------------------------------

def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="smoke-sized run (< 2 minutes on 2 cores)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--reps", type=int, default=None, help="A/B repetitions (default per mode)")
    p.add_argument("--data", default=None,
                   help="BEIR directory (default: the project's data resolution)")
    p.add_argument("--out", default=None, help="JSON output path (default benchmarks/out/)")
    return p


def resolve_device(name: str | None) -> torch.device:
    """The device to run on. ``cpu`` also hides GPUs from this process, because
    ``trainables.loop.train`` picks CUDA by itself whenever it is available."""
    if name == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return torch.device("cpu")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    return torch.device(name)


def load_data(path: str | None):
    from trainables.data import load_beir, resolve_data_dir

    return load_beir(resolve_data_dir(path))


# -- machine -------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()),
        "device": str(device),
        "mem_total_gb": round(mem_info().get("MemTotal", 0) / 2**20, 1),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import sentence_transformers
        info["sentence_transformers"] = sentence_transformers.__version__
    except ImportError:
        pass
    return info


def mem_info() -> dict[str, int]:
    """/proc/meminfo in KiB."""
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def available_gb() -> float:
    return mem_info().get("MemAvailable", 0) / 2**20


def rss_mb() -> float:
    """Current resident set size of this process (MiB)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB; ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- timing --------------------------------------------------------------------------------

def sync(device: torch.device | None = None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | None = None) -> tuple[float, Any]:
    """(seconds, result) of one call, synchronising CUDA before and after."""
    gc.collect()
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def alternate(fns: dict[str, Callable[[], Any]], reps: int,
              device: torch.device | None = None, log: bool = True) -> dict[str, list[float]]:
    """Runs every function once per repetition, in the given order, ``reps`` times.

    The order is flipped on odd repetitions (A B, B A, A B, ...), so that neither side always
    runs right after the other's allocations. Returns seconds per call, per name.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            seconds, _ = timed(fns[name], device)
            times[name].append(seconds)
            if log:
                print(f"  rep {r + 1}/{reps}  {name:<28s} {seconds:9.4f} s", flush=True)
    return times


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def ratio(slow: list[float], fast: list[float]) -> dict[str, float]:
    """Per-repetition ratios ``slow[i] / fast[i]``: median and spread."""
    return summary([s / f for s, f in zip(slow, fast)])


# -- output --------------------------------------------------------------------------------

def fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        if x != x:
            return "nan"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{digits}f}".rstrip("0").rstrip(".")
    return str(x)


def spread(s: dict[str, float], digits: int = 3) -> str:
    """'median [min, max]'."""
    return f"{fmt(s['median'], digits)} [{fmt(s['min'], digits)}, {fmt(s['max'], digits)}]"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_json(name: str, payload: dict[str, Any], args: argparse.Namespace) -> Path:
    """``benchmarks/out/<name>[_quick].json`` (or ``--out``), with the load at the end."""
    payload = {**payload, "loadavg_at_end": list(os.getloadavg())}
    name += "_quick" if args.quick else ""
    path = Path(args.out) if args.out else OUT_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"\nwrote {path}")
    return path
