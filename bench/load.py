"""Load held: phantom TMA cohorts through ``equislide segment`` against a real Prefect server.

Run by hand::

    python bench/load.py                 # 50 vs 200 cores of 400 µm, then 1000 cores of 300 µm
    python bench/load.py --quick         # 8 vs 16 cores, then 32 of 300 µm
    python bench/load.py --sizes 50 200 --tiny 200 1000 --core-um 600 --workers 2 --json load.json

What runs:

- One ``prefect server start --host 127.0.0.1 --port <free>`` as its own process group (its own
  temporary ``PREFECT_HOME``, SQLite, analytics off, ``PREFECT_SERVER_LOGGING_LEVEL=INFO`` so uvicorn
  logs every HTTP request); the bench waits for ``/api/health`` and kills the group at the end, also
  when a run fails.
- Phantom TMA slides made by ``equislide phantom`` (25 cores a slide, none missing, so every core is a
  sample), several slides per cohort. A first small cohort (one slide of 4 cores) writes the backbone
  checkpoint that every measured run is given with ``--weights`` (the production path: no BatchNorm
  calibration, a fixed cost that would flatter the larger cohort) and warms the file cache.
- Each cohort: ``equislide segment SLIDES --out DIR --workers N --weights W`` as a subprocess (own
  process group) with ``PREFECT_API_URL`` naming the server; every 0.5 s psutil reads the resident set of
  the flow process and of each of its descendants (Dask worker processes: the spawned ones) and of the
  server's process tree, keeping per-process peaks.
- Checked after each cohort: ``run.json`` sample IDs against the phantom's cores (lost, extra;
  ``run.json`` holds a mapping, so a sample written twice under one ID shows in the task runs instead:
  the samples covered by the ``segment`` task runs' names, ``first .. last (n)``, must add up to the
  samples once), every sample's OME-Zarr, PNG and GeoJSON present, failures, the lines saying
  "database is locked" in the server's log and in the flow's output; read back through the Prefect API:
  the flow run's final state, its task runs (total, per task name, per sample) and the events that name
  the flow run; the server's HTTP requests during the run (uvicorn access-log lines).

Cores are 400 µm (160 px at the analysis 2.5 µm/px, one tile each). The second part repeats the same
at ``--tiny`` sizes with 300 µm cores (the smallest tried that dearrays: phantom cores of 200 µm were not
dearrayed, the slide became one whole-slide sample) to count task runs, HTTP requests and
events per sample at 1000 samples without the feature work of 1000 larger cores, and analysed with
``--tiny-args`` (default ``--mpp 10 --width 8``: 30 px cores, a thin network with random weights
calibrated in the run): those counts depend on the number of samples, slides and workers, not on the
pixels or the network. Its throughput is not comparable with the first part's.

Throughput is samples over the flow's own wall time (``run.json`` ``timings.total_s``, cluster start
included); the machine it runs on may be shared: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

CORES_PER_SLIDE = 25
LOCKED = re.compile(r"database is locked", re.IGNORECASE)
DONE_LINE = re.compile(r" - (tiling|features|segmenting) (\S+): \d+\.\d+ s$", re.MULTILINE)
ACCESS = re.compile(r'"(?:GET|POST|PATCH|PUT|DELETE) /api/')


def _tool(name: str) -> str:
    """A console script of this venv (beside the interpreter), else from PATH."""
    here = Path(sys.executable).with_name(name)
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        sys.exit(f"bench/load.py: `{name}` not found beside {sys.executable} or on PATH")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL what is left after 10 s."""
    if proc.poll() is not None and not _group_alive(proc.pid):
        return
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_alive(proc.pid):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
        if not _group_alive(proc.pid):
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class Server:
    """A real ``prefect server start`` on loopback, its log in a file."""

    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.home = root / "server-home"
        self.home.mkdir()
        self.log = root / "server.log"
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_LOGGING_LEVEL": "INFO",  # uvicorn's access log: one line per HTTP request
        }
        env.pop("PREFECT_API_URL", None)
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [_tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def wait_healthy(self, timeout: float = 180.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited ({self.proc.returncode}): {self.tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
            time.sleep(0.5)
        raise RuntimeError(f"prefect server not healthy after {timeout:.0f} s: {self.tail()}")

    def lines(self) -> list[str]:
        return self.log.read_text(encoding="utf-8", errors="replace").splitlines()

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.lines()[-n:])

    def stop(self) -> None:
        _kill_group(self.proc)
        self._out.close()


class Sampler(threading.Thread):
    """Every 0.5 s: resident set of the flow process, of each Dask worker process (a direct child spawned
    by LocalCluster's nannies, which live in the flow process) with and without its descendants (the
    forkserver and the per-task processes that run budgeted stages), and of the server's process tree."""

    def __init__(self, flow_pid: int, server_pid: int) -> None:
        super().__init__(daemon=True)
        self.flow_pid, self.server_pid = flow_pid, server_pid
        self.flow_peak = 0
        self.server_peak = 0
        self.workers: dict[int, dict] = {}  # pid -> {"own": peak, "tree": peak of the sum}
        self.stage_peak = 0  # largest single process under a worker
        self.stage_pids: set[int] = set()
        self.stop_event = threading.Event()

    @staticmethod
    def _rss(p: psutil.Process) -> int:
        try:
            return p.memory_info().rss
        except psutil.Error:
            return 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            with contextlib.suppress(psutil.Error):
                flow = psutil.Process(self.flow_pid)
                self.flow_peak = max(self.flow_peak, self._rss(flow))
                for c in flow.children():
                    with contextlib.suppress(psutil.Error):
                        if "spawn_main" not in " ".join(c.cmdline()):
                            continue  # multiprocessing's resource tracker
                        own, rec = self._rss(c), self.workers.setdefault(c.pid, {"own": 0, "tree": 0})
                        tree = own
                        for g in c.children(recursive=True):
                            rss = self._rss(g)
                            tree += rss
                            self.stage_peak = max(self.stage_peak, rss)
                            self.stage_pids.add(g.pid)
                        rec["own"], rec["tree"] = max(rec["own"], own), max(rec["tree"], tree)
            with contextlib.suppress(psutil.Error):
                srv = psutil.Process(self.server_pid)
                rss = self._rss(srv) + sum(self._rss(c) for c in srv.children(recursive=True))
                self.server_peak = max(self.server_peak, rss)
            self.stop_event.wait(0.5)


def make_slides(folder: Path, samples: int, core_um: float) -> tuple[list[Path], set[str]]:
    """Phantom TMAs of up to 25 cores (none missing) adding up to ``samples`` cores; the expected IDs."""
    folder.mkdir(parents=True, exist_ok=True)
    slides, expected = [], set()
    left, i = samples, 0
    while left > 0:
        n = min(CORES_PER_SLIDE, left)
        # Named by what makes it (seed = index, cores): a larger cohort of one core size reuses the
        # smaller one's slides (a phantom TMA takes a minute to make on a loaded 2-core machine).
        path = folder / f"tma{i:03d}-{n}.tiff"
        if not path.with_suffix(".json").exists():
            subprocess.run(
                [_tool("equislide"), "phantom", str(path), "--cores", str(n), "--missing", "0",
                 "--seed", str(i), "--core-diameter-um", str(core_um)],
                check=True, capture_output=True,
            )  # fmt: skip
        info = json.loads(path.with_suffix(".json").read_text())
        expected |= {f"{path.stem}/{c['name']}" for c in info["cores"] if not c.get("missing")}
        slides.append(path)
        left -= n
        i += 1
    return slides, expected


def _api_counts(url: str, since: float) -> dict:
    """The flow run started after ``since`` (epoch s): final state, task runs by name, events naming it.
    Waits until the task-run count is stable: the server records task runs from events, after the fact."""
    os.environ["PREFECT_API_URL"] = url
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = [
            r for r in client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=20)
            if r.created is not None and r.created.timestamp() >= since - 1
        ]  # fmt: skip
        if len(runs) != 1:
            return {"error": f"{len(runs)} flow runs created during the cohort, expected 1"}
        run = runs[0]
        flt = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        stable, last = 0, -1
        for _ in range(60):
            task_runs, offset = [], 0
            while True:
                page = client.read_task_runs(flow_run_filter=flt, limit=200, offset=offset)
                task_runs += page
                if len(page) < 200:
                    break
                offset += 200
            stable = stable + 1 if len(task_runs) == last else 0
            last = len(task_runs)
            if stable >= 2:
                break
            time.sleep(1.0)
        by_name: dict[str, int] = {}
        covered = 0
        states: dict[str, int] = {}
        for t in task_runs:
            base = t.name.split(" ", 1)[0].rsplit("-", 1)[0]
            by_name[base] = by_name.get(base, 0) + 1
            st = t.state.type.value if t.state else "NONE"
            states[st] = states.get(st, 0) + 1
            if base == "segment":
                m = re.search(r"\((\d+) samples?\)$", t.name)
                covered += int(m.group(1)) if m else 1
        events = None
        with contextlib.suppress(Exception):
            resp = client._client.post(
                "/events/filter",
                json={
                    "filter": {
                        "any_resource": {"id": [f"prefect.flow-run.{run.id}"]},
                        "occurred": {"since": run.created.isoformat()},
                    },
                    "limit": 1,
                },
            )
            events = resp.json().get("total")
        return {
            "flow_run": str(run.id),
            "state": f"{run.state.type.value} / {run.state.name}" if run.state else "?",
            "message": (run.state.message or "") if run.state else "",
            "task_runs": len(task_runs),
            "task_runs_by_name": dict(sorted(by_name.items())),
            "task_run_states": states,
            "segment_samples_covered": covered,
            "events": events,
        }


def run_cohort(
    name: str, slides: list[Path], expected: set[str], out: Path, server: Server, workers: int,
    weights: str | None, client_home: Path, timeout: float, extra: list[str] | None = None,
) -> dict:  # fmt: skip
    cmd = [_tool("equislide"), "segment", *map(str, slides), "--out", str(out), "--workers", str(workers)]
    cmd += extra or []
    if weights:
        cmd += ["--weights", weights]
    env = {
        **os.environ,
        "PREFECT_API_URL": server.url,
        "PREFECT_HOME": str(client_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONWARNINGS": "ignore",
    }
    log_path = out.parent / f"{out.name}.log"
    before = len(server.lines())
    since = time.time()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        sampler = Sampler(proc.pid, server.proc.pid)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _kill_group(proc)  # also any worker left behind
            sampler.stop_event.set()
            sampler.join()
    wall = time.perf_counter() - t0
    server_lines = server.lines()[before:]
    flow_log = log_path.read_text(encoding="utf-8", errors="replace")
    if rc is None:
        raise RuntimeError(f"{name}: `equislide segment` ran past {timeout:.0f} s (log {log_path})")
    run_json = out / "run.json"
    if not run_json.exists():
        raise RuntimeError(f"{name}: no run.json (exit {rc}); last lines:\n{flow_log[-3000:]}")
    doc = json.loads(run_json.read_text())
    samples = doc.get("samples", {})
    got = set(samples)
    failed = sorted(s for s, v in samples.items() if v.get("status") != "done")
    missing_out = []
    for sid, v in sorted(samples.items()):
        outs = v.get("outputs") or {}
        need = [outs.get(k) for k in ("ome_zarr", "overlay_png", "geojson")]
        if not all(p and Path(p).exists() for p in need):
            missing_out.append(sid)
    api = _api_counts(server.url, since)
    # Each stage logs one line per sample it finished ("segmenting tma000/A1: 0.31 s"): a sample run
    # twice (a group retried after it had finished it, a unit given twice) shows as a second line.
    runs: dict[str, dict[str, int]] = {}
    for verb, sid in DONE_LINE.findall(flow_log):
        stage_runs = runs.setdefault(verb, {})
        stage_runs[sid] = stage_runs.get(sid, 0) + 1
    twice = {verb: sorted(s for s, k in r.items() if k > 1) for verb, r in runs.items()}
    n = len(samples) or 1
    flow_s = doc.get("timings", {}).get("total_s", wall)
    workers = sorted(sampler.workers.values(), key=lambda r: -r["tree"])
    workers_n = int((doc.get("device") or {}).get("workers") or len(workers) or 1)
    return {
        "name": name,
        "slides": len(slides),
        "inputs": len(expected),
        "samples": len(samples),
        "exit": rc,
        "wall_s": wall,
        "flow_s": flow_s,
        "samples_per_min": 60.0 * len(samples) / flow_s if flow_s else 0.0,
        "flow_mb": sampler.flow_peak / 2**20,
        "worker_mb": [w["own"] / 2**20 for w in workers],
        "worker_tree_mb": [w["tree"] / 2**20 for w in workers],
        "stage_process_mb": sampler.stage_peak / 2**20,
        "stage_processes": len(sampler.stage_pids),
        "server_mb": sampler.server_peak / 2**20,
        "lost": sorted(expected - got),
        "extra": sorted(got - expected),
        "failed": failed,
        "ran_twice": {verb: sids for verb, sids in twice.items() if sids},
        "ran_once": {verb: sum(1 for k in r.values() if k == 1) for verb, r in runs.items()},
        "missing_outputs": missing_out,
        "locked_server": sum(bool(LOCKED.search(x)) for x in server_lines),
        "locked_flow": len(LOCKED.findall(flow_log)),
        "http_requests": sum(bool(ACCESS.search(x)) for x in server_lines),
        "http_per_sample": sum(bool(ACCESS.search(x)) for x in server_lines) / n,
        "task_runs_per_sample": api.get("task_runs", 0) / n,
        "events_per_sample": (api["events"] / n) if api.get("events") is not None else None,
        "load": load,
        # Worker-seconds a sample costs per stage: the stage's wall time times the workers, over the
        # samples (what a tiny sample's fixed costs show up in; run.json's per-sample seconds are
        # measured inside the stage call and miss its child's start and imports).
        "worker_s_per_sample": {
            k.removesuffix("_s"): v * workers_n / n
            for k, v in doc.get("timings", {}).items()
            if k in ("tile_s", "features_s", "segment_s")
        },
        "api": api,
        "timings": doc.get("timings", {}),
    }


def _ok(r: dict) -> bool:
    clean = not (r["lost"] or r["extra"] or r["failed"] or r["missing_outputs"] or r["ran_twice"])
    clean = clean and all(r["ran_once"].get(v) == r["samples"] for v in ("features", "segmenting"))
    return clean and r["api"].get("segment_samples_covered") == r["samples"]


def _row(r: dict) -> str:
    own, tree = max(r["worker_mb"] or [0]), max(r["worker_tree_mb"] or [0])
    ev = r["events_per_sample"]
    return (
        f"{r['name']:10s}{r['slides']:>7d}{r['samples']:>8d}{r['flow_s']:>8.1f}{r['wall_s']:>8.1f}"
        f"{r['samples_per_min']:>9.1f}{r['flow_mb']:>8.0f}{own:>8.0f}{tree:>8.0f}{len(r['worker_mb']):>3d}"
        f"{r['stage_process_mb']:>7.0f}{r['server_mb']:>7.0f}{r['api'].get('task_runs', 0):>6d}"
        f"{r['task_runs_per_sample']:>7.3f}{r['http_per_sample']:>7.2f}"
        f"{ev if ev is not None else float('nan'):>7.2f}{r['locked_server'] + r['locked_flow']:>7d}"
        f"{'ok' if _ok(r) else 'CHECK':>6s}{r['load']:>6.1f}"
    )


HEADER = (
    f"{'cohort':10s}{'slides':>7s}{'samples':>8s}{'flow s':>8s}{'wall s':>8s}{'samp/min':>9s}"
    f"{'flow MB':>8s}{'wrk MB':>8s}{'wrk+ MB':>8s}{'#w':>3s}{'stg MB':>7s}{'srv MB':>7s}{'tasks':>6s}"
    f"{'task/s':>7s}{'HTTP/s':>7s}{'evt/s':>7s}{'locked':>7s}{'ids':>6s}{'load':>6s}"
)

LEGEND = """\
flow s: run.json timings.total_s (cluster start included); samp/min: samples / flow s; flow MB: peak RSS
of the `segment` process (Prefect flow, Dask client and nannies); wrk MB: largest Dask worker process
alone, wrk+ MB: with its forkserver and per-task stage processes (peak of the sum), #w: worker processes;
stg MB: largest single per-task stage process; srv MB: the Prefect server's process tree; tasks: task
runs of the flow run read through the API, task/s: per sample; HTTP/s: uvicorn access-log lines during
the run per sample; evt/s: events naming the flow run per sample (task-run state changes travel as
events over one websocket, not as HTTP calls); locked: 'database is locked' lines (server log + flow
output); ids ok: no lost, extra or failed sample, every OME-Zarr / PNG / GeoJSON present, and the
segment task runs cover the samples exactly once."""


def _ratio(a: dict, b: dict) -> str:
    def q(x: float, y: float) -> str:
        return f"{x / y:.2f}" if y else "n/a"

    wa, wb = max(a["worker_tree_mb"] or [0]), max(b["worker_tree_mb"] or [0])
    return (
        f"{b['name']} / {a['name']}: samples {q(b['samples'], a['samples'])}x, samples/min "
        f"{q(b['samples_per_min'], a['samples_per_min'])}, flow MB {q(b['flow_mb'], a['flow_mb'])}, "
        f"worker+ MB {q(wb, wa)}, server MB {q(b['server_mb'], a['server_mb'])}, task runs/sample "
        f"{q(b['task_runs_per_sample'], a['task_runs_per_sample'])}, HTTP/sample "
        f"{q(b['http_per_sample'], a['http_per_sample'])}"
    )


def _details(r: dict) -> str:
    api = r["api"]
    state = api.get("state", api.get("error"))
    return "\n".join(
        [
            f"  {r['name']}: exit {r['exit']}, flow run {state}"
            + (f" ({api['message']})" if api.get("message") else ""),
            f"    task runs by name {api.get('task_runs_by_name')}, states {api.get('task_run_states')}, "
            f"segment task runs cover {api.get('segment_samples_covered')} samples; "
            f"HTTP requests {r['http_requests']}, events {api.get('events')}",
            f"    samples finished once per stage (flow log) {r['ran_once']}, "
            f"twice {r['ran_twice'] or 'none'}",
            f"    lost {len(r['lost'])}, extra {len(r['extra'])}, failed {len(r['failed'])}, outputs "
            f"missing {len(r['missing_outputs'])}; 'database is locked': server {r['locked_server']}, "
            f"flow {r['locked_flow']}",
            f"    worker MB alone {[round(x) for x in r['worker_mb']]}, with children "
            f"{[round(x) for x in r['worker_tree_mb']]}; {r['stage_processes']} stage processes; stages "
            + " ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in r["timings"].items()),
            "    worker-seconds per sample: "
            + ", ".join(f"{k} {v:.2f}" for k, v in r.get("worker_s_per_sample", {}).items()),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[50, 200], help="cores, --core-um each")
    parser.add_argument("--tiny", type=int, nargs="*", default=[1000], help="cores, --tiny-core-um each")
    parser.add_argument("--core-um", type=float, default=400.0, help="core diameter (default 400 µm)")
    parser.add_argument("--tiny-core-um", type=float, default=300.0, help="default 300 µm")
    parser.add_argument(
        "--tiny-args",
        default="--mpp 10 --width 8",
        help="segment options of the tiny cohorts (default '--mpp 10 --width 8': 30 px cores, a thin net; "
        "random weights, calibrated in the run)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one cohort may take")
    parser.add_argument("--quick", action="store_true", help="8 vs 16 cores, tiny 32")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--keep", type=Path, help="keep slides, runs and logs here (default: temporary)")
    args = parser.parse_args()
    sizes, tiny = ([8, 16], [32]) if args.quick else (args.sizes, args.tiny)

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="equislide-load-"))
    root.mkdir(parents=True, exist_ok=True)
    client_home = root / "client-home"
    client_home.mkdir(exist_ok=True)
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs, {args.workers} workers; load average {load:.2f}; files in {root}")
    server = Server(root)
    results: list[dict] = []
    try:
        print(f"prefect server on {server.url}, healthy after {server.wait_healthy():.1f} s", flush=True)
        weights = None
        if sizes:
            warm_slides, warm_ids = make_slides(root / "slides-warm", 4, args.core_um)
            warm = run_cohort("warm-up", warm_slides, warm_ids, root / "run-warm", server, args.workers,
                              None, client_home, args.timeout)  # fmt: skip
            weights = str(sorted((root / "run-warm" / "models").glob("backbone-*.safetensors"))[0])
            print(f"warm-up (random weights, calibrated; only to write the weights): {warm['flow_s']:.1f} s; "
                  f"weights {Path(weights).name}", flush=True)  # fmt: skip
        print(HEADER, flush=True)
        parts = (
            ("", sizes, args.core_um, weights, []),
            ("tiny ", tiny, args.tiny_core_um, None, shlex.split(args.tiny_args)),
        )
        for label, ns, core_um, given, extra in parts:
            for n in ns:
                name = f"{label}{n}"
                tag = name.replace(" ", "-")
                slides, ids = make_slides(root / f"slides-{core_um:g}um", n, core_um)
                r = run_cohort(name, slides, ids, root / f"run-{tag}", server, args.workers, given,
                               client_home, args.timeout, extra)  # fmt: skip
                r["segment_args"] = extra + (["--weights", "(warm-up's)"] if given else [])
                r["core_um"] = core_um
                print(_row(r), flush=True)
                results.append(r)
        print()
        for a, b in itertools.pairwise(results):
            print("ratio " + _ratio(a, b))
        print("\ndetails")
        for r in results:
            print(_details(r))
        total_locked = sum(bool(LOCKED.search(x)) for x in server.lines())
        print(f"'database is locked' in the whole server log: {total_locked}")
        print(LEGEND)
    finally:
        server.stop()
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
