#!/usr/bin/env bash
# Try the mesh on a local kind cluster. Needs Docker (Linux host with cgroup v2 and
# BPF: Debian 12 / Ubuntu 22.04 or newer), kind and kubectl; nothing else, not even
# Rust: the image is built with deploy/Containerfile and `meshctl` runs from it.
# Documented, not run in CI.
#
#   deploy/kind/try-on-kind.sh            create the cluster, build and load the image,
#                                         install the mesh, mesh a demo namespace, curl
#   deploy/kind/try-on-kind.sh --delete   uninstall the mesh and delete the cluster
#
# Settings (environment): CLUSTER (mesh), TAG (dev), DEMO_NS (mesh-demo),
# GATEWAY_API_VERSION (v1.3.0), KIND_NODE_IMAGE (kind's default), CURL_IMAGE.
set -euo pipefail

CLUSTER=${CLUSTER:-mesh}
TAG=${TAG:-dev}
DEMO_NS=${DEMO_NS:-mesh-demo}
GATEWAY_API_VERSION=${GATEWAY_API_VERSION:-v1.3.0}
CURL_IMAGE=${CURL_IMAGE:-docker.io/curlimages/curl:8.11.1}
HUB=localhost
IMAGE_NAME=mesh
IMAGE="$HUB/$IMAGE_NAME:$TAG"
MESH_NS=mesh-system
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE="$ROOT/target/try-on-kind/$CLUSTER"
# The install: the demo profile (1 controller, debug logs) with this image.
SETS=(--set profile=demo --set "hub=$HUB" --set "image=$IMAGE_NAME" --set "tag=$TAG"
      --set "namespace=$MESH_NS" --set "waypoint.namespace=$DEMO_NS")

step() { printf '\n==> %s\n' "$*"; }
die() { echo "try-on-kind: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "needs $1 ($2)"; }
k() { kubectl --context "kind-$CLUSTER" "$@"; }
# meshctl from the image, so the host needs no Rust toolchain.
meshctl() { docker run --rm "$IMAGE" meshctl "$@"; }

case "${1:-}" in
  -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
  --delete)
    need kind "https://kind.sigs.k8s.io"
    if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
      if docker image inspect "$IMAGE" >/dev/null 2>&1; then
        step "uninstalling the mesh: meshctl manifest generate | kubectl delete -f -"
        meshctl manifest generate "${SETS[@]}" | k delete --ignore-not-found --wait=false -f - || true
      fi
      step "deleting kind cluster $CLUSTER"
      kind delete cluster --name "$CLUSTER"
    else
      echo "no kind cluster named $CLUSTER"
    fi
    rm -rf "$STATE"
    echo "the image $IMAGE is kept (docker image rm $IMAGE to remove it)"
    exit 0 ;;
  "") ;;
  *) die "unknown argument $1 (try --help)" ;;
esac

need docker "https://docs.docker.com/engine/install/"
need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
[[ "$(docker info --format '{{.CgroupVersion}}' 2>/dev/null)" == 2 ]] \
  || die "Docker must run on cgroup v2 (the agent attaches its eBPF programs at the cgroup v2 root)"

step "kind cluster $CLUSTER (1 control plane, 2 workers, so traffic crosses nodes)"
if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} --wait 120s --config - <<KIND
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
- role: control-plane
- role: worker
- role: worker
KIND
fi

step "bpffs on every node (the agent pins its programs there; mounted shared for the HostToContainer mount)"
for node in $(kind get nodes --name "$CLUSTER"); do
  docker exec "$node" sh -c \
    'mountpoint -q /sys/fs/bpf || mount -t bpf bpffs /sys/fs/bpf; mount --make-shared /sys/fs/bpf'
done

step "building $IMAGE with deploy/Containerfile (the first build takes a while: LLVM, bpf-linker, nightly)"
DOCKER_BUILDKIT=1 docker build -f "$ROOT/deploy/Containerfile" -t "$IMAGE" "$ROOT"

step "loading $IMAGE into the cluster's nodes"
kind load docker-image "$IMAGE" --name "$CLUSTER"

step "Gateway API CRDs $GATEWAY_API_VERSION (HTTPRoute, GRPCRoute) from the upstream release"
k apply --server-side -f \
  "https://github.com/kubernetes-sigs/gateway-api/releases/download/$GATEWAY_API_VERSION/standard-install.yaml"

