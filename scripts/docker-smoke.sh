#!/usr/bin/env bash
# The CPU images built and run for real, end to end, on a machine without an image registry: the
# all-in-one (`--target cpu`: training + scoring) and the scoring image (`--target serve`: no torch).
#
#   scripts/docker-smoke.sh
#
#   1. a Docker engine: installs Debian's docker.io (+ debootstrap) when missing (root, apt), starts
#      dockerd when none runs (no bridge, no iptables: containers use the host's network, and the
#      service listens on 127.0.0.1 only); if no engine can be had it says SKIP and exits 0
#   2. the local base image (scripts/docker-base.sh: Debian bookworm by debootstrap), if absent
#   3. local torch/torchvision wheels into docker/wheels (pip download, pip's own configuration)
#   4. docker build --target cpu and --target serve with BuildKit (CA bundle as a secret, the base and
#      wheels as above); the serve image must be <= STPM_SMOKE_SERVE_MAX_GB
#   5. docker run the all-in-one: named volume on /data, an API key; waits for the image's HEALTHCHECK
#   6. checks: API key enforced, the processes run as uid 10001, POST /train (16 good metal-plate images,
#      64 px, 1 epoch) -> succeeded and published -> POST /score a defect image (JSON + overlay PNG)
#      -> restart -> healthy, the model still there (volume), the same score
#   7. the scoring image on the same volume, in place of the all-in-one: healthy, uid 10001, `import
#      torch` fails inside it, POST /train answers 503; it scores the model the all-in-one trained (the
#      same score), restarts, and scores it again bit for bit the same
#   8. the all-in-one through Compose v2 (docker-compose.yml + docker-compose.cpu.yml +
#      docker-compose.test.yml) with the client at hand or, as root, Debian 13's docker-compose
#      (unpacked, not installed); otherwise it says why not
#   9. removes what it made (containers, volume, image tags, wheels; the base image and BuildKit's layer
#      cache stay, so a rerun builds in seconds), stops the dockerd it started
#
# Prints each step's time and the image sizes; the last line counts the checks ("N passed, 0 failed").
# Settings (environment):
#   STPM_SHARED_DATA        data root (default ../shared/data); its absence fails under CI=true
#   STPM_CA_BUNDLE          CA bundle for HTTPS inside the build (default: pip's `cert` setting)
#   STPM_SMOKE_TORCH        torch version for the image (default 2.14.1, as scripts/test.sh)
#   STPM_SMOKE_TORCHVISION  torchvision version (default 0.29.1)
#   STPM_SMOKE_TORCH_INDEX  index for torch's dependencies (default https://pypi.org/simple)
#   STPM_SMOKE_NO_CACHE=1   build without BuildKit's layer cache (as on a fresh machine)
#   STPM_SMOKE_KEEP=1       keep the images, the wheels and a dockerd this script started
#   STPM_SMOKE_SERVE_MAX_GB the scoring image's size limit (default 1.2, issue 28)
#   STPM_SMOKE_RESULT=FILE  after a passing run, write its step times, image sizes and conditions as JSON
#                           (benchmarks/results/docker_smoke_*.json, rendered in docs/DOCKER.md)
#   STPM_SMOKE_MIN_FREE_GB  free disk the build needs in Docker's data root, else SKIP (default 25)
#   DOCKER / COMPOSE        the docker client / a Compose v2 command to use
#   STPM_SMOKE_COMPOSE=skip do not fetch Debian 13's Compose v2 when no v2 client is at hand
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

IMAGE=stpm:smoke-cpu
SERVE_IMAGE=stpm:smoke-serve
SERVE_NAME=stpm-smoke-serve
BASE=stpm-base:bookworm
NAME=stpm-smoke
VOLUME=stpm-smoke-data
MODEL=plate
TORCH="${STPM_SMOKE_TORCH:-2.14.1}"
TORCHVISION="${STPM_SMOKE_TORCHVISION:-0.29.1}"
TORCH_INDEX="${STPM_SMOKE_TORCH_INDEX:-https://pypi.org/simple}"
DATA="${STPM_SHARED_DATA:-$ROOT/../shared/data}/mpdd_metal_plate_512/metal_plate"
WORK="$(mktemp -d /tmp/stpm-smoke.XXXXXX)"
API_KEY="smoke-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
# Backend and precision pinned: "auto" times the candidates at every load and may pick another (bf16 vs
# fp32: scores ~0.2 % apart) after a restart; pinned, a restart or another image must score bit for bit
# the same (docs/SCALING.md pins them across replicas for the same reason).
BACKEND=onnxruntime
PRECISION=fp32

