"""Run every benchmark in bench/ and write one Markdown table of the ratios measured in this run.

Each ``bench/<name>.py`` prints ratios measured side by side in one run. Benchmarks that take
``--json`` are read from their JSON (every numeric key with ``ratio`` in its name, plus the
conditions they report); the others are read from their printed lines (each line that states a
ratio: ``ratio ... : 0.95`` or ``2.31x faster``). Nothing in the table is typed by hand: rerun
``make bench`` (``python bench/run_all.py --out bench/RESULTS.md``) to regenerate it.

    python bench/run_all.py [--full] [--only generate,latent_cache] [--out bench/RESULTS.md]

By default every benchmark runs with ``--quick`` (minutes on a 2-core machine); ``--full`` runs
their full sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CONDITION_KEYS = ("conditions", "machine", "server", "device", "size_mb", "part_mb", "threads", "quick")


@dataclass
class Row:
    ratio: str
    value: float
    note: str = ""


@dataclass
class Outcome:
    name: str
    command: list[str]
    seconds: float
    returncode: int
    rows: list[Row] = field(default_factory=list)
    conditions: str = ""
    error: str = ""
    stdout: str = ""
    json_mode: bool = False
    # 1-minute load average when it finished: other work on the machine skews every timing ratio
    load_after: float | None = None

    def parse(self) -> None:
        """Fill ``rows`` and ``conditions`` from the benchmark's output (JSON or printed lines)."""
        if self.returncode != 0:
            return
        if self.json_mode:
            try:
                data = json.loads(self.stdout[self.stdout.index("{") :])
                self.rows, self.conditions = rows_from_json(data)
            except ValueError as exc:
                self.error = f"could not read its JSON: {exc}"
        else:
            self.rows, self.conditions = rows_from_text(self.stdout)
        if not self.rows and not self.error:
            self.error = "printed no ratio: " + self.stdout[-300:].replace("\n", " ⏎ ")


def discover() -> list[Path]:
    return sorted(
        p for p in BENCH.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_")
    )


def takes_json(script: Path) -> bool:
    return '"--json"' in script.read_text()


def rows_from_json(data: dict[str, Any]) -> tuple[list[Row], str]:
    rows = [
        Row(k, float(v))
        for k, v in data.items()
        # "ratio" as a word of the key ("generation_seconds" holds the letters too)
        if "ratio" in k.lower().split("_") and isinstance(v, int | float) and not isinstance(v, bool)
    ]
    cond = [f"{k}: {data[k]}" for k in CONDITION_KEYS if k in data and data[k] not in (None, "")]
    return rows, "; ".join(str(c) for c in cond)