step "the mesh's root CA (kept in $STATE/ca, reused on the next run)"
if [[ ! -f "$STATE/ca/root-key.pem" ]]; then
  mkdir -p "$STATE"
  # `node-credential` creates and persists the root in --ca-dir on first use.
  docker run --rm --user "$(id -u):$(id -g)" -v "$STATE:/state" "$IMAGE" \
    mesh-controller node-credential --ca-dir /state/ca --trust-domain cluster.local \
    --node bootstrap --out /state/bootstrap >/dev/null
fi

step "installing: meshctl manifest generate ${SETS[*]} | kubectl apply -f -"
# The waypoint of the demo namespace is part of the install, so its namespace comes first.
k create namespace "$DEMO_NS" --dry-run=client -o yaml | k apply -f -
meshctl manifest generate "${SETS[@]}" | k apply -f -
# The CA for the controller (a Secret only it mounts) and the root certificate that
# agents and waypoints verify the controller with.
k -n "$MESH_NS" create secret generic mesh-ca \
  --from-file="$STATE/ca/root-cert.pem" --from-file="$STATE/ca/root-key.pem" \
  --dry-run=client -o yaml | k apply -f -
for ns in "$MESH_NS" "$DEMO_NS"; do
  k -n "$ns" create configmap mesh-root-cert --from-file="$STATE/ca/root-cert.pem" \
    --dry-run=client -o yaml | k apply -f -
done
k -n "$MESH_NS" rollout status deployment/mesh-controller --timeout=180s
k -n "$MESH_NS" rollout status daemonset/mesh-agent --timeout=180s

step "demo workloads in $DEMO_NS (before the namespace joins the mesh: running pods are enrolled without a restart)"
k apply -f - <<DEMO
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: $DEMO_NS}
spec:
  replicas: 2
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: ScheduleAnyway, labelSelector: {matchLabels: {app: echo}}}
      containers:
      - name: echo
        image: $IMAGE
        imagePullPolicy: IfNotPresent
        command: [mesh-echo, serve, --name, \$(POD_NAME)]
        env:
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        ports: [{containerPort: 8080, name: http}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: $DEMO_NS}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client, namespace: $DEMO_NS}
spec:
  replicas: 1
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      containers:
      - name: client
        image: $CURL_IMAGE
        command: [sleep, infinity]
DEMO
k -n "$DEMO_NS" rollout status deployment/echo --timeout=180s
k -n "$DEMO_NS" rollout status deployment/client --timeout=180s
k -n "$DEMO_NS" get pods -o wide

step "kubectl label namespace $DEMO_NS istio.io/dataplane-mode=ambient"
k label namespace "$DEMO_NS" istio.io/dataplane-mode=ambient --overwrite
sleep 5

step "client -> echo through the mesh (echo answers with its name and the peer it saw)"
for _ in 1 2 3 4; do
  k -n "$DEMO_NS" exec deploy/client -- curl -sS --max-time 5 http://echo/ || echo "(request failed)"
done

step "agent logs (last lines of each node's agent)"
for pod in $(k -n "$MESH_NS" get pods -l app.kubernetes.io/name=mesh-agent -o name); do
  echo "--- $pod"
  k -n "$MESH_NS" logs "$pod" --tail=8 || true
done

step "agent metrics: connections and their security policy (mutual_tls = through the HBONE tunnel)"
for pod in $(k -n "$MESH_NS" get pods -l app.kubernetes.io/name=mesh-agent -o jsonpath='{.items[*].metadata.name}'); do
  echo "--- $pod"
  k get --raw "/api/v1/namespaces/$MESH_NS/pods/$pod:15020/proxy/metrics" \
    | grep -E '^(istio_tcp_connections_opened_total|mesh_agent_certificate_expiry_timestamp_seconds)' || true
done

cat <<NEXT

The mesh runs on kind cluster $CLUSTER. Next:
  kubectl --context kind-$CLUSTER -n $DEMO_NS exec deploy/client -- curl -sS http://echo/
  kubectl --context kind-$CLUSTER -n $MESH_NS logs -f ds/mesh-agent
  kind get kubeconfig --name $CLUSTER > /tmp/kind-$CLUSTER.kubeconfig             # then every controller replica's agents:
  docker run --rm --network host -v /tmp/kind-$CLUSTER.kubeconfig:/kubeconfig:ro -e KUBECONFIG=/kubeconfig $IMAGE meshctl status --kubernetes -n $MESH_NS
  kubectl --context kind-$CLUSTER label namespace $DEMO_NS istio.io/dataplane-mode-   # leave the mesh
  $0 --delete                                                                    # remove everything
NEXT