PASSED=0
STEPS=()
STEP_TSV=()  # "name<TAB>seconds" of every step, for STPM_SMOKE_RESULT
T0=$(date +%s)
LOAD0="$(cut -d' ' -f1-3 /proc/loadavg)"
INSTALLED=()
BASE_BUILT=false
BUILD_CACHE0=""
STARTED_DOCKERD=""
WHEELS_ADDED=()
COMPOSE_FILES=()
PHASE=""

say() { printf 'docker-smoke: %s\n' "$*"; }
die() { say "FAILED: $*" >&2; printf 'docker-smoke: %d passed, 1 failed\n' "$PASSED" >&2; exit 1; }
ok() { PASSED=$((PASSED + 1)); say "ok: $*"; }
step() {  # step NAME COMMAND...: run and time one step
    local name="$1" t s
    shift
    say "== $PHASE$name"
    t=$(date +%s.%N)
    "$@"
    s=$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    STEPS+=("$(printf '%-46s %7s s' "$PHASE$name" "$s")")
    STEP_TSV+=("$PHASE$name"$'\t'"$s")
}

# ---------------------------------------------------------------- cleanup

cleanup() {
    local rc=$?
    set +e
    if [ -n "${D:-}" ]; then
        if [ "${#COMPOSE_FILES[@]}" -gt 0 ]; then
            "${COMPOSE[@]}" "${COMPOSE_FILES[@]}" down -v --remove-orphans >/dev/null 2>&1
        fi
        "$D" rm -f "$NAME" "$SERVE_NAME" >/dev/null 2>&1
        "$D" volume rm "$VOLUME" >/dev/null 2>&1
        [ "${STPM_SMOKE_KEEP:-}" = 1 ] || "$D" image rm "$IMAGE" "$SERVE_IMAGE" >/dev/null 2>&1
    fi
    if [ "${STPM_SMOKE_KEEP:-}" != 1 ]; then
        for f in "${WHEELS_ADDED[@]}"; do rm -f "$f"; done
        if [ -n "$STARTED_DOCKERD" ]; then
            kill "$STARTED_DOCKERD" 2>/dev/null
            for _ in $(seq 30); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 1; done
        fi
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT

skip() {
    say "SKIP: $*"
    exit 0
}

# ---------------------------------------------------------------- 1. engine

# Docker >= 23 clients build with BuildKit only through the buildx plugin; Debian's 20.10 client has
# BuildKit built in (DOCKER_BUILDKIT=1). Take the first client that can do either.
pick_docker() {
    local c major
    for c in ${DOCKER:-} $(type -ap docker) /usr/bin/docker; do
        [ -x "$c" ] || continue
        if "$c" buildx version >/dev/null 2>&1; then echo "$c"; return 0; fi
        major=$("$c" --version 2>/dev/null | sed -n 's/^Docker version \([0-9]*\)\..*/\1/p')
        if [ -n "$major" ] && [ "$major" -lt 23 ]; then echo "$c"; return 0; fi
    done
    return 1
}

install_debian_packages() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [ -x /usr/bin/docker ] && command -v dockerd >/dev/null || missing+=(docker.io)
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        skip "missing ${missing[*]} and cannot install them (needs root and apt-get)"
    fi
    say "installing ${missing[*]} (Debian packages)"
    INSTALLED=("${missing[@]}")
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") \
        >"$WORK/apt.log" 2>&1 || { tail -n 20 "$WORK/apt.log" >&2; skip "could not install ${missing[*]}"; }
}

