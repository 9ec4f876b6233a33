"""Peak memory of loading and validating a large JSONL file, against the file's size.

Writes a JSONL file of preference pairs (about 2 KB a row) of --size-gb, then runs, each in a fresh
child process so its peak resident set is its own:

  import     `import raylign.data` and nothing else (the interpreter + pyarrow + numpy floor),
  load       `raylign.data.load_dataset(FILE, "pairs")`: read, validate, build the Arrow table,
  validate   `raylign data validate FILE --kind pairs`: the CLI, i.e. load + the summary,

and prints each child's peak RSS (`ru_maxrss` from `os.wait4`), the peak above the import floor,
and both as a ratio of the file size. Loading keeps the table's columns (about the size of the text
in the file) plus one batch of rows, so the ratio above the floor should stay near 1 whatever the
size; a reader that held every row as Python objects would show several times the file.

    python bench/data_peak_rss.py                       # 1.5 GB in a temp dir, removed afterwards
    python bench/data_peak_rss.py --size-gb 0.3 --only load
    python bench/data_peak_rss.py --pythonpath /tmp/other-checkout   # the same, for another tree
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROW_BYTES = 2000
WORDS = "the quick brown fox jumps over the lazy dog while a cheerful robot hums a tune".split()


def write_pairs(path: Path, size_bytes: int) -> int:
    """Seeded, varied pairs until the file reaches `size_bytes`; returns the row count."""
    import random

    rng = random.Random(0)
    rows = 0
    written = 0
    with path.open("w", encoding="utf-8") as f:
        buffer = []
        while written < size_bytes:
            answer = " ".join(rng.choices(WORDS, k=ROW_BYTES // 12))
            row = {"prompt": f"question {rows}: " + " ".join(rng.choices(WORDS, k=12)),
                   "chosen": answer, "rejected": answer[::-1], "category": WORDS[rows % len(WORDS)]}
            line = json.dumps(row) + "\n"
            buffer.append(line)
            written += len(line)
            rows += 1
            if len(buffer) >= 10_000:
                f.write("".join(buffer))
                buffer.clear()
        f.write("".join(buffer))
    return rows


def child(code: list[str], env: dict[str, str], cwd: Path) -> tuple[int, float, str]:
    """(peak RSS in bytes, seconds, last line of output) of a child process. It runs in `cwd`, not
    here: `python -c` puts its working directory first on sys.path, which would shadow --pythonpath."""
    start = time.perf_counter()
    proc = subprocess.Popen(code, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, cwd=cwd)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(code[:3])} ... failed ({proc.returncode}):\n{output[-3000:]}")
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return usage.ru_maxrss * 1024, seconds, (lines[-1] if lines else "")  # Linux: ru_maxrss in KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.5, help="size of the JSONL file (default 1.5)")
    parser.add_argument("--workdir", help="where to write the file (default: a temp dir, removed afterwards)")
    parser.add_argument("--only", choices=["load", "validate"], help="run one of the two measurements")
    parser.add_argument("--pythonpath", help="PYTHONPATH for the children: measure another checkout")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="raylign-rss-"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "pairs.jsonl"
    try:
        start = time.perf_counter()
        rows = write_pairs(path, int(args.size_gb * 1e9))
        size = path.stat().st_size
        print(f"wrote {path}: {size / 1e9:.2f} GB, {rows} rows ({time.perf_counter() - start:.0f} s)")
        py = sys.executable
        runs = {"import": [py, "-c", "import raylign.data; print(raylign.data.__file__)"]}
        if args.only in (None, "load"):
            runs["load"] = [py, "-c", "import sys; from raylign.data import load_dataset; "
                            "t = load_dataset(sys.argv[1], 'pairs'); print(t.num_rows, 'rows,', t.nbytes, 'bytes')",
                            str(path)]
        if args.only in (None, "validate"):
            runs["validate"] = [py, "-m", "raylign.cli", "data", "validate", str(path), "--kind", "pairs"]
        figures: dict[str, dict[str, float | str]] = {}
        for name, code in runs.items():
            rss, seconds, last = child(code, env, workdir)
            figures[name] = {"peak_rss_bytes": rss, "seconds": round(seconds, 1), "output": last}
        floor = float(figures["import"]["peak_rss_bytes"])
        print(f"\nfile {size / 1e9:.2f} GB ({rows} rows); children run {py} with {figures['import']['output']}")
        print(f"{'run':<10}{'peak RSS':>12}{'above import':>14}{'RSS/file':>10}{'(above)/file':>14}{'seconds':>9}")
        for name, fig in figures.items():
            rss = float(fig["peak_rss_bytes"])
            print(f"{name:<10}{rss / 1e9:>10.2f}GB{(rss - floor) / 1e9:>12.2f}GB{rss / size:>10.2f}"
                  f"{(rss - floor) / size:>14.2f}{fig['seconds']:>9}")
            fig["ratio"] = round(rss / size, 3)
            fig["ratio_above_import"] = round((rss - floor) / size, 3)
        for name, fig in figures.items():
            if name != "import":
                print(f"  {name}: {fig['output']}")
        if args.json:
            Path(args.json).write_text(json.dumps({"file_bytes": size, "rows": rows, "runs": figures}, indent=2))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
