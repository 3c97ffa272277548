"""docs/BENCHMARKS.md's speed blocks: the scorer's speed and its targets, PNG encoding, load and worker
sweeps, memory, scale-out throughput, low precision, the bf16 split and the peer comparison. Rendered
through benchmarks/report.py like every generated block. Torch-free.
"""

from __future__ import annotations

import re
from typing import Any

SPEED_TARGETS = (  # (ratio key, limit, what) from issue 4
    ("ort_over_torch_b1", 0.75, "bare ONNX Runtime session vs torch eager, batch 1"),
    ("full_over_ort_b1", 1.2, "full path (bytes -> decode -> score -> overlay PNG at input size) vs bare session, batch 1"),
    ("full_model_overlay_over_ort_b1", 1.2, "full path with the overlay at the model's size vs bare session, batch 1"),
    ("best_ort_fp32_over_bound", 1.4, "best fp32 ONNX Runtime ms/image vs the fp32 bound"),
)


def speed_target_lines(res: dict[str, Any]) -> str:
    out = []
    for key, limit, what in SPEED_TARGETS:
        if key in res["ratios"]:
            v = res["ratios"][key]
            out.append(f"- {what}: **{v:.3f}** (target <= {limit}: {'met' if v <= limit else 'not met'})")
    for key, r in res["results"].items():
        bd = r.get("breakdown_ms_per_image")
        if bd and r["batch"] == 1:
            out.append(f"- {key}: decode + resize and render add **{100 * (bd['decode_ms'] + bd['render_ms']) / bd['infer_ms']:.0f} %** "
                       f"to the inference ({bd['decode_ms']:.1f} + {bd['render_ms']:.1f} ms on {bd['infer_ms']:.1f} ms)")
    if "int8" in res:
        q = res["int8"]
        verdict = 'shipped as precision="int8"' if q["shipped"] else "NOT shipped (parity does not hold)"
        out.append(f"- INT8 ({q.get('method', 'static')}; calibrated on {q['n_calibration_images']} good images): "
                   f"decision agreement {q['decision_agreement']:.3f} on {q['n_check_images']} test images, image "
                   f"AUROC {q['auroc_fp32']:.3f} -> {q['auroc_int8']:.3f} ({q['auroc_change']:+.3f}); {verdict}")
    return "\n".join(out)


def speed_markdown(res: dict[str, Any]) -> str:
    """One speed run: command, machine, table, targets."""
    from stpm.evaluation.speed import format_table  # torch-free at import

    m = res["machine"]
    return (
        f"Run `{res['bundle']}` ({res['model']['backbone']}, {res['model']['image_size']} px). "
        f"Command: `{res['command']}`.\n"
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['threads']} threads; torch {m['torch']}, onnxruntime "
        f"{m['onnxruntime']}; load average {m['load_avg_at_start'][0]:.1f} at start, "
        f"{m['load_avg_at_end'][0]:.1f} at end (contenders run interleaved in rounds so load hits them alike). "
        f"Images: {res['images']['n']} files of {res['images']['source_size'][0]} px.\n\n"
        + format_table(res) + "\n\nAgainst the targets:\n\n" + speed_target_lines(res)
    )


