"""What the GPU benchmarks (qlora_gpu.py, speed_gpu.py, fsdp_gpu.py) share: running their cases, the environment.

Each script lists its cases and measures one in a child process (``--run-case NAME --json PATH``, ``run_child``).
``run_cases`` runs the children under a time budget and writes ``<stem>.log``, ``<stem>.json`` (``env``, ``smoke``,
``layers``, ``cases``, ``command``, then the script's summary keys) and ``<stem>.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch

GIB = 1 << 30
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "triton")


def version(package: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def environment(extra_packages: Iterable[str] = ()) -> dict:
    """Date, versions, GPU and allocator setting; the versions of ``extra_packages`` last (``-`` read as ``_``)."""
    env = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
           **{name: version(name) for name in PACKAGES},
           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    if torch.cuda.is_available():
        env["gpu_mem_gib"] = torch.cuda.get_device_properties(0).total_memory / GIB
    env.update({name.replace("-", "_"): version(name) for name in extra_packages})
    return env


def parser(doc: str, cases: list, budget: float, budget_help: str = "seconds for all cases; optional ones are skipped",
           smoke_help: str = "tiny shapes: checks the script end to end (CPU is fine)") -> argparse.ArgumentParser:
    """The options every script has: --smoke, --layers, --cases, --out, --budget, and the child's two."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument("--layers", type=int, help="override the number of decoder layers (real widths)")
    p.add_argument("--cases", help=f"comma-separated subset of: {', '.join(c.name for c in cases)}")
    p.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).resolve().parent / "results")))
    p.add_argument("--budget", type=float, default=budget, help=budget_help)
    p.add_argument("--run-case", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    return p


def selected(cases: list, names: str | None) -> list:
    """The cases named in a comma-separated list (all when None), in the script's order."""
    return [c for c in cases if c.name in names.split(",")] if names else list(cases)


def child_args(script: str, case, json_path: Path, args: argparse.Namespace, options: Iterable[str]) -> list[str]:
    """``script --run-case NAME --json PATH`` and those ``options`` that are set in ``args`` (True: a flag)."""
    out = [script, "--run-case", case.name, "--json", str(json_path)]
    for option in options:
        value = getattr(args, option)
        if value is True:
            out.append(f"--{option}")
        elif value:
            out += [f"--{option}", str(value)]
    return out


def run_child(args: argparse.Namespace, cases: list, measure: Callable[[object], dict | None]) -> int:
    """The child's side: measure the case ``--run-case`` names, write its record (if it returns one) to ``--json``."""
    rec = measure(next(c for c in cases if c.name == args.run_case))
    if rec is not None:
        Path(args.json).write_text(json.dumps(rec, indent=1))
    return 0


def run_cases(args: argparse.Namespace, script: str, env_record: dict, cases: Iterable,
              make_command: Callable[[object, Path], list[str]], summary_line: Callable[[dict], str],
              markdown: Callable[[dict], str], summarize: Callable[[dict], dict] | None = None, *,
              env: dict | None = None, reserve: float = 20, skip: Callable[[object], str | None] | None = None,
              merge: Callable[[dict | None, dict], dict] | None = None) -> dict:
    """Run every case in its own process (``make_command(case, json_path)``) and return the results record.

    A case listed again is a repeat (round 2, ...): it runs if the first run succeeded, and ``merge(first, rec)``
    (which also gets each first run, as ``merge(None, rec)``) decides what is kept. A first run is skipped, with
    the reason, when ``skip(case)`` gives one, when less than ``reserve`` seconds of ``--budget`` are left, or, for
    an ``optional`` case, less than 1.5 × its ``seconds``. A child may use what is left but 5 s. At the end
    ``summarize(results["cases"])`` adds its keys and ``markdown(results)`` is written and printed.
    """
    out_dir, stem = Path(args.out), Path(script).stem
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"env": env_record, "smoke": args.smoke, "layers": args.layers, "cases": {},
               "command": " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]])}
    scratch = Path(tempfile.mkdtemp(prefix=f"{stem}_"))
    start, rounds = time.perf_counter(), {}
    with (out_dir / f"{stem}.log").open("w") as log_file:
        for case in cases:
            r = rounds[case.name] = rounds.get(case.name, -1) + 1
            first = results["cases"].get(case.name)
            if r and ("error" in first or "skipped" in first):
                continue
            left = args.budget - (time.perf_counter() - start)
            why = skip(case) if skip else None
            if not why and (getattr(case, "optional", False) and left < case.seconds * 1.5 or left < reserve):
                why = f"time budget ({left:.0f} s left)"
            if why:
                if not r:
                    results["cases"][case.name] = {"case": asdict(case), "skipped": why}
                continue
            path = scratch / f"{case.name}.json"
            t0 = time.perf_counter()
            print(f"[bench] {case.name} ...", flush=True)
            try:
                proc = subprocess.run(make_command(case, path), env=env, timeout=max(10, left - 5),
                                      capture_output=True, text=True)
                log = proc.stdout + proc.stderr
                rec = json.loads(path.read_text()) if proc.returncode == 0 and path.exists() else {
                    "error": f"exit {proc.returncode}", "log_tail": log[-3000:]}
            except subprocess.TimeoutExpired as e:
                log = str(e.stdout or "") + str(e.stderr or "")
                rec = {"error": "timeout", "log_tail": log[-3000:]}
            rec["case"], rec["wall_s"] = asdict(case), time.perf_counter() - t0
            log_file.write(f"=== {case.name}{f' (round {r + 1})' if r else ''}\n{log}\n")
            log_file.flush()
            results["cases"][case.name] = merge(first, rec) if merge else rec
            line = f"ERROR {rec['error']}" if "error" in rec else summary_line(rec)
            print(f"[bench] {case.name}: {line} ({rec['wall_s']:.0f} s)", flush=True)
            if "error" in rec:
                print(rec.get("log_tail", ""), flush=True)
            (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1))
    results.update(summarize(results["cases"]) if summarize else {})
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1))
    text = markdown(results)
    (out_dir / f"{stem}.md").write_text(text)
    print(text)
    return results


def measured_pairs(cases: dict, pairs: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str, dict, dict]]:
    """(name, other name, record, other record) for each pair of cases that both measured tokens/s."""
    for one, two in pairs:
        a, b = cases.get(one, {}), cases.get(two, {})
        if "tokens_per_s" in a and "tokens_per_s" in b:
            yield one, two, a, b


def ratios(a: dict, b: dict) -> dict:
    """Speed and peak memory of record ``a`` relative to ``b``."""
    return {"speed_ratio": a["tokens_per_s"] / b["tokens_per_s"],
            "peak_ratio": a["peak_gib"] / b["peak_gib"] if b.get("peak_gib") else None}


def heading(results: dict, title: str, reproduce_note: str = "", smoke_note: str = "tiny shapes") -> list[str]:
    """The Markdown lines above the tables: ``title`` (+ smoke / layers notes) and the command to reproduce."""
    smoke = f" — SMOKE ({smoke_note})" if results["smoke"] else ""
    layers = f" — {results['layers']} layers only" if results["layers"] else ""
    return [title + smoke + layers, "", f"Reproduce: `{results['command']}`{reproduce_note}", ""]


def fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def pct(x) -> str:
    return "-" if x is None else f"{x:+.1f}%"


def gib_text(x) -> str:
    return "-" if x is None else f"{x:.2f} GiB"
