"""docs/SCALING.md's `scale_faults` block: per fault of the scaled-out mode, what a user sees and what
tests/test_scale_faults.py measured (benchmarks/results/scale_faults.json, written by
benchmarks/scale_faults.py). Rendered through benchmarks/report.py like every generated block. Torch-free.
"""

from __future__ import annotations

from typing import Any


def _postgres_row(pg: dict[str, Any]) -> tuple[str, str, str]:
    return (
        "PostgreSQL restarted mid-job",
        ("`/train` routes answer **503** `job_store_unavailable` with the reason and `Retry-After: 5` (JSON); "
         "`/score` and `/healthz` answer as usual; the running job pauses, then succeeds; no row lost"),
        (f"down {pg['db_down_s']} s: {pg['answers_503']} job requests answered 503, {pg['scores_while_down']} "
         f"scores 200; every replica served `/train` again {pg['serving_again_after_s']} s after the restart, none "
         f"restarted; the job {pg['job']}; rows kept {pg['rows_kept']} of {pg['rows_before']}"),
    )


def _redis_row(rd: dict[str, Any]) -> tuple[str, str, str]:
    return (
        "Redis restarted with jobs queued",
        ("nothing: queued jobs keep their tasks (append-only file); a job submitted while it is down gets its 202 "
         "and its task once Redis is back (the replicas' sweep)"),
        (f"down {rd['broker_down_s']} s; {rd['jobs']} jobs ({rd['queued_in_redis']} waiting in Redis, "
         f"{rd['submitted_while_down']} submitted while down) all succeeded, runs per job "
         f"{'/'.join(map(str, rd['runs_per_job']))}; {rd['duplicate_deliveries']} duplicate delivery(ies) found "
         f"the job taken and did nothing; the one submitted while down was sent {rd['sent_after_restart_s']} s "
         f"after the restart; all done {rd['all_done_after_s']} s after it (tiny jobs, one worker)"),
    )


def _cut_row(cut: dict[str, Any]) -> tuple[str, str, str]:
    return (
        "A worker's host cut off mid-job (network namespace, link down)",
        ("the job turns `failed`: \"its worker ... stopped sending heartbeats N s ago ...; resubmit it\"; no "
         "version, no staging folder; the other workers and replicas carry on"),
        (f"failed **{cut['failed_after_s']} s** after the cut (stated: at most stale {cut['stale_after_s']:g} s + "
         f"one sweep {cut['sweep_s']:g} s); its training process, unable to confirm its row, stopped by itself "
         f"{cut['training_stopped_after_s']} s after the cut; versions {cut['versions']}, staging folders "
         f"{cut['staging_left']}; the worker answered pings {cut['worker_answers_after_heal_s']} s after its link "
         "came back, the job still failed"),
    )


def _kill_row(kill: dict[str, Any]) -> tuple[str, str, str]:
    statuses = "/".join(map(str, kill["failed_statuses"])) or "-"
    return (
        f"An API replica `SIGKILL`ed under load behind nginx ({kill['replicas']} replicas)",
        ("only the requests that replica had taken fail (502 from the proxy): those in flight on it, and those "
         "sent to it in the moment it was dying (a POST is not retried once sent); the other replicas serve the rest"),
        (f"{kill['clients']} clients, {kill['requests']} `POST /score`: **{kill['failed']} failed** ({statuses}), "
         f"each sent before the replica was gone (it was reaped {kill['kill_to_reaped_s'] * 1000:.0f} ms after "
         f"the signal; {kill['in_flight_at_kill']} requests were in flight on the {kill['replicas']} replicas at "
         f"the kill); {kill['served_after_kill']} sent later, all served"),
    )


def scale_faults_markdown(res: dict[str, Any]) -> str:
    """benchmarks/scale_faults.py: what tests/test_scale_faults.py measured per fault."""
    m, f = res["machine"], res["faults"]
    cut = f["worker_cut"]
    rows = [_postgres_row(f["postgres_restart"]), _redis_row(f["redis_restart"]), _cut_row(cut),
            _kill_row(f["replica_kill"])]
    lines = ["| fault | what the user sees | measured |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", (f"`{res['command']}` (runs `{res['test']}`, {res['test_s']} s), commit {res['commit']}, "
                   f"{res['when']}; machine: {m['cpu']}, {m['cores']} cores, load average "
                   f"{m['load_avg_start'].split()[0]} -> {m['load_avg_end'].split()[0]}. Test settings: heartbeat "
                   f"{cut['heartbeat_s']:g} s, `STPM_JOB_STALE_AFTER_S={cut['stale_after_s']:g}`, the cut-off "
                   "worker's database URL with `connect_timeout=2&tcp_user_timeout=2000`.")]
    return "\n".join(lines)
