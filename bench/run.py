"""Run the benchmarks against a fresh local server; print a table, write JSON and a chart.

python -m bench            # the full run (W1 100k rows, W2 scale 10, W3 10M events)
python -m bench --quick    # a small run for CI, so the harness never rots
python -m bench --workloads w4   # only some workloads (w1, w2, w3, w4, w5)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.server import bench_server, drop_database, fresh_database
from bench.w1 import STATEMENTS, VARIANTS, run_w1
from bench.w2 import VARIANTS as W2_VARIANTS
from bench.w2 import run_w2
from bench.w3 import run_w3
from bench.w4 import run_w4
from bench.w5 import run_w5

RESULTS = Path(__file__).parent / "results"

FULL = {"w1_rows": 100_000, "w1_reps": 3, "w2_scale": 10, "w2_seconds": 20, "w2_reps": 5,
        "w3_small": 10_000, "w3_large": 10_000_000, "w3_as_of_rows": 1_000_000, "w3_samples": 300,
        "w4_scale": 70, "w4_reps": 8, "w5_events": 10_000_000, "w5_samples": 100}  # fmt: skip
QUICK = {"w1_rows": 5_000, "w1_reps": 3, "w2_scale": 1, "w2_seconds": 3, "w2_reps": 1,
         "w3_small": 2_000, "w3_large": 20_000, "w3_as_of_rows": 5_000, "w3_samples": 50,
         "w4_scale": 1, "w4_reps": 1, "w5_events": 20_000, "w5_samples": 10}  # fmt: skip


def _targets(data: dict[str, Any]) -> list[tuple[str, str, bool]]:
    rows: list[tuple[str, str, bool]] = []
    if "w1" in data:
        rows += _w1_targets(data["w1"])
    if "w2" in data:
        rows += _w2_targets(data["w2"])
    if "w3" in data:
        rows += _w3_targets(data["w3"])
    if "w4" in data:
        w4 = data["w4"]
        rows.append(("W4 backup throughput ≥ 0.9 × pg_basebackup",
                     f"{w4['backup_throughput_ratio']:.2f}", w4["backup_throughput_ratio"] >= 0.9))  # fmt: skip
        rows.append(("W4 restore throughput ≥ 0.9 × copy + replay",
                     f"{w4['restore_throughput_ratio']:.2f}", w4["restore_throughput_ratio"] >= 0.9))  # fmt: skip
        inc = w4["incremental_over_full"]
        if inc is not None:
            floor = w4.get("plain_incremental_over_full")
            shown = f"{inc:.2f}" + (f" (plain pg_basebackup: {floor:.2f})" if floor else "")
            rows.append(("W4 incremental after 1 % changed ≤ 0.2 × full", shown, inc <= 0.2))
    if "w5" in data:
        w5 = data["w5"]
        for name, label in (
            ("page_timeline", "timeline's first page"),
            ("page_row", "a row's history"),
        ):
            p95 = w5["p95_ms"][name]
            rows.append((f"W5 {label} at {w5['events']:,} events, p95 < 100 ms",
                         f"{p95:.1f} ms", p95 < 100))  # fmt: skip
    return rows


def _w1_targets(w1: dict[str, Any]) -> list[tuple[str, str, bool]]:
    rows: list[tuple[str, str, bool]] = []
    for variant in VARIANTS:
        if not variant.startswith("pgwarden"):
            continue
        if variant == "pgwarden-wal":
            for statement, limit in zip(STATEMENTS, (0.3, 0.6, 0.3), strict=True):
                r = w1["R"][variant][statement]
                rows.append((f"W1 {variant} {statement} R ≤ {limit} (write path)", f"{r:.2f}",
                             r <= limit))  # fmt: skip
            speeds = w1["wal_catch_up_events_per_s"]
            slowest = min(speeds, default=0.0)
            rows.append(("W1 pgwarden-wal consumer catch-up ≥ 100k events/s",
                         f"{slowest:,.0f} (of {', '.join(f'{x:,.0f}' for x in speeds)})",
                         slowest >= 100_000))  # fmt: skip
            continue
        for statement in STATEMENTS:
            r = w1["R"][variant][statement]
            limit = 2.5 if statement == "UPDATE" else 1.5
            rows.append((f"W1 {variant} {statement} R ≤ {limit}", f"{r:.2f}", r <= limit))
            seed = max(w1["R"]["seed-fail-open"][statement], w1["R"]["seed-fail-closed"][statement])
            seed_min = min(
                w1["R"]["seed-fail-open"][statement], w1["R"]["seed-fail-closed"][statement]
            )
            rows.append((f"W1 {variant} {statement} ≤ ½ seed's overhead",
                         f"{r:.2f} vs seed {seed_min:.2f}–{seed:.2f}", r <= seed_min / 2))  # fmt: skip
            xids = w1["xids_per_statement"][variant][statement]
            rows.append((f"W1 {variant} {statement} xids ≤ 2", str(xids), xids <= 2))
    return rows


def _w2_targets(w2: dict[str, Any]) -> list[tuple[str, str, bool]]:
    rows: list[tuple[str, str, bool]] = []
    rows.append(("W2 tracked TPS ≥ 0.85 × untracked",
                 f"{w2['tracked_over_untracked']:.2f} (seed {w2['seed_over_untracked']:.2f}, "
                 f"PL/pgSQL fallback {w2['plpgsql_over_untracked']:.2f})",
                 w2["tracked_over_untracked"] >= 0.85))  # fmt: skip
    rows.append(("W2 tracked ≥ seed + 0.05 (medians)",
                 f"{w2['tracked_over_untracked']:.2f} vs {w2['seed_over_untracked']:.2f}",
                 w2["tracked_over_untracked"] >= w2["seed_over_untracked"] + 0.05))  # fmt: skip
    pairs = list(zip(w2["per_run"]["tracked"], w2["per_run"]["seed"], strict=True))
    ahead = sum(t >= s + 0.05 for t, s in pairs)
    rows.append(("W2 tracked ≥ seed + 0.05 in each repetition",
                 f"{ahead} of {len(pairs)}", ahead == len(pairs)))  # fmt: skip
    rows.append(("W2 wal, consumer waiting, TPS ≥ 0.95 × untracked",
                 f"{w2['wal_waiting_over_untracked']:.2f}",
                 w2["wal_waiting_over_untracked"] >= 0.95))  # fmt: skip
    rows.append(("W2 wal, consumer running beside it, TPS ≥ 0.85 × untracked",
                 f"{w2['wal_live_over_untracked']:.2f}", w2["wal_live_over_untracked"] >= 0.85))  # fmt: skip
    # Like for like: untracked tables running the same tagged script (the "who" statement).
    tagged = w2.get("wal_waiting_over_tagged")
    if tagged is not None:
        rows.append(("W2 wal, consumer waiting, TPS ≥ 0.95 × untracked-tagged (same script)",
                     f"{tagged:.2f} (the tagged script itself: "
                     f"{w2['tagged_over_untracked']:.2f} × untracked)", tagged >= 0.95))  # fmt: skip
        live = w2["wal_live_over_tagged"]
        rows.append(("W2 wal, consumer running beside it, TPS ≥ 0.85 × untracked-tagged",
                     f"{live:.2f}", live >= 0.85))  # fmt: skip
    rate = statistics.median(w2["untracked_events_per_s"])
    catch = min(w2["catch_up_events_per_s"], default=0.0)
    rows.append(("W2 consumer catch-up ≥ 2 × untracked event rate",
                 f"{catch:,.0f} events/s vs {rate:,.0f} ({catch / rate:.1f}×)", catch >= 2 * rate))  # fmt: skip
    lag = max(w2["lag_p99_s"], default=float("nan"))
    rows.append(("W2 wal-live lag p99 ≤ 1 s", f"{lag:.2f} s", lag <= 1))
    complete = all(c["missing"] == 0 and c["extra"] == 0 for c in w2["completeness"])
    rows.append(("W2 every change has its event", json.dumps(w2["completeness"]), complete))
    return rows


def _w3_targets(w3: dict[str, Any]) -> list[tuple[str, str, bool]]:
    rows: list[tuple[str, str, bool]] = []
    rows.append(("W3 lookup p99 large ≤ 2 × small", f"{w3['lookup_p99_ratio']:.2f}",
                 w3["lookup_p99_ratio"] <= 2))  # fmt: skip
    rows.append(
        ("W3 as-of --into ≤ 3 × CTAS", f"{w3['as_of_over_ctas']:.2f}", w3["as_of_over_ctas"] <= 3)
    )
    rows.append(("W3 as-of --into --method replay ≤ 3 × CTAS (no rewind)",
                 f"{w3['replay_over_ctas']:.2f}", w3["replay_over_ctas"] <= 3))  # fmt: skip
    rows.append(("W3 streaming json peak ≤ 200 MB", f"{w3['stream_peak_mb']:.0f} MB",
                 w3["stream_peak_mb"] <= 200))  # fmt: skip
    return rows


def _table(data: dict[str, Any]) -> str:
    lines: list[str] = []
    if "w1" in data:
        lines += _w1_table(data["w1"])
    if "w2" in data:
        lines += _w2_table(data["w2"])
    if "w3" in data:
        lines += _w3_table(data["w3"])
    if "w4" in data:
        lines += _w4_table(data["w4"])
    if "w5" in data:
        w5 = data["w5"]
        lines += ["", f"W5: the history browser at {w5['events']:,} events, p95 ms (server time; "
                  "page_ = through the web app, rendering included)", "", "| step | p95 ms |",
                  "|---|---|"]  # fmt: skip
        lines += [f"| {name} | {value:.1f} |" for name, value in w5["p95_ms"].items()]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for name, value, ok in _targets(data):
        lines.append(f"| {name} | {value} | {'yes' if ok else 'no'} |")
    return "\n".join(lines).lstrip("\n")


def _w4_table(w4: dict[str, Any]) -> list[str]:
    gib = w4["size_bytes"] / 2**30
    lines = ["", f"W4: backups of a {gib:.2f} GiB database (pgbench scale {w4['scale']}), median "
             "seconds; plain = pg_basebackup -X stream to the same disk, and copy + WAL replay",
             "", "| step | seconds (median) | runs |", "|---|---|---|"]  # fmt: skip
    for kind, values in w4["seconds"].items():
        if values:
            runs = ", ".join(f"{v:.2f}" for v in values)
            lines.append(f"| {kind} | {statistics.median(values):.2f} | {runs} |")
    return lines


def _w1_table(w1: dict[str, Any]) -> list[str]:
    lines = [
        f"W1: one statement over {w1['rows']:,} rows, median of {w1['reps']} interleaved runs "
        "(proto-* rows: prototype capture designs from bench/prototypes.sql, not the product)",
        "",
        "| variant | INSERT s | UPDATE s | DELETE s | R INSERT | R UPDATE | R DELETE | xids/stmt |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        secs = w1["median_seconds"][v]
        r = w1["R"][v]
        x = w1["xids_per_statement"][v]
        lines.append(
            f"| {v} | {secs['INSERT']:.3f} | {secs['UPDATE']:.3f} | {secs['DELETE']:.3f} | "
            f"{r['INSERT']:.2f} | {r['UPDATE']:.2f} | {r['DELETE']:.2f} | "
            f"{max(x.values()):,} |"
        )
    lines += ["", "pgwarden-*: the default (compiled capture trigger); pgwarden-plpgsql-*: the "
              "PL/pgSQL fallback. Nothing is deferred: each statement's time is all of its work."]  # fmt: skip
    return lines


def _w2_table(w2: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    lines += ["", f"W2: pgbench tpcb-like, scale {w2['scale']}, 4 clients, {w2['seconds']} s per run", "",
              "| variant | TPS (median) |", "|---|---|"]  # fmt: skip
    lines[-2:] = ["| variant | TPS (median) | × untracked, per run | × untracked-tagged, per run |",
                  "|---|---|---|---|"]  # fmt: skip
    over_tagged = w2.get("per_run_over_tagged", {})
    for v in W2_VARIANTS:
        if v not in w2["tps"]:  # a result from before the variant existed
            continue
        tps = sorted(w2["tps"][v])
        per_run = ", ".join(f"{r:.2f}" for r in w2["per_run"].get(v, [])) or "1"
        tagged = ", ".join(f"{r:.2f}" for r in over_tagged.get(v, [])) or "–"
        lines.append(f"| {v} | {tps[len(tps) // 2]:.0f} | {per_run} | {tagged} |")
    return lines


def _w3_table(w3: dict[str, Any]) -> list[str]:
    lines = ["", "W3: reading history", "", "| measure | value |", "|---|---|"]
    for size, p99 in w3["lookup_p99_ms"].items():
        lines.append(f"| per-row lookup p99, {int(size):,} events | {p99:.2f} ms |")
    lines.append(
        f"| as-of --into, {w3['as_of_rows']:,} rows, {w3['as_of_changed_since']:,} events since "
        f"(auto: {w3['as_of_into_method']}) | {w3['as_of_into_seconds']:.2f} s |"
    )
    lines.append(
        f"| as-of --into, same, --method replay | {w3['as_of_into_replay_seconds']:.2f} s |"
    )
    lines.append(f"| CREATE TABLE AS, same table | {w3['ctas_seconds']:.2f} s |")
    lines.append(
        f"| history --format json, {w3['stream_events']:,} events | peak {w3['stream_peak_mb']:.0f} MB |"
    )
    return lines


def _chart(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w1 = data["w1"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    variants = [v for v in VARIANTS if v != "untracked"]
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        xs = [j + i * width for j in range(len(STATEMENTS))]
        ax1.bar(xs, [w1["R"][v][s] for s in STATEMENTS], width, label=v)
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(STATEMENTS))], STATEMENTS)
    ax1.axhline(1.5, color="grey", linestyle="--", linewidth=1)
    ax1.axhline(2.5, color="grey", linestyle=":", linewidth=1)
    ax1.set_ylabel("overhead R (extra plain writes per row)")
    ax1.set_title(f"W1: {w1['rows']:,}-row statements (lower is better)")
    ax1.legend(fontsize=8)
    w2 = data["w2"]
    shown = [v for v in W2_VARIANTS if v in w2["tps"]]
    ax2.bar(shown, [sorted(w2["tps"][v])[len(w2["tps"][v]) // 2] for v in shown])
    ax2.tick_params(axis="x", labelsize=8, labelrotation=45)
    ax2.set_title("W2: pgbench TPS")
    fig.suptitle(
        f"pgwarden bench {data['date']} · PostgreSQL {data['machine']['postgres']} · {data['machine']['cores']} cores"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI")
    parser.add_argument("--pg-bin", type=Path, help="PostgreSQL bin dir (default: embedded)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go")
    parser.add_argument("--workloads", default="w1,w2,w3,w4,w5",
                        help="which to run, comma-separated (default: all)")  # fmt: skip
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    chosen = {w.strip() for w in args.workloads.split(",") if w.strip()}
    known = {"w1", "w2", "w3", "w4", "w5"}
    if not chosen <= known:
        parser.error(f"unknown workloads: {', '.join(sorted(chosen - known))}")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    with bench_server(args.pg_bin) as server:
        data: dict[str, Any] = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "quick": args.quick,
            "sizes": sizes,
            "machine": {
                "cores": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "postgres": server.binaries.version,
            },
        }
        log(f"bench on {server.binaries.describe()} ({'quick' if args.quick else 'full'})")
        complete = True
        if "w1" in chosen:
            w1 = run_w1(fresh_database(server, "bench_w1"), sizes["w1_rows"], sizes["w1_reps"],
                        log)  # fmt: skip
            data["w1"] = w1.to_json()
            drop_database(server, "bench_w1")
        if "w2" in chosen:
            w2 = run_w2(fresh_database(server, "bench_w2"), server.binaries.bindir,
                        sizes["w2_scale"], sizes["w2_seconds"], sizes["w2_reps"], log)  # fmt: skip
            data["w2"] = w2.to_json()
            complete = w2.complete
            drop_database(server, "bench_w2")
        if "w3" in chosen:
            w3 = run_w3(fresh_database(server, "bench_w3"), sizes["w3_small"], sizes["w3_large"],
                        sizes["w3_as_of_rows"], sizes["w3_samples"], log)  # fmt: skip
            data["w3"] = w3.to_json()
            drop_database(server, "bench_w3")
        if "w5" in chosen:
            w5 = run_w5(fresh_database(server, "bench_w5"), sizes["w5_events"],
                        sizes["w5_samples"], log)  # fmt: skip
            data["w5"] = w5.to_json()
            drop_database(server, "bench_w5")
    if "w4" in chosen:  # its own server: one with a backup location
        data["w4"] = run_w4(args.pg_bin, sizes["w4_scale"], sizes["w4_reps"], log).to_json()

    data["targets"] = [{"target": n, "measured": v, "met": ok} for n, v, ok in _targets(data)]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = data["date"] + ("-quick" if args.quick else "")
    if chosen != known:
        stem += "-" + "-".join(sorted(chosen))
    (args.out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    charted = "w1" in data and "w2" in data  # the chart has a panel for each
    if charted:
        _chart(data, args.out / f"{stem}.png")
    table = _table(data)
    (args.out / f"{stem}.md").write_text(table + "\n")
    print(table)
    kinds = ".png, .md" if charted else ".md"
    print(f"\nwritten: {args.out / (stem + '.json')}, {kinds}", file=sys.stderr)
    if not complete:
        sys.exit("W2 completeness failed: some committed changes have no event")
