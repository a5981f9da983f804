#!/usr/bin/env bash
# End to end on kind: build the images, install the chart, train digits-cnn, wait for Serving, query the
# endpoint (OIP JSON infer and /classify) and check the prediction. Needs docker (with a running engine),
# kind, kubectl, helm and curl; python3 only for JSON handling.
#
# Environment:
#   KILN_E2E_CLUSTER   kind cluster name (default kiln-e2e)
#   KILN_E2E_TIMEOUT   seconds to wait for phase Serving (default 900)
#   KILN_E2E_KEEP      1 keeps the cluster afterwards (default 0: delete it)
#   KILN_E2E_BUILD     0 skips building the images (default 1)
#   HELM               helm binary (default: $KILN_TEST_BIN/helm when `make test` built it, else helm on PATH)
set -euo pipefail

cd "$(dirname "$0")/../.."

CLUSTER=${KILN_E2E_CLUSTER:-kiln-e2e}
TIMEOUT=${KILN_E2E_TIMEOUT:-900}
KEEP=${KILN_E2E_KEEP:-0}
BUILD=${KILN_E2E_BUILD:-1}
if [[ -z "${HELM:-}" ]]; then
  if [[ -x "${KILN_TEST_BIN:-}/helm" ]]; then HELM=${KILN_TEST_BIN}/helm; else HELM=helm; fi
fi
VERSION=0.1.0
RELEASE=kiln
SYSTEM_NS=kiln-system
JOB=digits-cnn
JOB_NS=default
LOCAL_PORT=18080
CONTEXT=kind-${CLUSTER}
PORT_FORWARD_PID=""

log() { printf '[e2e] %s\n' "$*" >&2; }
kc() { kubectl --context "${CONTEXT}" "$@"; }

# On failure show what happened; always stop the port-forward and (unless kept) delete the cluster.
cleanup() {
  local status=$?
  if [[ -n "${PORT_FORWARD_PID}" ]]; then
    kill "${PORT_FORWARD_PID}" 2>/dev/null || true
  fi
  if [[ ${status} -ne 0 ]] && kind get clusters 2>/dev/null | grep -qx "${CLUSTER}"; then
    log "FAILED (exit ${status}); dumping state"
    kc -n "${JOB_NS}" get trainingjobs,jobs,deployments,pods,services,pvc -o wide || true
    kc -n "${JOB_NS}" describe trainingjob "${JOB}" || true
    kc -n "${JOB_NS}" describe pods -l "kiln.dev/trainingjob=${JOB}" || true
    kc -n "${JOB_NS}" logs -l "kiln.dev/trainingjob=${JOB}" --all-containers --tail=200 --prefix || true
    kc -n "${SYSTEM_NS}" describe pods || true
    kc -n "${SYSTEM_NS}" logs "deployment/${RELEASE}" --tail=500 || true
    kc get events -A --sort-by=.lastTimestamp | tail -n 50 || true
  fi
  if [[ "${KEEP}" != 1 ]]; then
    kind delete cluster --name "${CLUSTER}" >/dev/null 2>&1 || true
  else
    log "keeping cluster ${CLUSTER} (kubectl --context ${CONTEXT})"
  fi
  exit "${status}"
}
trap cleanup EXIT

for tool in docker kind kubectl "${HELM}" curl python3; do
  command -v "${tool}" >/dev/null || { log "missing ${tool}"; exit 2; }
done
docker info >/dev/null 2>&1 || { log "docker engine not reachable (docker info failed)"; exit 2; }

# 1. The CPU images (the Makefile's `images` target also builds the CUDA ones, which kind does not need).
images=(kiln-operator kiln-trainer kiln-serving)
if [[ "${BUILD}" == 1 ]]; then
  docker build -f operator/Dockerfile -t "kiln-operator:${VERSION}" .
  docker build -f trainer/Dockerfile -t "kiln-trainer:${VERSION}" .
  docker build -f serving/Dockerfile -t "kiln-serving:${VERSION}" .
