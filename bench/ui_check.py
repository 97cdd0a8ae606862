"""The Prefect UI as a new user sees a cohort run, checked in a real headless browser.

Starts ``prefect server start`` on 127.0.0.1 (its own PREFECT_HOME, analytics off) as a separate process,
runs ``equislide segment`` on a small phantom TMA plus a file that is not a slide against it, then drives
headless Chromium (Playwright with the system's Debian ``chromium``, no browser download) through the
flow run page, its artifacts tab, the summary markdown artifact and the per-sample table artifact,
saving a screenshot of each, and asserts what a user would check by eye: the state name and message,
thumbnails that load (``naturalWidth > 0``), one table row per sample. Every process it started is
stopped at the end.

    python bench/ui_check.py [--out FOLDER] [--chromium /usr/lib/chromium/chromium]

Needs ``pip install playwright`` (the dev extra) and ``apt-get install chromium``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SEGMENT = ["--mpp", "5", "--tile", "128", "--halo", "16", "--layer", "3", "--width", "8", "--workers", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _wait_healthy(api: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"prefect server exited with {proc.returncode}")
        try:
            _api(api, "/health")
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"prefect server not healthy after {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def check(out: Path, chromium: str) -> dict:
    from playwright.sync_api import sync_playwright

    from equislide.tiling import write_phantom

    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="equislide-ui-"))
    port = _free_port()
    base, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(work / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": api,
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=open(work / "server.log", "wb"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    found: dict = {"screenshots": str(out)}
    try:
        _wait_healthy(api, server)
        phantom = write_phantom(work / "tma.tiff", cores=6, core_diameter_um=800.0, seed=3).image_path
        broken = work / "broken.svs"
        broken.write_bytes(b"this is not a slide\n")
        t0 = time.perf_counter()
        seg = subprocess.run(
            [
                sys.executable,
                "-m",
                "equislide",
                "segment",
                str(phantom),
                str(broken),
                "--out",
                str(work / "run"),
            ]
            + SEGMENT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        found["segment_exit"], found["segment_s"] = seg.returncode, round(time.perf_counter() - t0, 1)
        assert seg.returncode == 1, seg.stderr[-2000:]  # one input failed, as planned
        report = json.loads((work / "run" / "run.json").read_text())
        (run,) = _api(api, "/flow_runs/filter", {"limit": 5})
        found["state"] = f"{run['state']['type']} / {run['state']['name']} / {run['state']['message']}"
        artifacts = _api(api, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
        by_key = {a["key"]: a for a in artifacts}
        found["artifacts"] = sorted(f"{a['key']} ({a['type']})" for a in artifacts)
        tasks = _api(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
        found["task_runs"] = sorted(t["name"] for t in tasks)

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})

            def shot(path: str, name: str, wait_for: str) -> str:
                page.goto(base + path, wait_until="networkidle")
                page.get_by_text(wait_for, exact=False).first.wait_for(timeout=30000)
                page.wait_for_timeout(1500)  # charts and images settle
                page.screenshot(path=str(out / name), full_page=True)
                return page.inner_text("body")

            shot(f"/v2/runs/flow-run/{run['id']}", "1-flow-run.png", "Completed with failures")
            shot(f"/v2/runs/flow-run/{run['id']}?tab=Artifacts", "2-artifacts-tab.png", "equislide-summary")
            shot(f"/v2/artifacts/artifact/{by_key['equislide-summary']['id']}", "3-summary.png", "equislide")
            images = page.eval_on_selector_all(
                "img[src^='data:image']", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])"
            )
            found["thumbnails"] = images
            text = shot(
                f"/v2/artifacts/artifact/{by_key['equislide-samples']['id']}", "4-table.png", "sample"
            )
            # The page's side panel shows the flow run's state message (no log lines on this page).
            found["state_message_shown"] = "State Message\n1 of 2 inputs failed" in text
            found["table_rows"] = page.eval_on_selector_all("table tbody tr", "els => els.length")
            shot(
                f"/v2/artifacts/artifact/{by_key['equislide-progress']['id']}", "5-progress.png", "equislide"
            )
            browser.close()
        done = [s for s in report["samples"].values() if s["status"] == "done"]
        found["samples"], found["samples_done"] = len(report["samples"]), len(done)
        assert found["state_message_shown"], "the UI does not show the state's message"
        assert len(images) == len(done) and all(c and w > 0 and h > 0 for c, w, h in images), images
        assert found["table_rows"] == len(report["samples"]), found
        assert run["state"]["name"] == "Completed with failures", run["state"]
    finally:
        _stop(server)
        shutil.rmtree(work, ignore_errors=True)  # the screenshots stay in `out`
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "equislide-ui-check")
    parser.add_argument("--chromium", default="/usr/lib/chromium/chromium")
    args = parser.parse_args()
    print(json.dumps(check(args.out, args.chromium), indent=1))
    print(f"screenshots in {args.out}")


if __name__ == "__main__":
    main()
