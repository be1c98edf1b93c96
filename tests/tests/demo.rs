//! A smoke run of the demo binary (`DEMO_SMOKE=1`): it must go through every step, switch the fleet
//! without a failed request, clean up, and exit 0.

use std::{process::Command, time::Instant};

use anyhow::{Result, ensure};
use fleetproxy_tests::control_plane;

#[tokio::test]
async fn demo_runs_through_and_cleans_up() -> Result<()> {
    let control_plane = control_plane().await?;
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_fleetproxy-demo"))
        .env("DEMO_SMOKE", "1")
        .env("FLEETPROXY_KUBECONFIG", control_plane.kubeconfig())
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}\n{stderr}\ndemo took {:.1}s", started.elapsed().as_secs_f64());
    ensure!(output.status.success(), "the demo failed ({})", output.status);
    for expected in [
        "$ helm install fleetproxy charts/fleetproxy -n kube-system --set proxyConfig.mode=iptables",
        "operator: 2 replicas of the chart's Deployment",
        "agents: DaemonSet kube-system/fleetproxy-agent (created by the operator) on 3 nodes",
        "$ kubectl get proxyconfig",
        "default   iptables   3         3",
        "$ kubectl patch proxyconfig default --type=merge -p '{\"spec\":{\"mode\":\"nftables\"}}'",
        "node-b  iptables -> nftables",
        "default   nftables   3         3",
        "iptables objects of fleetproxy left: node-a 0, node-b 0, node-c 0",
        "helm uninstall fleetproxy",
    ] {
        ensure!(stdout.contains(expected), "the demo did not print {expected:?}");
    }
    let switch = stdout.lines().find(|l| l.contains("requests during the switch")).unwrap_or_default();
    ensure!(switch.ends_with(" 0 failed"), "requests failed during the switch: {switch}");

    // Everything it created is gone.
    for args in [
        &["get", "nodes", "-l", "fleetproxy.io/fleet=demo", "-o", "name"][..],
        &["get", "proxyconfig", "default", "--ignore-not-found", "-o", "name"],
        &[
            "get",
            "daemonsets,deployments",
            "-n",
            "kube-system",
            "-l",
            "app.kubernetes.io/part-of=fleetproxy",
            "-o",
            "name",
        ],
    ] {
        let left = control_plane.kubectl().args(args).output()?;
        let left = String::from_utf8_lossy(&left.stdout);
        ensure!(left.trim().is_empty(), "the demo left objects behind: {left}");
    }
    Ok(())
}
