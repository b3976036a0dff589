"""Soak the demo: N sequential requests, reporting the server's memory and disk every 20.

    python scripts/soak.py --requests 200                 # shapes-llava, a new client session per request
    python scripts/soak.py --requests 200 --sessions one  # one session for all requests
    python scripts/soak.py --json runs/soak.json

Starts `python app.py` in a subprocess on a free loopback port with its own GRADIO_TEMP_DIR (so the
folder sizes are this server's alone), sends the default example through gradio_client's /compare,
checks every answer is complete, and prints one row per `--every` requests: the server's RSS and
the size and file count of its temp folder (Gradio's cache, which holds the uploads and the app's
output files). Not part of CI: it takes minutes. Exit status 1 if a request failed or, with
`--max-growth-mb`, if RSS grew by more than that after the first `--every` requests.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def folder_usage(folder: Path) -> tuple[int, float]:
    """(number of files, total MB) under `folder`."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files if p.exists()) / 2**20


def start_server(model: str, port: int, temp: Path, threads: int) -> subprocess.Popen:
    env = dict(os.environ, GRADIO_TEMP_DIR=str(temp), GRADIO_ANALYTICS_ENABLED="False")
    command = [sys.executable, str(ROOT / "app.py"), "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    if threads:
        command += ["--threads", str(threads)]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_until_up(url: str, server: subprocess.Popen, timeout_s: float = 180) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the app exited while starting:\n" + server.stderr.read().decode()[-3000:])
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the app did not answer at {url} within {timeout_s:.0f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--every", type=int, default=20, help="report every this many requests")
    parser.add_argument("--model", default="shapes-llava")
    parser.add_argument("--sessions", choices=["each", "one"], default="each",
                        help="a new client session per request (many visitors) or one for all")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--max-growth-mb", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    from gradio_client import Client, handle_file
    sys.path.insert(0, str(ROOT))
    from components.examples import example_rows

    image, question = example_rows()[0][:2]
    temp = Path(tempfile.mkdtemp(prefix="transprune-soak-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = start_server(args.model, port, temp / "gradio", args.threads)
    rows, failures = [], []
    try:
        wait_until_up(url, server)
        client = None
        started = time.time()
        print(f"{'requests':>8} {'RSS MB':>8} {'temp files':>10} {'temp MB':>8} {'s/request':>9}", flush=True)
        for done in range(1, args.requests + 1):
            if client is None or args.sessions == "each":
                client = Client(url, verbose=False, download_files=str(temp / "downloads"))
            try:
                out = client.predict(image=handle_file(image), question=question, model=args.model,
                                     max_new_tokens=4, repeats=1, api_name="/compare")
                if "visual tokens" not in out[0] or not out[3]:
                    failures.append((done, f"incomplete answer: {out[0][:80]!r}"))
            except Exception as error:  # report and go on: the soak counts failures
                failures.append((done, f"{type(error).__name__}: {error}"))
            if done % args.every == 0 or done == args.requests:
                files, megabytes = folder_usage(temp / "gradio")
                row = dict(requests=done, rss_mb=round(rss_mb(server.pid), 1), temp_files=files,
                           temp_mb=round(megabytes, 2), seconds_per_request=round((time.time() - started) / done, 3))
                rows.append(row)
                print(f"{done:>8} {row['rss_mb']:>8.1f} {files:>10} {megabytes:>8.2f} "
                      f"{row['seconds_per_request']:>9.3f}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    growth = rows[-1]["rss_mb"] - rows[0]["rss_mb"] if rows else 0.0
    print(f"RSS growth after the first {args.every} requests: {growth:+.1f} MB; failed requests: {len(failures)}")
    for done, message in failures[:10]:
        print(f"  request {done}: {message}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(model=args.model, sessions=args.sessions, rows=rows,
                                             failures=failures, rss_growth_mb=growth), indent=1))
    too_much = args.max_growth_mb is not None and growth > args.max_growth_mb
    return 1 if failures or too_much else 0


if __name__ == "__main__":
    sys.exit(main())