engine() {
    install_debian_packages
    D="$(pick_docker)" || skip "no docker client that can build with BuildKit (a >= 23 client needs buildx)"
    export DOCKER_BUILDKIT=1
    say "docker client: $D ($("$D" --version))"
    if ! "$D" info >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || skip "no Docker daemon runs and starting one needs root"
        command -v dockerd >/dev/null || skip "no dockerd"
        say "starting dockerd (unix socket only, --bridge=none --iptables=false; log $WORK/dockerd.log)"
        dockerd --host unix:///var/run/docker.sock --bridge=none --iptables=false --ip6tables=false \
            --ip-forward=false --ip-masq=false >"$WORK/dockerd.log" 2>&1 &
        STARTED_DOCKERD=$!
        for _ in $(seq 60); do
            "$D" info >/dev/null 2>&1 && break
            kill -0 "$STARTED_DOCKERD" 2>/dev/null || break
            sleep 1
        done
        if ! "$D" info >/dev/null 2>&1; then
            tail -n 20 "$WORK/dockerd.log" >&2
            STARTED_DOCKERD=""
            skip "dockerd cannot start on this machine (its log above)"
        fi
    fi
    say "daemon: $("$D" version --format '{{.Server.Version}}'), $("$D" info --format '{{.OperatingSystem}}, {{.NCPU}} CPUs, storage {{.Driver}}')"
    BUILD_CACHE0="$("$D" system df --format '{{.Type}}: {{.Size}}' | grep -i 'build cache' | cut -d' ' -f3)"
    say "build cache at the start: ${BUILD_CACHE0:-none}"
    # A build from scratch fills ~19 GB (the 5.5 GB venv in a build layer and in the image, the export).
    local root free
    root="$("$D" info --format '{{.DockerRootDir}}')"
    free="$(df --output=avail -B1G "$root" | tail -n 1 | tr -d ' ')"
    if [ "$free" -lt "${STPM_SMOKE_MIN_FREE_GB:-25}" ] && ! "$D" image inspect "$IMAGE" >/dev/null 2>&1; then
        skip "only $free GB free in $root; a build from scratch needs ~${STPM_SMOKE_MIN_FREE_GB:-25} GB"
    fi
}

# ---------------------------------------------------------------- 2-4. base, wheels, build

base_image() {
    "$D" image inspect "$BASE" >/dev/null 2>&1 || BASE_BUILT=true
    DOCKER="$D" scripts/docker-base.sh "$BASE"
}

