"""python -m benchmarks: validate every registered op's kernels against its reference, then time each case
against its baselines and write results/<gpu>/<op>.json (on a GPU) or results/cpu-<processor>/<op>.json.

On a CPU-only machine the Triton kernels are validated under the interpreter, then each op's CPU path (what
backend auto runs for CPU tensors) is timed against torch's own module or function: one thread, the
implementations interleaved, the minimum of repeats; the table gives fusenn's time over each baseline's.
Options: --quick (fewer timed sizes), --only OP[,OP], --validate-only, --out DIR, --threads N (CPU timing);
--static [--scope ci]: the sm_90a compile report of benchmarks/static.py instead.
"""

import argparse
import datetime
import importlib
import json
import os
import pkgutil
import platform
import re
import subprocess
import sys
import traceback

import torch

import fusenn
from benchmarks.registry import REGISTRY

HERE = os.path.dirname(os.path.abspath(__file__))


def load_entries():
    for mod in pkgutil.iter_modules([HERE]):
        if mod.name.startswith("bench_"):
            importlib.import_module(f"benchmarks.{mod.name}")


def environment():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
    except OSError:
        commit = ""
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "python": platform.python_version(), "fusenn": fusenn.__version__, "commit": commit or None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def kernel_backends():
    return [name for name in ("triton", "cuda") if fusenn.backends()[name].usable]


def validate(entries):
    """Rows (op, backend, case, error, allowed, status) for every entry on every usable kernel backend."""
    rows = []
    for entry in entries:
        for backend in kernel_backends():
            try:
                with fusenn.set_backend(backend):
                    checks = entry.validate()
            except fusenn.BackendError as exc:
                if "no " + backend + " implementation" in str(exc):
                    continue  # the op is not implemented on this backend: nothing to validate
                rows.append((entry.op, backend, "-", float("nan"), float("nan"), f"ERROR {exc}"))
                continue
            except Exception as exc:  # noqa: BLE001 - a crash is a failed validation, reported not raised
                traceback.print_exc()
                rows.append((entry.op, backend, "-", float("nan"), float("nan"), f"ERROR {exc!r}"[:80]))
                continue
            rows += [(entry.op, backend, c.case, c.error, c.allowed, "ok" if c.ok else "FAIL") for c in checks]
    return rows


def time_case(case, device):
    import triton.testing

    fns = case.setup(device)
    result = {}
    for impl, fn in fns.items():
        try:
            fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            peak = torch.cuda.max_memory_allocated() / 2**20
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot run this case is reported as such
            result[impl] = {"error": repr(exc)[:200]}
            continue
        row = {"ms": ms, "peak_mib": peak}
        if case.flops:
            row["tflops"] = case.flops / ms / 1e9
        if case.bytes:
            row["gbps"] = case.bytes / ms / 1e6
        result[impl] = row
    return result


def benchmark(entries, quick, out_dir, env):
    device = torch.device("cuda")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"]).strip("-").lower()
    table, bounds = [], []
    for entry in entries:
        records = []
        for case in entry.cases(quick):
            timings = time_case(case, device)
            records.append({"case": case.name, "flops": case.flops, "bytes": case.bytes, "bound": case.bound,
                            "timings": timings})
            if case.bound:
                bounds.append((case.name, case.bound))
            ours = timings.get("fusenn", {}).get("ms")
            for impl, t in timings.items():
                ratio = (t["ms"] / ours) if ours and "ms" in t else None
                table.append((entry.op, case.name, impl, t.get("ms"), t.get("tflops") or t.get("gbps"), ratio,
                              t.get("error")))
            torch.cuda.empty_cache()
        path = os.path.join(out_dir, slug, f"{entry.op}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"environment": env, "op": entry.op, "baselines": list(entry.baselines),
                       "quick": quick, "results": records}, f, indent=1)
        print(f"wrote {path}", file=sys.stderr)
    print(f"\n{'op':<18} {'case':<50} {'impl':<22} {'ms':>9} {'TFLOP/s|GB/s':>13} {'t/t_fusenn':>10}")
    for op, case, impl, ms, rate, ratio, err in table:
        if err:
            print(f"{op:<18} {case:<50} {impl:<22} {'n/a':>9}  {err[:60]}")
            continue
        print(f"{op:<18} {case:<50} {impl:<22} {ms:>9.4f} {rate or 0:>13.2f} {ratio or 0:>9.2f}x")
    for case, bound in bounds:
        print(f"bound {case:<50} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in bound.items()))


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo on Linux), else platform's answer."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def time_cpu_case(case, repeats, min_s, max_rounds=200, clock=None):
    """{impl: {"ms": min over rounds, "runs": rounds}}, the implementations interleaved (each round runs every
    one once, so load that comes and goes hits all alike): at least `repeats` rounds after a warm-up, more
    until min_s seconds have passed (short cases get many rounds, so the minimum finds a quiet moment).
    `clock` times each run (default time.perf_counter)."""
    import time

    clock = clock or time.perf_counter
    fns = case.setup(torch.device("cpu"))
    times, errors = {impl: [] for impl in fns}, {}
    start = time.perf_counter()
    for r in range(-1, max_rounds):  # -1: the warm-up round, not counted
        for impl, fn in fns.items():
            if impl in errors:
                continue
            try:
                t0 = clock()
                fn()
                took = clock() - t0
            except Exception as exc:  # noqa: BLE001 - a baseline that cannot run this case is reported as such
                errors[impl] = repr(exc)[:200]
                continue
            if r >= 0:
                times[impl].append(took * 1e3)
        if r + 1 >= repeats and time.perf_counter() - start > min_s:
            break
    return {impl: {"error": errors[impl]} if impl in errors else {"ms": min(t), "runs": len(t)}
            for impl, t in times.items()}


