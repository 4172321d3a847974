"""A forget request's walk through the code (issue 18: "from the CLI it enters 15 files, moves
between them 51 times and climbs back up 24 times"), traced by the interpreter instead of by hand.

Every process of the cluster (this driver, the run's coordinator, its shard actors) records, while
the bench says so, each call into a module of `pipeline/` with the nearest `pipeline/` frame that
called it (`sys.setprofile` and `threading.setprofile`, installed in Ray workers by a
`worker_process_setup_hook`: bench-side instrumentation, nothing in the product reads it). The run
is trained on digits first (tracking on, the coordinator kept alive), then one `dpsisa forget
--run-dir RUN --ids ID` is traced from `cli.main`. Counted over the distinct call edges seen
(function → function), so loops count once, as a reader walking the code would:

- files: the `pipeline/` files the request enters (in any process);
- moves: call edges from one file into another;
- climbs: moves into a file that is already on the call stack (the walk comes back up into a file
  it passed through: a callback, an observer, a verb calling the verb module back);
- hops: calls that arrive with no `pipeline/` caller in their thread (Ray actor calls, the CLI's entry;
  a thread's loop that was already running when tracing began is not counted again);
- entered: per file, the distinct edges that enter it (the issue's "runs.py entered 11 times").

The same script runs on older commits (it drives the CLI only), so before/after are traced alike:

    python bench/forget_path.py [--repo PATH_OF_A_CHECKOUT]

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = os.sep + "pipeline" + os.sep


def _trace_calls() -> None:
    """In every process: while $DPSISA_BENCH_TRACE names an existing folder, append one line per new
    call edge into pipeline/ to <folder>/<pid>."""
    import json
    import os
    import sys
    import threading
    import time

    folder = os.environ.get("DPSISA_BENCH_TRACE")
    if not folder or getattr(sys, "_dpsisa_traced", False):
        return
    sys._dpsisa_traced = True
    mark = os.sep + "pipeline" + os.sep
    seen: set = set()
    state = {"on": False, "checked": 0.0}
    lock = threading.Lock()

    def where(code) -> str | None:
        name = code.co_filename
        i = name.rfind(mark)
        return None if i < 0 else name[i + 1:]

    def profile(frame, event, arg):
        if event != "call":
            return
        now = time.monotonic()
        if now - state["checked"] > 0.2:
            state["checked"], state["on"] = now, os.path.isdir(os.environ.get("DPSISA_BENCH_TRACE", ""))
        if not state["on"]:
            return
        callee = where(frame.f_code)
        if callee is None:
            return
        caller, stack, f = None, [], frame.f_back
        while f is not None:
            file = where(f.f_code)
            if file is not None:
                if caller is None:
                    caller = (file, f.f_code.co_qualname)
                stack.append(file)
            f = f.f_back
        edge = (caller, (callee, frame.f_code.co_qualname), callee in stack[1:] if caller else False)
        if edge in seen:
            return
        with lock:
            seen.add(edge)
            with open(os.path.join(os.environ["DPSISA_BENCH_TRACE"], str(os.getpid())), "a") as handle:
                handle.write(json.dumps([edge[0], edge[1], edge[2]]) + "\n")

    sys.setprofile(profile)
    threading.setprofile(profile)
    try:  # actor methods run on threads Ray's core starts (not threading's): set the hook as each call begins
        from ray._private import function_manager
    except ImportError:
        return
    make = function_manager.FunctionActorManager._make_actor_method_executor

    def traced_executor(self, method_name, method):
        executor = make(self, method_name, method)

        def traced(*args, **kwargs):
            if sys.getprofile() is not profile:
                sys.setprofile(profile)
            return executor(*args, **kwargs)

        traced.name, traced.method = executor.name, executor.method
        return traced

    function_manager.FunctionActorManager._make_actor_method_executor = traced_executor


def _role(path: Path, lines: list[str]) -> str:
    if int(path.name) == os.getpid():
        return "client"
    return "shard" if any('shard.py", "Shard.' in line for line in lines) else "coordinator"


def _tally(folder: Path) -> dict:
    edges, climbs_seen, by_process = set(), [], {}
    for path in folder.iterdir():
        lines = path.read_text().splitlines()
        role, mine = _role(path, lines), set()
        for line in lines:
            caller, callee, climb = json.loads(line)
            edge = (tuple(caller) if caller else None, tuple(callee), climb)
            edges.add(edge)
            if caller and caller[0] != callee[0]:
                mine.add(edge)
                if climb:
                    climbs_seen.append(f"{caller[0]}:{caller[1]} → {callee[0]}:{callee[1]} ({role})")
        by_process[role] = by_process.get(role, 0) + len(mine)
    files = sorted({callee[0] for _, callee, _ in edges} | {caller[0] for caller, _, _ in edges if caller})
    moves = [(caller, callee, climb) for caller, callee, climb in edges if caller and caller[0] != callee[0]]
    entered: dict[str, int] = {}
    for _, callee, _ in moves:
        entered[callee[0]] = entered.get(callee[0], 0) + 1
    return {"files": len(files), "moves": len(moves), "climbs": sum(1 for *_, climb in moves if climb),
            "hops": sum(1 for caller, _, _ in edges if caller is None), "moves_by_process": by_process,
            "climb_edges": sorted(climbs_seen),
            "entered": dict(sorted(entered.items(), key=lambda kv: -kv[1])), "file_list": files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=str(ROOT), help="checkout whose pipeline/ is traced (default: this one)")
    parser.add_argument("--config", default="jobs/configs/digits.yaml")
    args = parser.parse_args()
    repo = Path(args.repo).resolve()
    sys.path.insert(0, str(repo))
    os.chdir(repo)
    stdout, sys.stdout = sys.stdout, sys.stderr  # stdout: the one JSON object
    home = Path(tempfile.mkdtemp(prefix="dpsisa-path-"))
    os.environ["DPSISA_HOME"] = str(home)
    folder = home / "trace"
    os.environ["DPSISA_BENCH_TRACE"] = str(folder)

    import ray

    ray.init(num_cpus=2, include_dashboard=False, namespace="dpsisa", configure_logging=False,
             runtime_env={"worker_process_setup_hook": _trace_calls,
                          "env_vars": {"DPSISA_BENCH_TRACE": str(folder), "PYTHONPATH": str(repo)}})
    _trace_calls()
    import importlib

    cli = importlib.import_module("pipeline.cli")
    run_dir = home / "run"
    cli.main(["train", args.config, "--run-dir", str(run_dir), "--keep-alive", "--quiet"])
    cli.main(["forget", "--run-dir", str(run_dir), "--ids", "3", "--quiet"])  # warm: everything imported, once
    time.sleep(0.5)
    folder.mkdir()
    time.sleep(0.5)  # every process sees the folder (checked every 0.2 s)
    started = time.monotonic()
    cli.main(["forget", "--run-dir", str(run_dir), "--ids", "5", "--quiet"])
    seconds = time.monotonic() - started
    time.sleep(0.5)
    os.environ["DPSISA_BENCH_TRACE"] = ""
    result = _tally(folder)
    done = folder.with_name("trace-done")
    folder.rename(done)  # tracing stops in every process
    cli.main(["stop", "--run-dir", str(run_dir), "--quiet"])
    commit = os.popen(f"git -C {repo} rev-parse --short HEAD 2>/dev/null").read().strip()
    print(json.dumps({"bench": "forget_path", "commit": commit, **result, "seconds": round(seconds, 1),
                      "machine": f"{os.cpu_count()} CPUs"}), file=stdout)


if __name__ == "__main__":
    main()
