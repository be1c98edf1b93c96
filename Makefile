# The two commands of a fresh machine:
#   make demo   a local control plane, the operator, three simulated nodes, a fleet-wide mode switch
#   make test   every test: unit, real kube-apiserver, real kernel
.PHONY: demo test setup crds fmt bench

demo:
	scripts/demo.sh

test:
	scripts/test.sh

setup:
	scripts/setup.sh

# fleetproxy-agent against upstream kube-proxy (docs/benchmarks.md); not part of `make test`.
# Quick run: make bench BENCH_ARGS="--points 100x10,1000x10"
bench:
	scripts/setup.sh
	cargo build --release -p fleetproxy-agent -p fleetproxy-bench
	target/release/fleetproxy-bench $(BENCH_ARGS)

# Regenerates charts/fleetproxy/crds/ from the Rust types.
crds:
	cargo run -q -p fleetproxy-api --bin crdgen

fmt:
	cargo fmt --all