def _cpu_line(c: dict[str, Any]) -> str:
    """benchmarks/peer.py's cpu_info in a few words: model, cores and the SIMD flags that decide the speed."""
    flags = [f for f in c["simd_flags"] if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")]
    return f"{c['model']}, {c['cores']} cores (flags include {', '.join(flags)})"


def png_encode_markdown(res: dict[str, Any]) -> str:
    m, im = res["machine"], res["images"]
    ours = res["rows"][0]
    cpu = _cpu_line(m["cpu_info"]) if m.get("cpu_info") else f"{m['cpu']}, {m['cpus']} CPUs"
    lines = [f"Command: `{res['command'].strip()}`. Machine: {cpu}, load average "
             f"{m['load_avg_at_start']:.1f} at start, {m['load_avg_at_end']:.1f} at end; Pillow {m['pillow']}. "
             f"{im['n']} overlays of {im['shape'][1]}x{im['shape'][0]} RGB ({im['source']}), median of "
             f"{res['repeats']} passes.", "",
             "| encoder | ms/image | kB/image | time vs ours |", "|---|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['encoder']} | {r['ms_per_image']:.1f} | {r['kb_per_image']:.0f} | "
                     f"{r['ms_per_image'] / ours['ms_per_image']:.2f}x |")
    return "\n".join(lines)


RENDER_STAGES = (("decode", "decode the input PNG (stpm.imaging.decode: OpenCV)"),
                 ("decode_jpeg", "decode the same image as a JPEG, quality 90 (stpm.imaging.decode: simplejpeg)"),
                 ("resize_input_to_half", "resize the input to the model's scale, here half (Pillow's antialiased "
                  "bilinear, as training resizes)"),
                 ("resize_map_256_to_input", "resize the 256 px map to the input's size"),
                 ("overlay_blend", "colormap + blend (OpenCV)"), ("overlay_blend_pillow", "colormap + blend (Pillow)"),
                 ("encode_png", "encode the overlay, PNG (the default deflate)"),
                 ("encode_png_zlib", "encode the overlay, PNG deflated by Python's zlib (before isal)"),
                 ("encode_jpeg", "encode the overlay, JPEG"), ("encode_webp", "encode the overlay, WebP"))


def render_stages_markdown(res: dict[str, Any]) -> str:
    """benchmarks/render_stages.py: CPU ms per decode / render stage of the full path."""
    ms = res["cpu_ms_median_of_20"]
    lines = [f"Command: `OMP_NUM_THREADS={res['threads']} .venv/bin/python {res['command']}`. CPU: "
             f"{_cpu_line(res['cpu'])}; load average {res['load_average_at_start']:.1f} "
             f"at the start. Input: a {ms['image']}; PNG deflate by default: {ms.get('encode_png_deflate', 'zlib')}. "
             "CPU ms, median of 20 calls.", "", "| stage | CPU ms |", "|---|---:|"]
    lines += [f"| {label} | {ms[k]:.2f} |" for k, label in RENDER_STAGES if k in ms]
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "met" if ok else "not met"


def load_markdown(res: dict[str, Any]) -> str:
    """benchmarks/load.py: the service under K concurrent clients vs the bare scorer."""
    m, bare, rss = res["machine"], res["bare_scorer"], res["server_rss_mb"]
    threads = res["intra_op_threads"] or "default"
    lines = [f"Machine: {m['cpus']} CPUs ({m['platform']}), load average {m['loadavg_1m_at_end']:.1f} at the end; "
             f"ORT intra-op threads: {threads}; model `{res['model']}`, image `{res['image']}` "
             f"({res['image_bytes'] / 1000:.0f} kB), heatmap={res['heatmap']}.", "",
             "| clients | req/s | p50 ms | p99 ms | errors | server RSS MB |", "|---:|---:|---:|---:|---:|---:|"]
    for r in res["runs"]:
        lines.append(f"| {r['clients']} | {r['req_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | "
                     f"{r['server_rss_mb']:.0f} |")
    errors = sum(r["errors"] for r in res["runs"])
    ov = res["http_overhead_batch1"]
    peak = max([rss["after"]] + [r["server_rss_mb"] for r in res["runs"]])
    overhead = ("not measured (no 1-client run)" if ov is None
                else f"**{100 * ov:+.1f} %** (target <= 25 %: {_verdict(ov <= 0.25)})")
    batch = res["mean_batch_images"]
    lines += ["", f"Bare scorer (batch 1, decode + infer, mean of before and after the load): p50 "
              f"{bare['p50_ms']:.0f} ms. HTTP overhead at batch 1 (p50): {overhead}. Server RSS {rss['before']:.0f} "
              f"MB idle with the model loaded, {rss['after']:.0f} MB after the runs (target <= 400 MB: "
              f"{_verdict(peak <= 400)}). Errors: {errors} (target 0: {_verdict(errors == 0)}). Mean images per "
              f"inference batch: {'not recorded' if batch is None else f'{batch:.2f}'}."]
    return "\n".join(lines)


SWEEP_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")  # the result file keeps every flag


def sweep_markdown(res: dict[str, Any]) -> str:
    """benchmarks/load.py --sweep: the batcher's (batch, wait) per backend, and the choice it supports."""
    from benchmarks.batching import Rule, choose

    m, rule = res["machine"], res["rule"]
    clients = [r["clients"] for r in res["points"][0]["runs"]]
    head = " | ".join(f"{k} cl. img/s | p50 / p99 ms" for k in clients)
    lines = [f"Command: `flock /work/scratch/bench.lock .venv/bin/python {res['command']}` ({res['when']}). "
             f"Machine: {m['cpu']}, {m['cpus']} CPUs (flags include "
             f"{', '.join(f for f in SWEEP_FLAGS if f in m['flags']) or 'none of ' + ', '.join(SWEEP_FLAGS)}), "
             f"load average (1 min) {m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end. "
             f"Model `{res['model']}` ({res['method']}), image `{res['image']}` ({res['image_bytes'] / 1000:.0f} kB), "
             f"heatmap={res['heatmap']}, {res['duration_s']:g} s per client count, a fresh server per setting and round, "
             f"{res['repeats']} rounds over the grid (every other one backwards), each cell the median of the rounds; "
             f"ORT/OpenVINO threads {res['intra_op_threads']}; backend and precision as the server's /readyz reports "
             "them.", "",
             f"| backend / precision | batch | wait ms | {head} | mean batch at {clients[-1]} cl. | 1-min load, "
             f"{clients[-1]} cl. runs |",
             "|---|---:|---:|" + "---:|---:|" * len(clients) + "---:|---:|"]
    for p in sorted(res["points"], key=lambda p: (p["backend"], p["batch"], p["wait_ms"])):
        cells = " | ".join(f"{r['req_per_s']:.2f} | {r['p50_ms']:.0f} / {r['p99_ms']:.0f}" for r in p["runs"])
        last = p["runs"][-1]
        mb = "—" if last.get("mean_batch_images") is None else f"{last['mean_batch_images']:.2f}"
        errors = sum(r["errors"] for r in p["runs"])
        lines.append(f"| {p['served']['backend']} / {p['served']['precision']} | {p['batch']} | {p['wait_ms']:g} | "
                     f"{cells} | {mb} | {', '.join(f'{a:.1f}->{b:.1f}' for a, b in last['loadavg_1m'])} |"
                     + (f" **{errors} errors**" if errors else ""))
    r = Rule(clients=rule["clients"], max_slowdown=rule["max_slowdown"], tie=rule["tie"])
    lines += ["", f"Choice (benchmarks/batching.py: most images/s at {r.clients} clients among settings whose 1-client "
              f"p50 is at most {100 * r.max_slowdown:.0f} % above batch 1 / wait 0; within {100 * r.tie:.0f} % of the "
              "best counts as a tie, won by the smaller batch and wait):", ""]
    for b in sorted(res["choice"]):
        c = choose(res["points"], b, r)
        gain = c.images_per_s / c.baseline_images_per_s - 1
        lines.append(f"- **{b}: batch {c.batch}, wait {c.wait_ms:g} ms**: {c.images_per_s:.2f} images/s at {r.clients} "
                     f"clients vs {c.baseline_images_per_s:.2f} unbatched ({100 * gain:+.1f} %); 1-client p50 "
                     f"{c.p50_1_ms:.0f} ms vs {c.baseline_p50_1_ms:.0f} ms.")
    return "\n".join(lines)


def memory_markdown(res: dict[str, Any]) -> str:
    """benchmarks/memory.py: peak and resident memory of the server per request shape."""
    m, st = res["machine"], res["settings"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, load average {m['load_avg_1_5_15'][0]:.1f} (1 min) at the end. "
             f"Budget `STPM_MAX_REQUEST_PIXELS` {st['max_request_pixels']}, {st['intra_op_threads']} ORT thread(s), "
             f"model at {st['model_image_size']} px. Server idle RSS with the model loaded: {res['idle_rss_mb']} MB.", "",
             "| request | status | sent MB | answer MB | s | peak RSS MB | RSS after MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in res["cases"]:
        lines.append(f"| {r['case']} | {r['status']} | {r['request_mb']} | {r['response_mb']} | {r['seconds']} | "
                     f"{r['peak_rss_mb']} | {r['rss_after_mb']} |")
    lines += ["", f"Worst accepted request: peak RSS **{res['worst_accepted_peak_rss_mb']} MB**."]
    return "\n".join(lines)


def scale_markdown(res: dict[str, Any]) -> str:
    """benchmarks/scale.py: scoring vs API replicas, training jobs vs workers."""
    out = [f"Command: `.venv/bin/python benchmarks/{res['command']}` ({res['when']}); machine: {res['machine']['cpus']} "
           f"CPUs, {res['machine']['platform']}.", ""]
    if res.get("scoring"):
        out += ["| API replicas x ORT threads | req/s | p50 ms | p99 ms | errors | load avg before |",
                "|---|---|---|---|---|---|"]
        for r in res["scoring"]:
            out.append(f"| {r['replicas']} x {r['intra_op_threads']} | {r['req_per_s']:.2f} | {r['p50_ms']:.0f} | "
                       f"{r['p99_ms']:.0f} | {r['errors']} | {r['load_avg_before']:.1f} |")
        out.append("")
    if res.get("jobs"):
        out += ["| workers | jobs | wall s | jobs/min | mean job s | Redis cmds/job | PG commits/job | PG rows "
                "written/job | idle Redis cmds/s | idle PG commits/s | load avg before |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["jobs"]:
            p, i = r["per_job_during_batch"], r["idle_per_s"]
            out.append(f"| {r['workers']} | {r['jobs']} | {r['wall_s']} | {r['jobs_per_min']} | {r['mean_job_s']} | "
                       f"{p['redis_commands']} | {p['pg_commits']} | {p['pg_rows_inserted'] + p['pg_rows_updated']} | "
                       f"{i['redis_commands']} | {i['pg_commits']} | {r['load_avg_before']:.1f} |")
        walls = {r["workers"]: r["wall_s"] for r in res["jobs"]}
        if 1 in walls and 2 in walls:
            out += ["", f"2 workers finish the batch **{walls[1] / walls[2]:.2f}x** faster than 1."]
    return "\n".join(out).strip()


def precision_markdown(res: dict[str, Any]) -> str:
    lines = [f"Command: `.venv/bin/python {res['command']}`. CPU: {res['cpu']} (flags: {', '.join(res['cpu_flags'])}); "
             f"load average {res['load_avg_at_start'][0]:.1f} at start.", "",
             "| data | precision | backend, mode | decision agreement | flips | AUROC fp32 -> low | max score move | "
             "target (>= 0.995, <= 0.005) |",
             "|---|---|---|---:|---:|---|---:|---|"]
    for ds, r in res["bundles"].items():
        for key in [k for k in r if k == "bf16" or k.startswith("int8")]:
            q = r[key]
            p = q.get("parity", q)
            if "decision_agreement" not in p:
                lines.append(f"| {ds} | {key} | {q.get('backend')} | - | - | - | - | not measured ({q.get('reason')}) |")
                continue
            low = p.get("auroc", p.get("auroc_int8", float("nan")))
            flips = p.get("decision_flips", round((1 - p["decision_agreement"]) * p["n_check_images"]))
            ok = p["decision_agreement"] >= 0.995 and abs(low - p["auroc_fp32"]) <= 0.005
            lines.append(f"| {ds} ({p['n_check_images']} test images) | {key} | {q.get('method', q.get('backend'))} | "
                         f"{p['decision_agreement']:.3f} | {flips} | {p['auroc_fp32']:.4f} -> {low:.4f} | "
                         f"{p['max_abs_score_vs_fp32']:.3f} | {_verdict(ok)} |")
    return "\n".join(lines)


def bf16_split_markdown(res: dict[str, Any]) -> str:
    lines = [f"Command: `.venv/bin/python {res['command']}`. CPU: {res['cpu']} (flags: {', '.join(res['cpu_flags'])}); "
             f"load average {res['load_avg_at_start'][0]:.1f} at start, {res['load_avg_at_end'][0]:.1f} at the end.", "",
             "| data | mode | max / median image-score change vs f32 | flips at the threshold | image AUROC | tile ms (p50) |",
             "|---|---|---|---:|---:|---:|"]
    names = {"f32": "OpenVINO f32", "bf16_whole": "bf16, whole graph", "bf16_split": "bf16 search, f32 features (shipped)"}
    for ds, r in res["bundles"].items():
        for m, v in r["modes"].items():
            lines.append(f"| {ds} ({r['n_test']} test images) | {names.get(m, m)} | {100 * v['max_rel_score_change']:.2f} % / "
                         f"{100 * v['median_rel_score_change']:.2f} % | {v['decision_flips']} | {v['auroc']:.4f} | "
                         f"{v['tile_ms_median']:.1f} |")
    return "\n".join(lines)


PEER_LABELS = {
    "peer_ov_default": "anomalib STFPM, OpenVINO default", "peer_ov_f32": "anomalib STFPM, OpenVINO forced f32",
    "peer_pc_ov": "anomalib Patchcore, OpenVINO default", "peer_pc_torch": "anomalib Patchcore, TorchInferencer",
    "ours_full_png": "ours ResNet18 STPM, overlay PNG", "ours_full_jpeg": "ours ResNet18 STPM, overlay JPEG",
    "ours_bare_session": "ours ResNet18 STPM, bare session", "quality_full_png": "ours defaults (PatchCore), overlay PNG",
    "quality_full_jpeg": "ours defaults (PatchCore), overlay JPEG", "quality_bare_session": "ours defaults, bare session",
    "quality_f32_full_png_zlib": "ours defaults forced f32, overlay PNG deflated by zlib (before isal)",
    "quality_f32_jpegin_full_jpeg": "ours defaults forced f32, JPEG in (the same images, quality 95), overlay JPEG",
    "peer_pc_ov_f32": "anomalib Patchcore, OpenVINO forced f32",
    "quality_f32_full_png": "ours defaults forced f32, overlay PNG",
    "quality_f32_full_jpeg": "ours defaults forced f32, overlay JPEG",
    "quality_f32_bare_session": "ours defaults forced f32, bare session",
    "ours_f32_full_png": "ours ResNet18 STPM forced f32, overlay PNG",
    "ours_f32_full_jpeg": "ours ResNet18 STPM forced f32, overlay JPEG",
    "ours_f32_bare_session": "ours ResNet18 STPM forced f32, bare session",
}


def _peer_runs_on(info: dict[str, Any]) -> str:
    if "backend" in info:
        return f"{info['backend']} / {info['precision']}"
    if info.get("runtime") == "torch":
        return f"torch {info['dtype']}, {info['threads']} threads"
    m = re.search(r"'(\w+)'", str(info.get("inference_precision", "")))  # "<Type: 'bfloat16'>"
    return f"OpenVINO {m[1] if m else info.get('inference_precision', '?')}"


def _peer_patchcore_build(b: dict[str, Any]) -> str:
    """The peer Patchcore's build record (benchmarks/peer_patchcore.py) in one paragraph."""
    grid = "x".join(map(str, b["feature_grid"])) if b.get("feature_grid") else "?"
    return (f"Peer Patchcore: `Patchcore()` defaults ({b['backbone']}, {' + '.join(b['layers'])}, "
            f"{'x'.join(map(str, b['image_size']))} px input, coreset_sampling_ratio {b['coreset_sampling_ratio']}); "
            f"feature grid {grid}, {b['dims']} dims: {b['images']} training images x {b['patches_per_image']} patches = "
            f"{b['patches']} rows; bank **{b['bank_rows']} rows** ({b['bank']}). Fit (anomalib's feature pass, no "
            f"coreset): **{b['fit_seconds']:.1f} s** on {b['cpu']} with {b['torch_threads']} torch threads, load average "
            f"{b['load_average_start']:.1f} -> {b['load_average_end']:.1f}; exports (OpenVINO input "
            f"{b['openvino_input_shape']}, torch) {b['export_seconds']:.1f} s.")


def _kernels(info: dict[str, Any]) -> str:
    """A worker's OpenVINO kernel counts (benchmarks/peer.py kernel_counts), summed over its compiled models."""
    if not info.get("kernels"):
        return "—"
    total: dict[str, int] = {}
    for k in info["kernels"]:
        for name, n in k.items():
            total[name] = total.get(name, 0) + n
    return f"{total.get('avx512', 0)} / {total.get('avx2', 0)} / {total.get('mlas (not capped)', 0)}"


def peer_markdown(res: dict[str, Any]) -> str:
    loads = res["load_average_per_round"]
    cap = res.get("isa_cap")  # --max-isa: no default-precision rows; ratios to the peers' f32 rows
    pc = res.get("vs_peer_pc_ov_f32_p50" if cap else "vs_peer_pc_ov_p50", {})
    rounds = all("round_p50_ms" in r for r in res["rows"].values())
    lines = [f"Command: `.venv/bin/{res['command']}`. CPU: {res['cpu']['model']}, {res['cpu']['cores']} cores "
             f"(flags: {', '.join(f for f in res['cpu']['simd_flags'] if 'amx' in f or 'vnni' in f or 'bf16' in f)}); "
             f"load average per round {min(loads):.1f}-{max(loads):.1f}, {res['load_average_end'][0]:.1f} at the end. "
             f"Inputs: {res['images']}.", ""]
    if cap:
        lines += [f"Every worker capped at {cap['max_isa'].upper()}: "
                  + ", ".join(f"`{k}={v}`" for k, v in cap["env"].items()) + ".", ""]
    lines += ["| contender | runs on | p50 ms | p95 ms | CPU p50 ms |" + (" p50 per round, first / min / max ms |" if rounds else "")
              + (" p50 / peer STFPM f32 |" if cap else " p50 / peer default |")
              + ((" p50 / Patchcore OpenVINO f32 |" if cap else " p50 / Patchcore OpenVINO |") if pc else "")
              + (" OpenVINO kernels: AVX-512 / AVX2 / MLAS (not capped) |" if cap else ""),
              "|---|---|---:|---:|---:|" + ("---:|" if rounds else "") + "---:|" + ("---:|" if pc else "")
              + ("---|" if cap else "")]
    ratio = res.get("vs_peer_ov_f32_p50" if cap else "vs_peer_ov_default_p50", {})
    for k, r in res["rows"].items():
        rp = r.get("round_p50_ms")
        lines.append(f"| {PEER_LABELS.get(k, k)} | {_peer_runs_on(r['info'])} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                     f"{r['cpu_p50_ms']:.1f} |" + (f" {rp[0]:.1f} / {min(rp):.1f} / {max(rp):.1f} |" if rounds else "")
                     + f" {ratio.get(k, float('nan')):.2f} |" + (f" {pc[k]:.3f} |" if pc else "")
                     + (f" {_kernels(r['info'])} |" if cap else ""))
    lines.append("")
    if "peer_patchcore_build" in res:
        lines += [_peer_patchcore_build(res["peer_patchcore_build"]), ""]
    for key, peer, target, keys in (
            ("vs_peer_ov_default_p50", "the peer STFPM's OpenVINO default", 0.8,
             ("ours_full_png", "ours_full_jpeg", "quality_full_png", "quality_full_jpeg")),
            ("vs_peer_pc_ov_p50", "anomalib Patchcore's OpenVINO default", 0.1, ("quality_full_png", "quality_full_jpeg")),
            ("vs_peer_ov_f32_p50", "the peer STFPM's OpenVINO forced f32 (the proxy for a CPU without bf16)", 0.8,
             ("quality_f32_full_png", "quality_f32_full_jpeg", "ours_f32_full_png", "ours_f32_full_jpeg")),
            ("vs_peer_pc_ov_f32_p50", "anomalib Patchcore's OpenVINO forced f32 (the proxy)", 0.1,
             ("quality_f32_full_png", "quality_f32_full_jpeg"))):
        refs, spread = res.get(key, {}), res.get(key + "_round_range", {})
        for k in keys:
            if k in refs:
                within = (f"; within a round {spread[k][0]:.3f}-{spread[k][1]:.3f}x, met in every round: "
                          f"{'yes' if spread[k][1] <= target else 'no'}" if k in spread else "")
                lines.append(f"- {PEER_LABELS[k]}: p50 **{refs[k]:.3f}x** {peer} (target <= {target}: "
                             f"{_verdict(refs[k] <= target)}{within})")
    for k, share in res.get("decode_render_share_of_bare", {}).items():
        lines.append(f"- {PEER_LABELS[k]}: decode + render add **{100 * share['wall']:.0f} %** wall / "
                     f"{100 * share['cpu']:.0f} % CPU to the bare session (target, issue 26: CPU <= 25 %: "
                     f"{_verdict(share['cpu'] <= 0.25)})")
    return "\n".join(lines)