ca_bundle() {
    local ca="${STPM_CA_BUNDLE:-${PIP_CERT:-}}"
    [ -n "$ca" ] || ca="$(python3 -m pip config get global.cert 2>/dev/null || true)"
    [ -n "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt
    [ -f "$ca" ] || die "CA bundle $ca does not exist (set STPM_CA_BUNDLE)"
    echo "$ca"
}

wheels() {
    local f before
    before="$(ls docker/wheels)"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 -d docker/wheels \
        "torch==$TORCH" "torchvision==$TORCHVISION" 2>&1 | grep -v "^WARNING: Location" || true
    for f in docker/wheels/*.whl; do
        [ -f "$f" ] || die "pip download left no wheel in docker/wheels"
        grep -qxF "$(basename "$f")" <<<"$before" || WHEELS_ADDED+=("$ROOT/$f")
    done
    ls -l docker/wheels/*.whl
}

build() {  # build TARGET TAG
    local target="$1" tag="$2" ca no_cache=()
    ca="$(ca_bundle)"
    [ "${STPM_SMOKE_NO_CACHE:-}" = 1 ] && no_cache=(--no-cache)
    say "build log: $WORK/build-$target.log (CA bundle: $ca)"
    if ! "$D" build --progress=plain "${no_cache[@]}" --network host --target "$target" \
            --build-arg BASE_IMAGE="$BASE" \
            --build-arg TORCH_CPU_VERSION="$TORCH" \
            --build-arg TORCHVISION_CPU_VERSION="$TORCHVISION" \
            --build-arg TORCH_CPU_INDEX="$TORCH_INDEX" \
            --build-arg TEACHERS=efficientnet_lite0 \
            --secret id=ca,src="$ca" \
            -t "$tag" . >"$WORK/build-$target.log" 2>&1; then
        tail -n 40 "$WORK/build-$target.log" >&2
        die "docker build --target $target failed"
    fi
    grep -E "^#[0-9]+ [0-9.]+ (torch |\[')" "$WORK/build-$target.log" | sed 's/^/    build: /' || true
    ok "image $tag (--target $target) built with $D"
    # Build inputs stay out of the image: no wheel folder, and the CA bundle is the base's own.
    local sum_img sum_base sum_host
    sum_img="$("$D" run --rm --network none --entrypoint sha256sum "$tag" /etc/ssl/certs/ca-certificates.crt | cut -c1-64)"
    sum_base="$("$D" run --rm --network none --entrypoint sha256sum "$BASE" /etc/ssl/certs/ca-certificates.crt | cut -c1-64)"
    sum_host="$(sha256sum "$ca" | cut -c1-64)"
    [ "$sum_img" = "$sum_base" ] || die "the CA bundle of $tag is not the base image's"
    [ "$sum_host" != "$sum_base" ] || say "note: the build's CA bundle equals the base's, so this check is vacuous"
    "$D" run --rm --network none --entrypoint sh "$tag" -c '! ls -d /wheels /src /run/secrets/ca 2>/dev/null' >/dev/null \
        || die "build inputs (/wheels, /src or the secret) are in $tag"
    ok "no build inputs in $tag (CA bundle = the base's ${sum_base:0:12}, the build's was ${sum_host:0:12})"
    say "image size of $tag: $(size_gb "$tag") (base $("$D" image inspect -f '{{.Size}}' "$BASE" | awk '{printf "%.0f MB", $1 / 1e6}'))"
}

size_gb() {  # size_gb IMAGE: its size in GB (10^9 bytes), as `docker image ls` counts it
    "$D" image inspect -f '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1 / 1e9}'
}

check_sizes() {
    IMAGE_SIZE="$(size_gb "$IMAGE")"
    SERVE_SIZE="$(size_gb "$SERVE_IMAGE")"
    local max="${STPM_SMOKE_SERVE_MAX_GB:-1.2}"
    awk -v s="${SERVE_SIZE% GB}" -v m="$max" 'BEGIN { exit !(s <= m) }' \
        || die "the scoring image is $SERVE_SIZE, over the ${max} GB limit"
    ok "the scoring image is $SERVE_SIZE (limit $max GB), the all-in-one $IMAGE_SIZE"
}

write_result() {  # STPM_SMOKE_RESULT: this run as JSON (benchmarks/report.py renders it in docs/DOCKER.md)
    [ -n "${STPM_SMOKE_RESULT:-}" ] || return 0
    printf '%s\n' "${STEP_TSV[@]}" >"$WORK/steps.tsv"
    python3 - "$STPM_SMOKE_RESULT" "$WORK/steps.tsv" <<PY
import json, sys
steps = [dict(name=n, seconds=float(s)) for n, s in (l.rstrip("\n").split("\t") for l in open(sys.argv[2]))]
cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
res = {
    "command": "${STPM_SMOKE_COMMAND:-CI=true scripts/docker-smoke.sh}", "when": "$(date -u +%F)",
    "commit": "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)",
    "machine": {"cpu": cpu, "cores": $(nproc), "load_avg_start": "$LOAD0", "load_avg_end": "$(cut -d' ' -f1-3 /proc/loadavg)",
                "docker": "$("$D" version --format '{{.Server.Version}}')"},
    "conditions": {"installed_packages": "${INSTALLED[*]}".split(), "base_built": $( [ "$BASE_BUILT" = true ] && echo True || echo False),
                   "build_cache_at_start": "$BUILD_CACHE0", "no_cache": "${STPM_SMOKE_NO_CACHE:-}" == "1"},
    "images": {"$IMAGE": $("$D" image inspect -f '{{.Size}}' "$IMAGE"), "$SERVE_IMAGE": $("$D" image inspect -f '{{.Size}}' "$SERVE_IMAGE")},
    "checks_passed": $PASSED, "total_s": $(( $(date +%s) - T0 )), "steps": steps,
}
open(sys.argv[1], "w").write(json.dumps(res, indent=2) + "\n")
PY
    say "result written to $STPM_SMOKE_RESULT"
}

# ---------------------------------------------------------------- 5-6. the API through the container

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_healthy() {  # wait_healthy CONTAINER: the image's HEALTHCHECK says healthy
    local c="$1" state i
    for i in $(seq 240); do
        state="$("$D" inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$c")"
        case "$state" in
            "running healthy") ok "healthy after ${i} s (the image's HEALTHCHECK)"; return 0 ;;
            running*) sleep 1 ;;
            *) "$D" logs --tail 50 "$c" >&2; die "container $c is $state" ;;
        esac
    done
    "$D" logs --tail 50 "$c" >&2
    die "container $c not healthy after 240 s"
}

api() {  # api METHOD PATH OUTFILE [curl args...]: prints the HTTP status
    local method="$1" path="$2" out="$3"
    shift 3
    curl -sS -o "$out" -w '%{http_code}' -X "$method" -H "X-API-Key: $API_KEY" "$@" "http://127.0.0.1:$PORT$path"
}

pyjson() {  # pyjson FILE PYTHON: run PYTHON with d = the parsed JSON file (assert to check)
    python3 -c "import json, sys; d = json.load(open(sys.argv[1])); $2" "$1"
}

check_non_root() {  # check_non_root CONTAINER
    local c="$1" procs
    [ "$("$D" inspect -f '{{.Config.User}}' "$c")" = "10001:10001" ] || die "image USER is not 10001:10001"
    procs="$("$D" top "$c" -eo pid,uid,args | tail -n +2)"
    awk '{ print "    " $0 }' <<<"$procs"
    [ -n "$procs" ] || die "docker top listed no process"
    awk '$2 != 10001 { bad = 1 } END { exit bad }' <<<"$procs" || die "a process in the container is not uid 10001"
    ok "every process in the container runs as uid 10001 (user stpm)"
}

check_auth() {
    local code
    code="$(curl -sS -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/models")"
    [ "$code" = 401 ] || die "GET /models without the key: HTTP $code, expected 401"
    code="$(api GET /models "$WORK/models.json")"
    [ "$code" = 200 ] || die "GET /models with the key: HTTP $code"
    ok "API key enforced (401 without, 200 with)"
}

train() {
    local files=() f code state i
    for f in $(find "$DATA/train/good" -maxdepth 1 -name '*.png' -printf '%f\n' | sort | head -n 16); do
        files+=(-F "files=@$DATA/train/good/$f")
    done
    [ "${#files[@]}" -eq 32 ] || die "fewer than 16 good images in $DATA/train/good"
    code="$(api POST /train "$WORK/job.json" "${files[@]}" -F "name=$MODEL" -F backbone=efficientnet_lite0 \
        -F image_size=64 -F epochs=1 -F batch_size=4 -F activate=true)"
    [ "$code" = 202 ] || { cat "$WORK/job.json" >&2; die "POST /train: HTTP $code"; }
    JOB="$(pyjson "$WORK/job.json" 'print(d["job_id"])')"
    ok "POST /train: 202, job $JOB (16 images, 64 px, 1 epoch, efficientnet_lite0)"
    for i in $(seq 900); do
        api GET "/train/$JOB" "$WORK/job.json" >/dev/null
        state="$(pyjson "$WORK/job.json" 'print(d["state"])')"
        case "$state" in
            succeeded) break ;;
            failed|cancelled) cat "$WORK/job.json" >&2; die "job $JOB $state" ;;
        esac
        sleep 1
    done
    [ "$state" = succeeded ] || die "job $JOB still $state after 900 s"
    VERSION="$(pyjson "$WORK/job.json" 'print(d["version"])')"
    ok "job succeeded after ~${i} s and published $MODEL/$VERSION"
    api GET "/models/$MODEL" "$WORK/model.json" >/dev/null
    pyjson "$WORK/model.json" "assert d['active_version'] == '$VERSION', d['active_version']"
    ok "$MODEL/$VERSION is the active version"
}

score() {  # score LABEL: POST /score a defect image; checks the JSON and the overlay PNG; sets SCORE
    local label="$1" img code
    img="$(find "$DATA/test/defect" -maxdepth 1 -name '*.png' -printf '%f\n' | sort | head -n 1)"
    code="$(api POST "/score?model=$MODEL&heatmap=overlay" "$WORK/score.json" -F "files=@$DATA/test/defect/$img")"
    [ "$code" = 200 ] || { cat "$WORK/score.json" >&2; die "POST /score: HTTP $code"; }
    SCORE="$(python3 - "$WORK/score.json" "$DATA/test/defect/$img" "$MODEL" "$VERSION" "$WORK/overlay-$label.png" <<'PY'
import base64, json, math, struct, sys
d = json.load(open(sys.argv[1]))
src, model, version, out = sys.argv[2:]
w, h = struct.unpack(">II", open(src, "rb").read()[16:24])  # the input PNG's IHDR
assert (d["model"], d["version"], d["batch_images"]) == (model, version, 1), d
r = d["results"][0]
assert r["file"] == src.rsplit("/", 1)[1], r["file"]
assert math.isfinite(r["score"]) and math.isfinite(r["raw_score"]) and math.isfinite(r["threshold"]), r
assert isinstance(r["is_anomaly"], bool) and (r["width"], r["height"]) == (w, h), r
png = base64.b64decode(r["overlay_png"])
assert png[:8] == b"\x89PNG\r\n\x1a\n", "the overlay is not a PNG"
assert struct.unpack(">II", png[16:24]) == (w, h), "the overlay's size differs from the input's"
open(out, "wb").write(png)
print(repr(r["score"]))
print(f"    score {r['score']:.4f} (raw {r['raw_score']:.4g}, threshold {r['threshold']:.4g}), "
      f"anomaly {r['is_anomaly']}, overlay PNG {w}x{h} ({len(png)} bytes)", file=sys.stderr)
PY
)" || die "the /score response failed its checks: $(head -c 300 "$WORK/score.json")"
    cp "$WORK/score.json" "$WORK/score-$label.json"
    if [ -n "${STPM_SMOKE_OUT:-}" ]; then mkdir -p "$STPM_SMOKE_OUT" && cp "$WORK/overlay-$label.png" "$STPM_SMOKE_OUT/"; fi
    ok "POST /score ($label): $MODEL/$VERSION scored $img; JSON and overlay PNG checked"
}

check_inference() {  # the server runs the model on the pinned backend and precision (GET /readyz)
    api GET /readyz "$WORK/ready.json" >/dev/null
    pyjson "$WORK/ready.json" "assert (d.get('backend'), d.get('precision')) == ('$BACKEND', '$PRECISION'), d" \
        || die "the model does not run on $BACKEND/$PRECISION: $(cat "$WORK/ready.json")"
    ok "/readyz: $MODEL/$VERSION runs on $BACKEND, $PRECISION (pinned)"
}

exercise() {  # exercise CONTAINER RESTART_COMMAND...: train -> publish -> score -> restart -> score
    local c="$1"
    shift
    step "wait for healthy" wait_healthy "$c"
    step "non-root" check_non_root "$c"
    step "API key" check_auth
    step "train (16 images, 64 px, 1 epoch)" train
    step "score a defect image" score first
    check_inference
    step "restart" "$@"
    step "wait for healthy after restart" wait_healthy "$c"
    step "score again after restart" score restarted
    same_results "$WORK/score-first.json" "$WORK/score-restarted.json" \
        || die "the results changed across the restart"
    ok "the model survived the restart (volume): the same results bit for bit, score $SCORE"
}

# The image's own HEALTHCHECK command, polled every few seconds instead of its 30 s interval (the compose
# phase keeps the files' interval): four waits fewer of up to 30 s each.
HEALTH_INTERVAL=(--health-interval 3s)

run_container() {
    PORT="$(free_port)"
    "$D" volume create "$VOLUME" >/dev/null
    "$D" run -d --name "$NAME" --network host -v "$VOLUME:/data" "${HEALTH_INTERVAL[@]}" \
        -e STPM_API_KEY="$API_KEY" -e STPM_HOST=127.0.0.1 -e STPM_PORT="$PORT" \
        -e STPM_BACKEND="$BACKEND" -e STPM_PRECISION="$PRECISION" "$IMAGE" >/dev/null
    say "container $NAME on 127.0.0.1:$PORT (host network), volume $VOLUME on /data"
}

restart_container() {
    "$D" restart "$NAME" >/dev/null
}

remove_container() {  # remove_container NAME: the container; the volume stays
    "$D" rm -f "$1" >/dev/null
}

remove_volume() {
    "$D" volume rm "$VOLUME" >/dev/null
}

# ---------------------------------------------------------------- 7. the scoring image on the same volume

run_serve_container() {
    PORT="$(free_port)"
    "$D" run -d --name "$SERVE_NAME" --network host -v "$VOLUME:/data" "${HEALTH_INTERVAL[@]}" \
        -e STPM_API_KEY="$API_KEY" -e STPM_HOST=127.0.0.1 -e STPM_PORT="$PORT" \
        -e STPM_BACKEND="$BACKEND" -e STPM_PRECISION="$PRECISION" "$SERVE_IMAGE" >/dev/null
    say "container $SERVE_NAME ($SERVE_IMAGE) on 127.0.0.1:$PORT, the all-in-one's volume $VOLUME on /data"
}

check_no_torch() {
    local out code
    if out="$("$D" exec "$SERVE_NAME" python -c 'import torch' 2>&1)"; then
        die "import torch succeeded inside $SERVE_IMAGE"
    fi
    grep -q "ModuleNotFoundError: No module named 'torch'" <<<"$out" || die "import torch failed otherwise: $out"
    ok "import torch fails inside the scoring container: $(tail -n 1 <<<"$out")"
    code="$(api POST /train "$WORK/train503.json" -F "files=@$DATA/train/good/$(ls "$DATA/train/good" | head -n 1)" \
        -F "name=$MODEL")"
    [ "$code" = 503 ] || { cat "$WORK/train503.json" >&2; die "POST /train on the scoring image: HTTP $code, expected 503"; }
    pyjson "$WORK/train503.json" "assert d['error'] == 'training_unavailable', d"
    ok "POST /train on the scoring image: 503 training_unavailable (no torch, no local training)"
}

same_results() {  # same_results A.json B.json: the answers (timings aside) equal bit for bit
    python3 - "$1" "$2" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
for d in (a, b):  # the timings are the only field that may change
    d.pop("timings_ms", None)
    for r in d["results"]:
        r.pop("timings_ms", None)
if json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True):
    sys.exit(0)
ra, rb = a["results"][0], b["results"][0]
diff = {k: (ra.get(k), rb.get(k)) for k in sorted(set(ra) | set(rb)) if ra.get(k) != rb.get(k)}
print("    differ: " + ", ".join(f"{k}: {'<base64>' if k.endswith('_png') else v}" for k, v in diff.items()), file=sys.stderr)
sys.exit(1)
PY
}

serve_exercise() {  # the all-in-one's model scored by the scoring image, across a restart
    step "wait for healthy" wait_healthy "$SERVE_NAME"
    step "non-root" check_non_root "$SERVE_NAME"
    step "no torch" check_no_torch
    step "score the all-in-one's model" score serve-first
    check_inference
    # Both images install the same scoring stack from pyproject.toml; should a release differ between
    # their builds, a difference in the last bits is reported, and only a real one fails.
    if same_results "$WORK/score-restarted.json" "$WORK/score-serve-first.json"; then
        ok "the scoring image scores $MODEL/$VERSION bit for bit as the all-in-one did: $SCORE"
    else
        python3 -c "import sys; a, b = map(float, sys.argv[1:]); assert abs(a - b) <= 1e-6 * max(1, abs(a)), (a, b)" \
            "$(pyjson "$WORK/score-restarted.json" 'print(repr(d["results"][0]["score"]))')" "$SCORE" \
            || die "the scoring image's score differs from the all-in-one's"
        ok "the scoring image scores $MODEL/$VERSION as the all-in-one did (score within 1e-6, NOT bit for bit)"
    fi
    step "restart" "$D" restart "$SERVE_NAME"
    step "wait for healthy after restart" wait_healthy "$SERVE_NAME"
    step "score again after restart" score serve-restarted
    same_results "$WORK/score-serve-first.json" "$WORK/score-serve-restarted.json" \
        || die "the scoring image's results changed across its restart"
    ok "after a restart the scoring image returns the same results bit for bit (scores, maps, overlay PNG)"
}

# ---------------------------------------------------------------- 7. compose

# A Compose v2 client >= 2.24.4 (`!reset` in docker-compose.cpu.yml). Debian bookworm's docker-compose
# is v1 (1.29), which cannot read the project's files (no top-level `name:`, no `!reset` tag). Without a
# v2 client, as root with apt, Debian 13's docker-compose package (v2, one static binary) is downloaded
# into the work folder with a private apt state and run from there: nothing is installed.
compose_version_ok() {  # compose_version_ok CMD...: prints the version; fails below 2.24.4
    local v
    v="$("$@" version --short 2>/dev/null || "$@" --version 2>/dev/null || true)"
    v="$(grep -oE '[0-9]+\.[0-9]+\.[0-9]+' <<<"$v" | head -n 1)"
    echo "${v:-unknown}"
    [ -n "$v" ] && [ "$(printf '%s\n' 2.24.4 "$v" | sort -V | head -n 1)" = 2.24.4 ]
}

fetch_compose_v2() {  # prints the path of Debian 13's docker-compose binary, unpacked into $WORK
    local a="$WORK/apt" opts
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || return 1
    mkdir -p "$a/lists/partial" "$a/cache/archives/partial" "$a/root"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${DEBIAN_MIRROR:-http://deb.debian.org/debian} trixie main" \
        >"$a/sources.list"
    opts=(-q -o Dir::Etc::SourceList="$a/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o Dir::State::Lists="$a/lists" -o Dir::Cache="$a/cache" -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" update >"$a/log" 2>&1 \
        && (cd "$a" && apt-get "${opts[@]}" download docker-compose >>"$a/log" 2>&1) \
        && dpkg-deb -x "$a"/docker-compose_*.deb "$a/root" \
        && echo "$a/root/usr/libexec/docker/cli-plugins/docker-compose"
}

pick_compose() {  # sets COMPOSE (an array); prints what it chose, or why there is none
    local cmd=() v why=""
    if [ -n "${COMPOSE:-}" ]; then read -r -a cmd <<<"$COMPOSE"
    elif "$D" compose version >/dev/null 2>&1; then cmd=("$D" compose)
    elif command -v docker-compose >/dev/null; then cmd=(docker-compose)
    fi
    if [ "${#cmd[@]}" -gt 0 ]; then
        v="$(compose_version_ok "${cmd[@]}")" && { COMPOSE=("${cmd[@]}"); echo "${cmd[*]} $v"; return 0; }
        why="${cmd[*]} is version $v; the compose files need Compose v2 >= 2.24.4 (v1 reads neither the top-level name: nor !reset)"
    fi
    if [ "${STPM_SMOKE_COMPOSE:-}" != skip ] && cmd=("$(fetch_compose_v2)") && [ -x "${cmd[0]}" ] \
            && v="$(compose_version_ok "${cmd[@]}")"; then
        COMPOSE=("${cmd[@]}")
        echo "${cmd[*]} $v (Debian 13's docker-compose package, unpacked, not installed${why:+; $why})"
        return 0
    fi
    echo "${why:-no Compose client}"
    return 1
}

compose_smoke() {
    local c
    pick_compose >"$WORK/compose.txt" || { say "compose: not run: $(cat "$WORK/compose.txt")"; return 0; }
    say "compose client: $(cat "$WORK/compose.txt")"
    PHASE="compose: "
    PORT="$(free_port)"
    export STPM_API_KEY="$API_KEY" STPM_IMAGE="$IMAGE" STPM_SMOKE_PORT="$PORT" \
        STPM_BACKEND="$BACKEND" STPM_PRECISION="$PRECISION"  # through the files' pass-through
    COMPOSE_FILES=(-p stpm-smoke -f docker-compose.yml -f docker-compose.cpu.yml -f docker-compose.test.yml)
    step "compose up" "${COMPOSE[@]}" "${COMPOSE_FILES[@]}" up -d --no-build --quiet-pull
    c="$("${COMPOSE[@]}" "${COMPOSE_FILES[@]}" ps -q api)"
    [ -n "$c" ] || die "compose started no api container"
    [ "$("$D" inspect -f '{{.HostConfig.NetworkMode}}' "$c")" = host ] || die "the compose container is not on the host network"
    say "compose container $(cut -c1-12 <<<"$c") on 127.0.0.1:$PORT (host network)"
    exercise "$c" "${COMPOSE[@]}" "${COMPOSE_FILES[@]}" restart api
    step "compose down -v" "${COMPOSE[@]}" "${COMPOSE_FILES[@]}" down -v
    COMPOSE_FILES=()
}

# ---------------------------------------------------------------- main

if [ ! -d "$DATA/train/good" ] || [ ! -d "$DATA/test/defect" ]; then
    [ "${CI:-}" = true ] && die "the metal-plate data is missing: $DATA"
    skip "the metal-plate data is missing: $DATA (set STPM_SHARED_DATA)"
fi
say "load average $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs"
step "docker engine" engine
step "base image $BASE" base_image
step "wheels (torch $TORCH, torchvision $TORCHVISION)" wheels
step "docker build --target cpu" build cpu "$IMAGE"
step "docker build --target serve" build serve "$SERVE_IMAGE"
check_sizes
PHASE="all-in-one: "
step "docker run" run_container
exercise "$NAME" restart_container
step "remove the container (the volume stays)" remove_container "$NAME"
PHASE="serve: "
step "docker run on the same volume" run_serve_container
serve_exercise
step "remove the container" remove_container "$SERVE_NAME"
step "remove the volume" remove_volume
PHASE=""
compose_smoke

say "image $IMAGE: $IMAGE_SIZE, $SERVE_IMAGE: $SERVE_SIZE; step times:"
printf '    %s\n' "${STEPS[@]}"
say "total $(( $(date +%s) - T0 )) s"
write_result
printf 'docker-smoke: %d passed, 0 failed\n' "$PASSED"
