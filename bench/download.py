"""URL-list download: ours vs img2dataset on the same loopback list, same processes x threads, timeout, shards and
resizing, with and without decompression bombs, side by side in one run.

    .venv/bin/python bench/download.py [--urls 4000] [--processes 2] [--threads 32] [--timeout 2] \
        [--bomb-fractions 0.002,0] [--img2dataset .state/img2dataset-venv/bin/img2dataset]

The server (diht_core/data/loopback.py) runs in its own process and serves a mix of good images,
dead links (404, refused), slow responses, non-images, corrupt files, redirects, loops, huge bodies and
decompression bombs. img2dataset pins packages this project does not (webdataset 0.2, pandas 2), so it
lives in its own virtualenv: `python3.11 -m venv .state/img2dataset-venv && .state/img2dataset-venv/bin/pip
install img2dataset`. Each tool runs once per list in a fresh process, one after the other; the server's images
are warmed first so neither pays for their rendering. Ours runs `task_runner: process` (`processes` workers, each
with `threads`), img2dataset `--distributor=multiprocessing` with `processes_count` and `thread_count`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pandas as pd
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diht_core.data.loopback import mixed_url_list  # noqa: E402

MIX = {"good_jpg": 0.56, "good_png": 0.10, "redirect_ok": 0.04, "dead_404": 0.10, "dead_refused": 0.10,
       "slow": 0.03, "html": 0.02, "html_as_jpeg": 0.01, "truncated": 0.015, "redirect_loop": 0.01,
       "huge": 0.003, "bomb": 0.002}

OURS = """
import json, sys, pandas as pd
from diht_core.config import UrlListParams
from diht_core.data.url_download import download_url_list
lst, out, processes, threads, shard_size, timeout, size, mode = sys.argv[1:]
cfg = UrlListParams(timeout=float(timeout), task_runner="process", processes=int(processes), threads=int(threads),
                    shard_size=int(shard_size), resize_mode=mode, image_size=int(size),
                    allow_private=True)  # the loopback server's redirects stay on 127.0.0.1
print(json.dumps(download_url_list(pd.read_parquet(lst), out, cfg, progress=False)))
"""

# img2dataset's error messages -> our reasons
I2D_REASONS = [
    (r"redirect error that would lead to an infinite loop", "redirect_loop"),
    (r"HTTP Error (\d+)", lambda m: f"http_{m.group(1)}"),
    (r"timed out", "timeout"),
    (r"Connection refused|Remote end closed|Connection reset", "connection_error"),
    (r"decoding error|cannot identify|truncated", "decode_error"),
    (r"X-Robots-Tag", "opted_out"),
    (r"image area too large", "decompression_bomb"),
]


def i2d_reason(msg) -> str:
    if msg is None or (isinstance(msg, float) and msg != msg):
        return "ok"
    for pattern, reason in I2D_REASONS:
        m = re.search(pattern, msg)
        if m:
            return reason(m) if callable(reason) else reason
    return "other: " + msg[:40]


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "diht_core.data.loopback"], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    return proc, proc.stdout.readline().strip()


def warm(urls: pd.DataFrame) -> None:
    """Render the good images and the bomb once (the server caches them), so that neither tool waits for it."""
    for url in urls[urls.expected.isin(["ok", "decompression_bomb"])].url.unique():
        urllib.request.urlopen(url, timeout=60).read()


def run_tracked(cmd: list[str], **kwargs) -> tuple[str, float]:
    """subprocess.run(cmd, capture_output=True, text=True, check=True)'s stdout, and the CPU seconds (user + system)
    of the command's whole process tree: every process is sampled each 50 ms, as long as it lives, by pid (rusage
    does not reach the workers of a forkserver, which are not the command's children)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    root, cpu = psutil.Process(proc.pid), {}

    def sample():
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in tree:
            try:
                cpu[p.pid] = max(cpu.get(p.pid, 0.0), sum(p.cpu_times()[:2]))
            except psutil.NoSuchProcess:
                pass
    while True:
        sample()
        try:
            out, err = proc.communicate(timeout=0.05)
            break
        except subprocess.TimeoutExpired:
            continue
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, out, err)
    return out, sum(cpu.values())


def run_ours(lst: Path, out: Path, a) -> dict:
    t = time.perf_counter()
    stdout, cpu = run_tracked([sys.executable, "-c", OURS, str(lst), str(out), str(a.processes), str(a.threads),
                               str(a.shard_size), str(a.timeout), str(a.image_size), a.resize_mode], cwd=ROOT)
    wall = time.perf_counter() - t
    stats = json.loads(stdout.strip().splitlines()[-1])
    return {"wall": wall, "seconds": stats["seconds"], "ok": stats["successes"], "reasons": stats["reasons"], "cpu": cpu}


