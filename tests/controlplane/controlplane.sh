#!/usr/bin/env bash
# Builds and runs a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) on
# loopback, from the versions pinned in go.mod next to this script. No kubelet, no nodes, no root needed.
#
#   controlplane.sh build [kube-proxy]   build (or reuse) the binaries; `kube-proxy` also builds kube-proxy
#   controlplane.sh start [DIR]          start (or reuse) a control plane; prints the kubeconfig path last
#   controlplane.sh stop  [DIR]          stop it and drop its etcd data (certificates and logs stay)
#   controlplane.sh env   [DIR]          print `export KUBECONFIG=...`
#
# DIR defaults to $FLEETPROXY_STATE, else /tmp/fleetproxy-controlplane. Binaries are cached in
# ${FLEETPROXY_CACHE:-$HOME/.cache/fleetproxy}/controlplane/<hash of go.mod and go.sum>/bin.
# start and stop take a lock on DIR, so concurrent callers get one control plane.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
CACHE="${FLEETPROXY_CACHE:-$HOME/.cache/fleetproxy}"
HASH="$(cat "$HERE/go.mod" "$HERE/go.sum" | sha256sum | cut -c1-16)"
BIN="$CACHE/controlplane/$HASH/bin"
SERVICE_CIDRS="10.96.0.0/16,fd00:10:96::/112"
COMPONENTS=(etcd kube-apiserver kube-controller-manager)

log() { echo "controlplane: $*" >&2; }
die() { log "error: $*"; exit 1; }

package_of() {
    case "$1" in
        etcd) echo go.etcd.io/etcd/server/v3 ;;
        *) echo "k8s.io/kubernetes/cmd/$1" ;;
    esac
}

# Builds the named binaries that are not in the cache yet.
build() {
    local name pkg version ldflags start
    for name in "$@"; do
        [[ -x "$BIN/$name" ]] && continue
        [[ -x "$GO" ]] || die "go not found (set GO=/path/to/go)"
        mkdir -p "$BIN"
        pkg="$(package_of "$name")"
        ldflags=""
        if [[ "$name" == kube-* ]]; then
            # Without this the binaries report v0.0.0-master, which confuses version checks.
            version="$(cd "$HERE" && "$GO" list -m -f '{{.Version}}' k8s.io/kubernetes)"
            local minor="${version#v1.}"
            minor="${minor%%.*}"
            ldflags="-X k8s.io/component-base/version.gitVersion=$version"
            ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
            ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
        fi
        log "building $name (first time takes ~10 min)..."
        start=$SECONDS
        (cd "$HERE" && CGO_ENABLED=0 "$GO" build -trimpath -ldflags "$ldflags" -o "$BIN/$name.tmp.$$" "$pkg")
        mv -f "$BIN/$name.tmp.$$" "$BIN/$name"
        log "built $name in $((SECONDS - start))s"
    done
}

# --- state directory ---------------------------------------------------------------------------------