def benchmark_cpu(entries, quick, out_dir, env, threads):
    import time

    torch.set_num_threads(threads)
    # One thread: the CPU time of the thread that runs it all (page faults included), so that a run on a shared
    # machine does not count the time other processes held the core; more threads: wall-clock time.
    clock = time.thread_time if threads == 1 else time.perf_counter
    env = dict(env, processor=cpu_name(), machine=platform.machine(), threads=threads, clock=clock.__name__,
               backends={name: b.detail for name, b in fusenn.backends().items() if name in ("torch", "cpp")})
    slug = "cpu-" + re.sub(r"[^A-Za-z0-9]+", "-", env["processor"]).strip("-").lower()
    table = []
    for entry in entries:
        records = []
        for case in entry.cpu_cases(quick):
            timings = time_cpu_case(case, repeats=3 if quick else 5, min_s=0.5 if quick else 3.0, clock=clock)
            records.append({"case": case.name, "flops": case.flops, "bytes": case.bytes, "timings": timings})
            ours = timings.get("fusenn", {}).get("ms")
            for impl, t in timings.items():
                if impl != "fusenn":
                    ratio = ours / t["ms"] if ours and "ms" in t else None
                    table.append((entry.op, case.name, impl, ours, t.get("ms"), ratio, t.get("error")))
            print(f"timed {entry.op} {case.name}", file=sys.stderr, flush=True)
        if not records:
            continue
        path = os.path.join(out_dir, slug, f"{entry.op}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"environment": env, "op": entry.op, "quick": quick, "results": records}, f, indent=1)
        print(f"wrote {path}", file=sys.stderr)
    print(f"\nCPU ({env['processor']}, {threads} thread{'s' * (threads > 1)}): fusenn's time / the baseline's")
    print(f"{'op':<18} {'case':<44} {'baseline':<16} {'fusenn ms':>10} {'base ms':>10} {'ratio':>7}")
    for op, case, impl, ours, base, ratio, err in table:
        if err or ratio is None:
            print(f"{op:<18} {case:<44} {impl:<16} {'n/a':>10}  {(err or 'fusenn failed')[:60]}")
            continue
        print(f"{op:<18} {case:<44} {impl:<16} {ours:>10.2f} {base:>10.2f} {ratio:>7.2f}")
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes in the timed runs")
    parser.add_argument("--only", default="", help="comma-separated op names")
    parser.add_argument("--validate-only", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the CPU timing (default 1)")
    parser.add_argument("--static", action="store_true", help="the sm_90a compile report (benchmarks/static.py)")
    args, rest = parser.parse_known_args(argv)
    if args.static:
        from benchmarks import static

        return static.main(rest + ["--out", static.report_dir(args.out)])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    load_entries()
    wanted = [s for s in args.only.split(",") if s]
    unknown = set(wanted) - set(REGISTRY)
    if unknown:
        parser.error(f"unknown op(s) {sorted(unknown)}; registered: {sorted(REGISTRY)}")
    entries = [REGISTRY[name] for name in (wanted or sorted(REGISTRY))]
    env = environment()
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    if not kernel_backends():
        print("no kernel backend is usable here:", fusenn.backends())
        return 1

    rows = validate(entries)
    print(f"\n{'op':<18} {'backend':<8} {'case':<60} {'max error':>10} {'allowed':>10}  status")
    for op, backend, case, err, allowed, status in rows:
        print(f"{op:<18} {backend:<8} {case:<60} {err:>10.3g} {allowed:>10.3g}  {status}")
    failed = [r for r in rows if r[-1] != "ok"]
    print(f"\nvalidation: {len(rows) - len(failed)} passed, {len(failed)} failed")

    if torch.cuda.is_available() and not args.validate_only:
        benchmark(entries, args.quick, args.out, env)
    elif not args.validate_only:
        benchmark_cpu(entries, args.quick, args.out, env, args.threads)
    else:
        print("timing skipped (--validate-only)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
