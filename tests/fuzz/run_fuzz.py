#!/usr/bin/env python3
"""Run the fuzz targets one after the other and summarise; exit 1 on any finding.

    tests/fuzz/run_fuzz.py [--seconds 30] [--runs N] [--update-corpus] [target ...]

Each target runs as `python tests/fuzz/fuzz_<target>.py` under libFuzzer,
starting from its corpus in tests/fuzz/corpus/<target>/ (left unchanged: new
inputs go to a scratch directory), with a per-input timeout (hangs) and an
RSS limit (leaks). A crash, a hang, an out-of-memory or a broken invariant
leaves its input in the artifacts directory printed at the end.

--update-corpus merges what the run found into the corpus with libFuzzer's
-set_cover_merge=1 (a small set of inputs with all the features; hand-written seeds, named
seed-*, are always kept).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fuzzlib  # noqa: E402

TARGETS = fuzzlib.TARGETS
MAX_LEN = {"head": 4096, "frames": 4096, "config": 8192, "identity": 4096}
STATUS = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+) corp: (\d+)/\S+.*?exec/s: (\d+) rss: (\d+)Mb")


def run_target(target: str, args, scratch: Path, artifacts: Path) -> dict:
    corpus = fuzzlib.CORPUS / target
    corpus.mkdir(parents=True, exist_ok=True)
    work = scratch / target
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(HERE / f"fuzz_{target}.py"), str(work), str(corpus),
           f"-artifact_prefix={artifacts}/{target}-", "-print_final_stats=1",
           f"-max_len={MAX_LEN[target]}", f"-timeout={args.timeout}",
           f"-rss_limit_mb={args.rss_limit_mb}", "-print_pcs=0", "-reload=0"]
    if args.seconds:
        cmd.append(f"-max_total_time={args.seconds}")
    if args.runs:
        cmd.append(f"-runs={args.runs}")
    log_path = artifacts / f"{target}.log"
    print(f"fuzz: {target}: {' '.join(cmd[1:])}", flush=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=fuzzlib.ROOT)
    wall = time.monotonic() - start
    text = log_path.read_text(errors="replace")
    statuses = [m for m in map(STATUS.match, text.splitlines()) if m]
    stats = dict(re.findall(r"^stat::(\w+):\s+(\d+)", text, re.M))
    first = statuses[0] if statuses else None
    last = statuses[-1] if statuses else None
    found = sorted(p.name for p in artifacts.glob(f"{target}-*") if p.is_file())
    result = {
        "target": target, "rc": proc.returncode, "wall": wall,
        "runs": int(stats.get("number_of_executed_units", last.group(1) if last else 0)),
        "exec_s": int(stats.get("average_exec_per_sec", 0)),
        "cov": int(last.group(3)) if last else 0, "ft": int(last.group(4)) if last else 0,
        "corpus": int(last.group(5)) if last else 0,
        "rss_start": int(first.group(7)) if first else 0,
        "rss_peak": int(stats.get("peak_rss_mb", 0)),
        "native": "Loaded 1 modules" in text and "inline 8-bit counters" in text,
        "findings": found, "log": str(log_path),
    }
    if proc.returncode != 0 or found:
        tail = "\n".join(text.splitlines()[-60:])
        print(f"fuzz: {target}: FAILED (exit {proc.returncode}); the end of {log_path}:\n{tail}",
              flush=True)
    if args.update_corpus:
        merge(target, work)
    return result


def merge(target: str, work: Path) -> None:
    """Minimise corpus + new inputs into the corpus (seed-* files always kept)."""
    corpus = fuzzlib.CORPUS / target
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "merged"
        merged.mkdir()
        subprocess.run([sys.executable, str(HERE / f"fuzz_{target}.py"), "-set_cover_merge=1",
                        f"-max_len={MAX_LEN[target]}", str(merged), str(corpus), str(work)],
                       check=True, cwd=fuzzlib.ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        for path in corpus.iterdir():
            if not path.name.startswith("seed-"):
                path.unlink()
        for path in merged.iterdir():
            if not (corpus / path.name).exists():
                shutil.copy(path, corpus / path.name)
    print(f"fuzz: {target}: corpus now {len(list(corpus.iterdir()))} files", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("targets", nargs="*", metavar="target",
                        help=f"default: all of {', '.join(TARGETS)}")
    parser.add_argument("--seconds", type=int, default=0, help="time limit per target")
    parser.add_argument("--runs", type=int, default=0, help="inputs per target")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take (a hang)")
    parser.add_argument("--rss-limit-mb", type=int, default=1024, help="memory limit (a leak)")
    parser.add_argument("--artifacts", help="where findings and logs go (default: a new temp dir)")
    parser.add_argument("--update-corpus", action="store_true",
                        help="merge what the run found into tests/fuzz/corpus/ (minimised)")
    args = parser.parse_args()
    if not args.seconds and not args.runs:
        parser.error("give --seconds or --runs")
    targets = args.targets or list(TARGETS)
    for t in targets:
        if t not in TARGETS:
            parser.error(f"unknown target {t!r} (one of {', '.join(TARGETS)})")
    artifacts = Path(args.artifacts or tempfile.mkdtemp(prefix="fastgw-fuzz-"))
    artifacts.mkdir(parents=True, exist_ok=True)
    if fuzzlib.NATIVE_TARGETS & set(targets):
        fuzzlib.build_core()          # before the clock of the first target starts
    results = []
    with tempfile.TemporaryDirectory(prefix="fastgw-fuzz-work-") as scratch:
        for target in targets:
            results.append(run_target(target, args, Path(scratch), artifacts))
    print(f"\n{'target':<9} {'inputs':>10} {'wall s':>7} {'exec/s':>7} {'cov':>6} {'ft':>6} "
          f"{'corpus':>6} {'rss MB':>11} {'native':>6}  findings")
    for r in results:
        print(f"{r['target']:<9} {r['runs']:>10} {r['wall']:>7.0f} {r['exec_s']:>7} {r['cov']:>6} "
              f"{r['ft']:>6} {r['corpus']:>6} {r['rss_start']:>4}->{r['rss_peak']:<5} "
              f"{'yes' if r['native'] else '-':>6}  {', '.join(r['findings']) or 'none'}"
              + (f" (exit {r['rc']})" if r["rc"] else ""))
    print(f"\nlogs and findings: {artifacts}")
    bad = sum(1 for r in results if r["rc"] != 0 or r["findings"])
    print(f"fuzz: {len(results) - bad} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