def run_img2dataset(lst: Path, out: Path, a) -> dict:
    cmd = [a.img2dataset, f"--url_list={lst}", "--input_format=parquet", "--url_col=url", "--caption_col=caption",
           f"--output_folder={out}", "--output_format=webdataset", f"--thread_count={a.threads}",
           f"--processes_count={a.processes}", f"--timeout={a.timeout}", "--retries=0", f"--image_size={a.image_size}",
           f"--resize_mode={a.resize_mode}", f"--number_sample_per_shard={a.shard_size}", "--enable_wandb=False",
           "--distributor=multiprocessing", f"--max_image_area={a.max_pixels}"]
    t = time.perf_counter()
    _, cpu = run_tracked(cmd)
    wall = time.perf_counter() - t
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    rows = pd.concat([pd.read_parquet(p) for p in out.glob("*.parquet")])
    reasons = Counter(i2d_reason(m) for m in rows.error_message)
    seconds = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)  # its shards run in parallel
    return {"wall": wall, "seconds": seconds, "ok": reasons["ok"], "reasons": dict(reasons), "cpu": cpu}


def table(results: dict, expected: dict[str, Counter]) -> str:
    """Markdown: one column per tool and list; expected: each list's expected reasons (" / " between lists)."""
    tools = list(results)
    lines = ["| | " + " | ".join(tools) + " | expected |", "|---" * (len(tools) + 2) + "|"]

    def row(name, values, exp=""):
        lines.append(f"| {name} | " + " | ".join(values) + f" | {exp} |")

    row("wall time, s (process start to exit)", [f"{r['wall']:.1f}" for r in results.values()])
    row("download time, s (the tool's own timer)", [f"{r['seconds']:.1f}" for r in results.values()])
    row("**images/s** (ok / download time)", [f"**{r['ok'] / r['seconds']:.0f}**" for r in results.values()])
    row("images/s (ok / wall time)", [f"{r['ok'] / r['wall']:.0f}" for r in results.values()])
    row("CPU s of the tool, all its processes", [f"{r['cpu']:.1f}" for r in results.values()])
    row("**CPU ms per image** (ok)", [f"**{1000 * r['cpu'] / r['ok']:.2f}**" for r in results.values()])
    row("CPU s of the loopback server meanwhile", [f"{r['server_cpu']:.1f}" for r in results.values()])
    known = {k for c in expected.values() for k in c}
    reasons = sorted(known | {k for r in results.values() for k in r["reasons"]}, key=lambda k: (k != "ok", k))
    for k in reasons:
        row(k, [str(r["reasons"].get(k, 0)) for r in results.values()],
            " / ".join(dict.fromkeys(str(c.get(k, 0)) for c in expected.values())))
    return "\n".join(lines)


def run_list(base: str, a, bombs: float, server: psutil.Process) -> tuple[dict, Counter]:
    """Both tools on one mixed list with `bombs` as the share of decompression bombs."""
    mix = {**MIX, "bomb": bombs, "good_jpg": MIX["good_jpg"] + MIX["bomb"] - bombs}
    urls = mixed_url_list(base, a.urls, mix, slow_ms=a.slow_ms)
    warm(urls)
    with tempfile.TemporaryDirectory() as tmp:
        lst = Path(tmp) / "list.parquet"
        urls[["url", "caption"]].to_parquet(lst)
        tools = {"ours": run_ours}
        if Path(a.img2dataset).exists():
            tools["img2dataset"] = run_img2dataset
        else:
            print(f"(img2dataset not found at {a.img2dataset}: skipped)")
        results = {}
        for name, run in tools.items():  # each with the loopback server's CPU seconds meanwhile
            s0 = sum(server.cpu_times()[:2])
            results[name] = {**run(lst, Path(tmp) / name, a), "server_cpu": sum(server.cpu_times()[:2]) - s0}
    return results, Counter(urls.expected)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--urls", type=int, default=4000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=500, help="URLs per shard, both tools")
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--slow-ms", type=int, default=3000)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--resize-mode", default="border")
    ap.add_argument("--max-pixels", type=int, default=89_478_485)
    ap.add_argument("--bomb-fractions", default=f"{MIX['bomb']},0",
                    help="shares of decompression bombs, one list (and one pair of columns) each")
    ap.add_argument("--img2dataset", default=str(ROOT / ".state" / "img2dataset-venv" / "bin" / "img2dataset"))
    a = ap.parse_args()
    server, base = start_server()
    results, expected = {}, {}
    try:
        for bombs in [float(f) for f in a.bomb_fractions.split(",")]:
            label = "" if bombs else ", no bombs"
            res, expected[label] = run_list(base, a, bombs, psutil.Process(server.pid))
            results.update({f"{tool}{label}": r for tool, r in res.items()})
    finally:
        server.terminate()
        server.wait()
    load = os.getloadavg()
    print(f"{a.urls} URLs, {a.processes} processes x {a.threads} threads each, {a.shard_size} URLs a shard, timeout "
          f"{a.timeout} s, {a.resize_mode} {a.image_size} px; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
          f"on {os.cpu_count()} cores\n")
    print(table(results, expected))
    for label in expected:
        ours, theirs = results.get(f"ours{label}"), results.get(f"img2dataset{label}")
        if theirs:
            print(f"\nours / img2dataset{label}: {ours['ok'] / ours['seconds'] / (theirs['ok'] / theirs['seconds']):.2f}x"
                  f" images/s, {theirs['cpu'] / theirs['ok'] / (ours['cpu'] / ours['ok']):.2f}x less CPU per image, "
                  f"{ours['ok']} vs {theirs['ok']} successes")


if __name__ == "__main__":
    main()