fi

# 2. A cluster with the images loaded.
if ! kind get clusters 2>/dev/null | grep -qx "${CLUSTER}"; then
  kind create cluster --name "${CLUSTER}" --config deploy/kind/cluster.yaml --wait 180s
fi
for image in "${images[@]}"; do
  kind load docker-image --name "${CLUSTER}" "${image}:${VERSION}"
done

# 3. kiln.
"${HELM}" --kube-context "${CONTEXT}" upgrade --install "${RELEASE}" charts/kiln \
  --namespace "${SYSTEM_NS}" --create-namespace -f deploy/kind/values.yaml --wait --timeout 5m
kc -n "${SYSTEM_NS}" rollout status "deployment/${RELEASE}" --timeout 120s

# 4. Train, compile and serve the quick start; fail fast on phase Failed.
kc -n "${JOB_NS}" apply -f "deploy/examples/${JOB}.yaml"
log "waiting up to ${TIMEOUT}s for ${JOB} to reach phase Serving"
deadline=$((SECONDS + TIMEOUT))
phase=""
while :; do
  phase=$(kc -n "${JOB_NS}" get trainingjob "${JOB}" -o jsonpath='{.status.phase}' 2>/dev/null || true)
  case "${phase}" in
    Serving) break ;;
    Failed) log "${JOB} failed"; exit 1 ;;
  esac
  if ((SECONDS >= deadline)); then
    log "timed out in phase '${phase}'"
    exit 1
  fi
  sleep 5
done
kc -n "${JOB_NS}" get trainingjob "${JOB}"
kc -n "${JOB_NS}" wait --for=condition=Ready pod \
  -l "kiln.dev/trainingjob=${JOB},app.kubernetes.io/component=serving" --timeout 180s

# 5. Query it through a port-forward.
kc -n "${JOB_NS}" port-forward "service/${JOB}-serving" "${LOCAL_PORT}:8080" >/dev/null &
PORT_FORWARD_PID=$!
base="http://127.0.0.1:${LOCAL_PORT}"
for _ in $(seq 1 30); do
  curl -fsS "${base}/v2/health/ready" >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS "${base}/v2/health/ready"
echo
metadata=$(curl -fsS "${base}/v2/models/${JOB}")
log "model metadata: ${metadata}"

# JSON inference: the digit as a normalised tensor, under the input name and datatype the model declares.
request=$(python3 - "${metadata}" deploy/kind/digit-8.json <<'PY'
import json, sys
meta, sample = json.loads(sys.argv[1]), json.load(open(sys.argv[2]))
spec = meta["inputs"][0]
print(json.dumps({"inputs": [{"name": spec["name"], "shape": sample["shape"], "datatype": spec["datatype"],
                              "data": sample["data"]}]}))
PY
)
response=$(curl -fsS -H 'Content-Type: application/json' --data-binary "${request}" "${base}/v2/models/${JOB}/infer")
predicted=$(python3 -c 'import json, sys
out = json.loads(sys.argv[1])["outputs"][0]["data"]
print(max(range(len(out)), key=out.__getitem__))' "${response}")
log "infer: predicted ${predicted}"
[[ "${predicted}" == 8 ]] || { log "infer predicted ${predicted}, expected 8"; exit 1; }

# Classify: the same digit as a PNG, preprocessed by the server from the model card.
classified=$(curl -fsS -H 'Content-Type: application/octet-stream' --data-binary @deploy/kind/digit-8.png \
  "${base}/v2/models/${JOB}/classify?top_k=3")
log "classify: ${classified}"
top=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["predictions"][0]["label"])' "${classified}")
[[ "${top}" == 8 ]] || { log "classify predicted ${top}, expected 8"; exit 1; }

curl -fsS "${base}/metrics" | grep -q '^kiln_serving_requests_total' || { log "no kiln_serving_ metrics"; exit 1; }
log "PASS: ${JOB} trained, compiled and served; both endpoints predict 8"