set_dir() {
    DIR="${1:-${FLEETPROXY_STATE:-/tmp/fleetproxy-controlplane}}"
    [[ "$DIR" == /* ]] || DIR="$PWD/$DIR"
    KUBECONFIG_PATH="$DIR/kubeconfig"
}

# Serialises start and stop on one state directory (fd 9 is closed in every child we leave running).
lock() {
    mkdir -p "$DIR"
    exec 9>"$DIR/.lock"
    flock 9
}

# The pid from DIR/NAME.pid if that process is still the component we started.
alive_pid() {
    local name="$1" pid
    [[ -f "$DIR/$name.pid" ]] || return 1
    pid="$(<"$DIR/$name.pid")"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' '\n' <"/proc/$pid/cmdline" | head -n1 | grep -q "/$name\$" || return 1
    echo "$pid"
}

curl_api() {
    local port
    port="$(<"$DIR/apiserver.port")"
    curl -sS --max-time 5 --cacert "$DIR/pki/ca.crt" --cert "$DIR/pki/admin.crt" --key "$DIR/pki/admin.key" \
        "https://127.0.0.1:$port$1"
}

apiserver_ready() { [[ "$(curl_api /readyz 2>/dev/null)" == ok ]]; }

healthy() {
    local name
    for name in "${COMPONENTS[@]}"; do alive_pid "$name" >/dev/null || return 1; done
    [[ -f "$DIR/apiserver.port" ]] || return 1
    apiserver_ready || return 1
    curl_api /api/v1/namespaces/default 2>/dev/null | grep -q '"phase": *"Active"'
}

# --- certificates ------------------------------------------------------------------------------------

# NAME SUBJECT [extfile lines]: an EC key and a certificate signed by the CA.
issue() {
    local name="$1" subject="$2" ext="$3" pki="$DIR/pki"
    openssl ecparam -name prime256v1 -genkey -noout -out "$pki/$name.key" 2>/dev/null
    openssl req -new -key "$pki/$name.key" -subj "$subject" -out "$pki/$name.csr" 2>/dev/null
    printf '%b\n' "$ext" >"$pki/$name.ext"
    openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
        -days 3650 -sha256 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
    rm -f "$pki/$name.csr" "$pki/$name.ext"
}

pki() {
    local pki="$DIR/pki"
    [[ -f "$pki/done" ]] && return 0
    log "generating certificates in $pki"
    rm -rf "$pki"
    mkdir -p "$pki"
    chmod 700 "$pki"
    openssl ecparam -name prime256v1 -genkey -noout -out "$pki/ca.key" 2>/dev/null
    openssl req -x509 -new -key "$pki/ca.key" -subj "/CN=fleetproxy-test-ca" -days 3650 -sha256 \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$pki/ca.crt" 2>/dev/null
    local client="basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth"
    issue apiserver "/CN=kube-apiserver" \
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:::1,IP:10.96.0.1,IP:fd00:10:96::1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    issue admin "/O=system:masters/CN=admin" "$client"
    issue controller-manager "/CN=system:kube-controller-manager" "$client"
    openssl ecparam -name prime256v1 -genkey -noout -out "$pki/sa.key" 2>/dev/null
    openssl ec -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
    touch "$pki/done"
}

# FILE USER PORT: a kubeconfig with the user's client certificate embedded.
kubeconfig() {
    local file="$1" user="$2" port="$3" pki="$DIR/pki"
    cat >"$file.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: fleetproxy-test
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $(base64 -w0 <"$pki/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 <"$pki/$user.crt")
    client-key-data: $(base64 -w0 <"$pki/$user.key")
contexts:
- name: fleetproxy-test
  context: {cluster: fleetproxy-test, user: $user}
current-context: fleetproxy-test
EOF
    chmod 600 "$file.tmp"
    mv -f "$file.tmp" "$file"
}

# --- processes ---------------------------------------------------------------------------------------

# A TCP port nothing on this machine listens on.
free_port() {
    local used port
    used=" $(awk 'NR > 1 && $4 == "0A" { split($2, a, ":"); print a[2] }' /proc/net/tcp /proc/net/tcp6 2>/dev/null | tr '\n' ' ') "
    for _ in $(seq 200); do
        port=$((20000 + RANDOM % 30000))
        [[ "$used" == *" $(printf '%04X' "$port") "* ]] && continue
        [[ " ${TAKEN:-} " == *" $port "* ]] && continue
        TAKEN="${TAKEN:-} $port"
        echo "$port"
        return
    done
    die "no free port found"
}

# NAME ARGS...: runs a component in its own session, detached from our stdio and lock.
launch() {
    local name="$1"
    shift
    setsid "$BIN/$name" "$@" </dev/null >>"$DIR/$name.log" 2>&1 9>&- &
    local pid=$!
    # Until setsid has exec'd the component, the pid still shows setsid (or bash): wait for the exec,
    # so that alive_pid does not mistake a busy machine's slow start for a dead component.
    local deadline=$((SECONDS + 10))
    while [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" != "$BIN/$name" ]] && running "$pid" && ((SECONDS < deadline)); do
        sleep 0.05
    done
    echo "$pid" >"$DIR/$name.pid"
}

# NAME SECONDS CMD...: waits until CMD succeeds, failing early when the component dies.
wait_for() {
    local name="$1" deadline=$((SECONDS + $2))
    shift 2
    until "$@" >/dev/null 2>&1; do
        alive_pid "$name" >/dev/null || { tail -n 20 "$DIR/$name.log" >&2; die "$name exited; see $DIR/$name.log"; }
        ((SECONDS < deadline)) || { tail -n 20 "$DIR/$name.log" >&2; die "$name not ready after $2s; see $DIR/$name.log"; }
        sleep 0.1
    done
}

# Whether PID is a live process (a zombie waiting for its parent to reap it does not count).
running() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ "${stat%% *}" != Z ]]
}

stop_all() {
    local name pid pids=() deadline
    for name in kube-controller-manager kube-apiserver etcd; do
        if pid="$(alive_pid "$name")"; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            # The API server must be gone before etcd, so that it does not log a storm of errors.
            deadline=$((SECONDS + 15))
            while running "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
            if running "$pid"; then
                log "$name ($pid) did not stop in 15s; killing it"
                kill -KILL "$pid" 2>/dev/null || true
            fi
        fi
        rm -f "$DIR/$name.pid"
    done
    for pid in "${pids[@]}"; do
        while running "$pid"; do sleep 0.1; done
    done
    rm -rf "$DIR/etcd-data" "$DIR/apiserver.port"
}

start() {
    set_dir "${1:-}"
    lock
    if healthy; then
        echo "$KUBECONFIG_PATH"
        return 0
    fi
    build "${COMPONENTS[@]}"
    stop_all # whatever is left of an earlier, broken start
    local began=$SECONDS
    pki
    local pki="$DIR/pki" etcd_port peer_port api_port
    etcd_port="$(free_port)"
    peer_port="$(free_port)"
    api_port="$(free_port)"

    log "starting etcd on 127.0.0.1:$etcd_port"
    launch etcd --name=fleetproxy --data-dir="$DIR/etcd-data" \
        --listen-client-urls="http://127.0.0.1:$etcd_port" --advertise-client-urls="http://127.0.0.1:$etcd_port" \
        --listen-peer-urls="http://127.0.0.1:$peer_port" --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
        --initial-cluster="fleetproxy=http://127.0.0.1:$peer_port" --unsafe-no-fsync --log-level=warn
    wait_for etcd 30 curl -sf "http://127.0.0.1:$etcd_port/health"

    log "starting kube-apiserver on https://127.0.0.1:$api_port"
    echo "$api_port" >"$DIR/apiserver.port"
    launch kube-apiserver --etcd-servers="http://127.0.0.1:$etcd_port" \
        --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" \
        --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
        --client-ca-file="$pki/ca.crt" --authorization-mode=Node,RBAC \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
        --service-cluster-ip-range="$SERVICE_CIDRS" --endpoint-reconciler-type=none \
        --cert-dir="$DIR/pki" --profiling=false
    kubeconfig "$KUBECONFIG_PATH" admin "$api_port"
    kubeconfig "$DIR/controller-manager.kubeconfig" controller-manager "$api_port"
    wait_for kube-apiserver 60 apiserver_ready

    log "starting kube-controller-manager"
    launch kube-controller-manager --kubeconfig="$DIR/controller-manager.kubeconfig" \
        --secure-port=0 --leader-elect=false --use-service-account-credentials \
        --controllers=garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller,root-ca-certificate-publisher-controller,clusterrole-aggregation-controller,endpointslice-controller,endpointslice-mirroring-controller,service-cidr-controller \
        --root-ca-file="$pki/ca.crt" --service-account-private-key-file="$pki/sa.key" \
        --service-cluster-ip-range="$SERVICE_CIDRS"
    wait_for kube-apiserver 30 healthy
    log "ready in $((SECONDS - began))s; logs in $DIR/*.log"
    echo "$KUBECONFIG_PATH"
}

stop() {
    set_dir "${1:-}"
    lock
    stop_all
    log "stopped (certificates, kubeconfig and logs kept in $DIR)"
}

case "${1:-}" in
    build)
        shift
        want=("${COMPONENTS[@]}")
        for extra in "$@"; do
            [[ "$extra" == kube-proxy ]] || die "build: unknown component '$extra' (only kube-proxy is optional)"
            want+=(kube-proxy)
        done
        build "${want[@]}"
        echo "$BIN"
        ;;
    start) start "${2:-}" ;;
    stop) stop "${2:-}" ;;
    env)
        set_dir "${2:-}"
        echo "export KUBECONFIG=$KUBECONFIG_PATH"
        ;;
    *)
        sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
