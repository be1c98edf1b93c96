# The two commands of a fresh machine:
#   make demo   a local control plane, the operator, three simulated nodes, a fleet-wide mode switch
#   make test   every test: unit, real kube-apiserver, real kernel
.PHONY: demo test setup crds fmt

demo:
	scripts/demo.sh

test:
	scripts/test.sh

setup:
	scripts/setup.sh

# Regenerates charts/fleetproxy/crds/ from the Rust types.
crds:
	cargo run -q -p fleetproxy-api --bin crdgen

fmt:
	cargo fmt --all