_RATIO_LINE = re.compile(r"ratio[^:=]*[:=]\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_TIMES_LINE = re.compile(r"^\s*([\w+.-]+):?\s+(-?\d+(?:\.\d+)?)x\s+(faster|slower)[^;]*", re.IGNORECASE)
_ANY_X = re.compile(r"(-?\d+(?:\.\d+)?)x\b")


def rows_from_text(text: str) -> tuple[list[Row], str]:
    """Ratios stated in printed lines; the first non-empty line is kept as the conditions."""
    rows: list[Row] = []
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        m = _TIMES_LINE.match(ln)
        if m:
            rows.append(Row(f"{m.group(1)} speed-up", float(m.group(2)), ln.strip()))
            # further "N.NNx" on the same line (e.g. memory ratios) with their own words
            rest = ln[m.end() :]
            for part in rest.split(","):
                x = _ANY_X.search(part)
                if x:
                    words = re.sub(r"\(.*?\)", "", part[: x.start()] + "×" + part[x.end() :]).strip(" ;")
                    rows.append(Row(f"{m.group(1)}: {words}", float(x.group(1)), ln.strip()))
            continue
        m2 = _RATIO_LINE.search(ln)
        if m2:
            label = ln[: m2.start(1)].strip(" :=")
            rows.append(Row(label, float(m2.group(1)), ln.strip()))
    return rows, lines[0] if lines else ""


def run_one(script: Path, quick: bool, timeout: float) -> Outcome:
    cmd = [sys.executable, str(script.relative_to(REPO))]
    if quick:
        cmd.append("--quick")
    json_mode = takes_json(script)
    if json_mode:
        cmd.append("--json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return Outcome(
            script.stem,
            cmd,
            time.perf_counter() - t0,
            -1,
            error=f"timed out after {timeout:.0f} s: {str(exc.stdout)[-300:]}",
        )
    out = Outcome(
        script.stem,
        cmd,
        time.perf_counter() - t0,
        proc.returncode,
        stdout=proc.stdout,
        json_mode=json_mode,
        load_after=round(os.getloadavg()[0], 1),
    )
    if proc.returncode != 0:
        out.error = (proc.stderr or proc.stdout)[-600:].strip().replace("\n", " ⏎ ")
        return out
    out.parse()
    return out


def machine() -> str:
    import torch

    return (
        f"{platform.node() or 'host'}: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}; "
        f"load average before the run {', '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )


def render(outcomes: list[Outcome], quick: bool, started: datetime, host: str) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `make bench` (`python bench/run_all.py{'' if quick else ' --full'}`) on "
        f"{started.strftime('%Y-%m-%d %H:%M UTC')}; do not edit by hand, rerun it.",
        "",
        f"Machine: {host}. Mode: {'`--quick` (short runs)' if quick else 'full size'}.",
        "Every ratio compares two variants measured side by side in the same run of one benchmark; "
        "see each script's docstring for what the two sides are.",
        "",
        "| benchmark | ratio | value | conditions | run |",
        "|---|---|---:|---|---|",
    ]
    for o in outcomes:
        load = f", load {o.load_after}" if o.load_after is not None else ""
        run = f"{o.seconds:.0f} s{load}, `{' '.join(o.command[1:])}`"
        if o.error:
            lines.append(
                f"| {o.name} | **failed** (exit {o.returncode}) | – | {esc(o.error[:300])} | {run} |"
            )
            continue
        for r in o.rows:
            value = f"{r.value:.2f}" if abs(r.value) < 100 else f"{r.value:.0f}"
            lines.append(f"| {o.name} | {esc(r.ratio)} | {value} | {esc(o.conditions)} | {run} |")
    lines += ["", "Printed lines the text-parsed ratios came from:", ""]
    for o in outcomes:
        for note in dict.fromkeys(r.note for r in o.rows if r.note):
            lines.append(f"- {o.name}: `{note}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    ap.add_argument("--full", action="store_true", help="full sizes instead of --quick")
    ap.add_argument("--only", default="", help="comma-separated benchmark names")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark")
    ap.add_argument(
        "--render-only",
        action="store_true",
        help="re-read the outputs saved by the last run (no benchmark runs)",
    )
    args = ap.parse_args(argv)
    raw_path = args.out.with_suffix(".raw.json")
    if args.render_only:
        raw = json.loads(raw_path.read_text())
        saved = [
            Outcome(**{**o, "rows": [], "error": o["error"] if o["returncode"] else ""})
            for o in raw["outcomes"]
        ]
        for o in saved:
            o.parse()
        args.out.write_text(
            render(saved, raw["quick"], datetime.fromisoformat(raw["started"]), raw["machine"])
        )
        print(f"[bench] wrote {args.out} from {raw_path}")
        return 0
    started = datetime.now(UTC)
    host = machine()
    scripts = discover()
    if args.only:
        wanted = {n.strip() for n in args.only.split(",") if n.strip()}
        scripts = [s for s in scripts if s.stem in wanted]
    outcomes = []
    for script in scripts:
        print(f"[bench] {script.name} ...", flush=True)
        o = run_one(script, not args.full, args.timeout)
        status = (
            "failed: " + o.error[:200] if o.error else ", ".join(f"{r.ratio} {r.value:.3g}" for r in o.rows)
        )
        print(f"[bench] {script.name}: {o.seconds:.0f} s; {status}", flush=True)
        outcomes.append(o)
    args.out.write_text(render(outcomes, not args.full, started, host))
    raw = {
        "started": started.isoformat(),
        "machine": host,
        "quick": not args.full,
        "outcomes": [{k: v for k, v in vars(o).items() if k not in ("rows", "conditions")} for o in outcomes],
    }
    raw_path.write_text(json.dumps(raw, indent=1))
    print(f"[bench] wrote {args.out}")
    return 1 if any(o.error for o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
