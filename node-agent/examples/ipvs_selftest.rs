//! IPVS self-test, run inside the VM of `tests/vm/` (a kernel with IPVS) by its init script.
//!
//! ```text
//! ipvs_selftest serve NAME PORT          answers NAME to every TCP connection and UDP datagram
//!                                        (TCP on PORT, UDP on 5353, both families)
//! ipvs_selftest get ADDR PORT COUNT      COUNT connections, prints what each one answered
//! ipvs_selftest run                      the assertions (expects pods pod1..pod3 at 10.244.0.2..4
//!                                        and fd00:244::2..4 serving their name, see tests/vm/init)
//! ```
//! `run` prints one `PASS <name>` or `FAIL <name>: <why>` line per check, timings as
//! `TIME <name> <milliseconds>`, and `SELFTEST DONE` at the end. It programs the kernel through the
//! agent's own data planes ([`IpvsProxier`], [`IptablesProxier`], [`NftablesProxier`]) in this
//! process's network namespace.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use fleetproxy_agent::{
    dataplane::{Changes, DataPlane},
    exec::Runner,
    iptables::IptablesProxier,
    ipvs::IpvsProxier,
    model::{IpFamily, Protocol, ServicePortName},
    nftables::NftablesProxier,
    policy::{NodeSettings, ServicePlan, Target},
};
use fleetproxy_api::IpvsScheduler;

const PODS: [(&str, &str); 3] = [("pod1", "10.244.0.2"), ("pod2", "10.244.0.3"), ("pod3", "10.244.0.4")];
const VIP: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";
const DNS_VIP: &str = "10.96.0.20";
const UDP_PORT: u16 = 5353;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["serve", name, port] => serve(name, port.parse().expect("port")),
        ["get", addr, port, count] => {
            for answer in
                get(addr.parse().expect("addr"), port.parse().expect("port"), count.parse().expect("count"))
            {
                println!("{answer}");
            }
        }
        ["run"] => {
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            let failures = runtime.block_on(run());
            println!("SELFTEST DONE failures={failures}");
        }
        _ => {
            eprintln!("usage: ipvs_selftest serve NAME PORT | get ADDR PORT COUNT | run");
            std::process::exit(2);
        }
    }
}

fn serve(name: &str, port: u16) {
    let udp = UdpSocket::bind(("::", UDP_PORT)).expect("bind udp");
    let answer = name.to_owned();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(answer.as_bytes(), peer);
        }
    });
    // "::" accepts both families (net.ipv6.bindv6only is 0).
    let listener = TcpListener::bind(("::", port)).expect("bind");
    for stream in listener.incoming().flatten() {
        let mut stream = stream;
        let _ = stream.write_all(format!("{name}\n").as_bytes());
    }
}

fn get(addr: IpAddr, port: u16, count: usize) -> Vec<String> {
    (0..count)
        .map(|_| {
            let result = TcpStream::connect_timeout(&SocketAddr::new(addr, port), Duration::from_secs(5))
                .and_then(|mut stream| {
                    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                    let mut text = String::new();
                    stream.read_to_string(&mut text)?;
                    Ok(text.trim().to_owned())
                });
            result.unwrap_or_else(|e| format!("error:{e}"))
        })
        .collect()
}

/// One datagram each from `count` fresh sockets (new source ports: new IPVS connections).
fn get_udp(addr: IpAddr, port: u16, count: usize) -> Vec<String> {
    (0..count)
        .map(|_| {
            let result = UdpSocket::bind(("0.0.0.0", 0)).and_then(|socket| {
                socket.set_read_timeout(Some(Duration::from_secs(5)))?;
                socket.send_to(b"who", (addr, port))?;
                let mut buf = [0u8; 64];
                let len = socket.recv(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..len]).trim().to_owned())
            });
            result.unwrap_or_else(|e| format!("error:{e}"))
        })
        .collect()
}

/// `get` from inside a pod's network namespace (another process).
fn get_from(pod: &str, addr: &str, port: u16, count: usize) -> Vec<String> {
    let me = std::env::current_exe().expect("exe");
    let output = Command::new("ip")
        .args(["netns", "exec", pod])
        .arg(me)
        .args(["get", addr, &port.to_string(), &count.to_string()])
        .output()
        .expect("ip netns exec");
    String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect()
}

fn sh(command: &str) -> String {
    let output = Command::new("sh").args(["-c", command]).output().expect("sh");
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

struct Report {
    failures: usize,
}

impl Report {
    fn check(&mut self, name: &str, result: Result<(), String>) {
        match result {
            Ok(()) => println!("PASS {name}"),
            Err(why) => {
                self.failures += 1;
                println!("FAIL {name}: {why}");
            }
        }
    }
}

fn name(n: &str) -> ServicePortName {
    ServicePortName {
        namespace: "default".into(),
        name: n.into(),
        port: "http".into(),
        protocol: Protocol::Tcp,
    }
}

fn web_plan() -> ServicePlan {
    let targets: Vec<Target> = PODS
        .iter()
        .map(|(_, ip)| Target { ip: ip.parse().expect("ip"), port: 8080, is_local: true })
        .collect();
    ServicePlan {
        cluster_ips: vec![VIP.parse().expect("ip")],
        cluster_targets: targets,
        ..ServicePlan::new(name("web"), IpFamily::V4, 80)
    }
}

/// The IPv6 twin of [`web_plan`].
fn web6_plan() -> ServicePlan {
    let mut plan = web_plan();
    plan.name = name("web6");
    plan.family = IpFamily::V6;
    plan.cluster_ips = vec![VIP6.parse().expect("ip")];
    plan.cluster_targets = (2..=4)
        .map(|i| Target { ip: format!("fd00:244::{i}").parse().expect("ip"), port: 8080, is_local: true })
        .collect();
    plan
}

/// A UDP service on port 53 to the pods' UDP port.
fn dns_plan() -> ServicePlan {
    let mut plan = web_plan();
    plan.name = ServicePortName { protocol: Protocol::Udp, ..name("dns") };
    plan.protocol = Protocol::Udp;
    plan.port = 53;
    plan.cluster_ips = vec![DNS_VIP.parse().expect("ip")];
    for target in &mut plan.cluster_targets {
        target.port = UDP_PORT;
    }
    plan
}

/// `count` services with `endpoints` endpoints each (addresses that need not exist).
fn many_plans(count: usize, endpoints: usize) -> Vec<ServicePlan> {
    (0..count)
        .map(|i| {
            let mut plan = web_plan();
            plan.name = name(&format!("svc-{i}"));
            plan.cluster_ips = vec![IpAddr::V4(Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250 + 1) as u8))];
            plan.cluster_targets = (0..endpoints)
                .map(|e| Target {
                    ip: IpAddr::V4(Ipv4Addr::new(10, 245, (i / 25) as u8, ((i % 25) * 10 + e + 1) as u8)),
                    port: 8080,
                    is_local: false,
                })
                .collect();
            plan
        })
        .collect()
}

fn settings() -> NodeSettings {
    NodeSettings {
        excluded_cidrs: vec!["10.0.0.0/24".parse().expect("cidr")],
        cluster_cidrs: vec!["10.244.0.0/16".parse().expect("cidr"), "fd00:244::/64".parse().expect("cidr")],
        masquerade_all: false,
        masquerade_bit: 14,
        node_port_addresses: vec![],
    }
}

fn counts(answers: &[String]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for answer in answers {
        *out.entry(answer.clone()).or_insert(0) += 1;
    }
    out
}

fn no_iptables_mode_left() -> Result<(), String> {
    let dump = sh("iptables-save");
    let left: Vec<&str> = dump.lines().filter(|l| l.contains(" FP-") || l.starts_with(":FP-")).collect();
    if left.is_empty() { Ok(()) } else { Err(format!("iptables objects left: {left:?}")) }
}

fn no_ipvs_mode_left() -> Result<(), String> {
    let table = sh("ipvsadm -Ln");
    let services: Vec<&str> =
        table.lines().filter(|l| l.starts_with("TCP") || l.starts_with("UDP")).collect();
    let link = sh("ip -o link show");
    let dump = sh("iptables-save");
    let chains: Vec<&str> = dump.lines().filter(|l| l.contains("FPVS-")).collect();
    if !services.is_empty() {
        Err(format!("virtual servers left: {services:?}"))
    } else if link.contains("fleetproxy-ipvs") {
        Err("dummy interface left".into())
    } else if !chains.is_empty() {
        Err(format!("FPVS chains left: {chains:?}"))
    } else {
        Ok(())
    }
}

fn no_nftables_mode_left() -> Result<(), String> {
    let tables = sh("nft list tables");
    if tables.contains("fleetproxy") { Err(format!("nftables tables left: {tables}")) } else { Ok(()) }
}

fn all_answer(answers: &[String]) -> Result<(), String> {
    let names: Vec<&str> = PODS.iter().map(|(n, _)| *n).collect();
    if answers.iter().all(|a| names.contains(&a.as_str())) {
        Ok(())
    } else {
        Err(format!("answers {:?}", counts(answers)))
    }
}

async fn run() -> usize {
    let mut report = Report { failures: 0 };
    let settings = settings();
    let plans = vec![web_plan(), web6_plan(), dns_plan()];

    // --- IPVS, rr ---
    let mut ipvs = IpvsProxier::with_scheduler(Runner::host(), IpvsScheduler::Rr);
    report.check("probe", ipvs.probe().await.map_err(|e| e.to_string()));
    let started = Instant::now();
    let synced = ipvs.sync(&plans, &settings, &Changes::Full).await;
    println!("TIME ipvs-sync-1x3 {}", started.elapsed().as_millis());
    report.check("sync-rr", synced.map(drop).map_err(|e| e.to_string()));
    let table = sh("ipvsadm -Ln");
    println!("{table}");
    report.check(
        "ipvsadm-table",
        (|| {
            if !table.contains("TCP  10.96.0.10:80 rr") {
                return Err(format!("no rr virtual server in {table}"));
            }
            for (_, ip) in PODS {
                if !table.contains(&format!("-> {ip}:8080")) || !table.contains("Masq    1") {
                    return Err(format!("real server {ip}:8080 Masq 1 missing in {table}"));
                }
            }
            Ok(())
        })(),
    );
    report.check(
        "rule-count",
        match ipvs.rule_count().await {
            Ok(12) => Ok(()),
            other => Err(format!("{other:?}, expected 3 services + 9 destinations")),
        },
    );
    let answers = get(VIP.parse().expect("ip"), 80, 30);
    let spread = counts(&answers);
    report.check(
        "rr-spreads-evenly",
        all_answer(&answers).and_then(|()| {
            if spread.len() == 3 && spread.values().all(|n| *n == 10) {
                Ok(())
            } else {
                Err(format!("{spread:?}"))
            }
        }),
    );
    let from_pod = get_from("pod1", VIP, 80, 6);
    report.check(
        "rr-from-a-pod",
        all_answer(&from_pod).and_then(|()| {
            if counts(&from_pod).len() == 3 { Ok(()) } else { Err(format!("{:?}", counts(&from_pod))) }
        }),
    );

    report.check(
        "ipvsadm-ipv6-and-udp",
        if table.contains("TCP  [fd00:96::10]:80 rr") && table.contains("UDP  10.96.0.20:53 rr") {
            Ok(())
        } else {
            Err(table.clone())
        },
    );
    let answers6 = get(VIP6.parse().expect("ip"), 80, 9);
    let spread6 = counts(&answers6);
    report.check(
        "ipv6-rr-spreads-evenly",
        all_answer(&answers6).and_then(|()| {
            if spread6.len() == 3 && spread6.values().all(|n| *n == 3) {
                Ok(())
            } else {
                Err(format!("{spread6:?}"))
            }
        }),
    );
    let udp = get_udp(DNS_VIP.parse().expect("ip"), 53, 6);
    report.check(
        "udp-rr",
        all_answer(&udp)
            .and_then(|()| if counts(&udp).len() == 3 { Ok(()) } else { Err(format!("{:?}", counts(&udp))) }),
    );

    // --- IPVS, sh: one source, one real server ---
    // The scheduler changes on the running proxier, as when the ProxyConfig's scheduler is edited.
    ipvs.set_scheduler(IpvsScheduler::Sh);
    report.check("probe-sh", ipvs.probe().await.map_err(|e| e.to_string()));
    report.check(
        "sync-sh",
        ipvs.sync(&plans, &settings, &Changes::Services(BTreeSet::new()))
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
    );
    let table = sh("ipvsadm -Ln");
    report.check(
        "ipvsadm-sh",
        if table.contains("TCP  10.96.0.10:80 sh") { Ok(()) } else { Err(table.clone()) },
    );
    let mut pinned = Vec::new();
    for source in ["pod1", "pod2", "pod3"] {
        let answers = get_from(source, VIP, 80, 8);
        let spread = counts(&answers);
        report.check(
            &format!("sh-pins-{source}"),
            all_answer(&answers)
                .and_then(|()| if spread.len() == 1 { Ok(()) } else { Err(format!("{spread:?}")) }),
        );
        pinned.extend(spread.into_keys());
    }
    println!("INFO sh-pinned {pinned:?}");

    // --- partial sync: an endpoint goes (drained: weight 0 while it has connections) and comes back ---
    let weight_of = |ip: &str| -> Option<String> {
        sh("ipvsadm -Ln")
            .lines()
            .find(|l| l.contains(&format!("{ip}:8080")) && !l.contains('['))
            .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
    };
    let changed = Changes::Services(BTreeSet::from([name("web")]));
    let mut shrunk = plans.clone();
    shrunk[0].cluster_targets.retain(|t| t.ip.to_string() != "10.244.0.4");
    let partial = ipvs.sync(&shrunk, &settings, &changed).await;
    report.check(
        "partial-sync-drains-removed-endpoint",
        match partial {
            Ok(stats) if stats.full => Err("the sync was full".into()),
            Ok(_) => match weight_of("10.244.0.4").as_deref() {
                // 10.244.0.4 served connections above: they linger in TIME_WAIT, so it is drained.
                Some("0") => Ok(()),
                other => Err(format!("weight of 10.244.0.4 is {other:?}:\n{}", sh("ipvsadm -Ln"))),
            },
            Err(e) => Err(e.to_string()),
        },
    );
    let mut answers = get(VIP.parse().expect("ip"), 80, 4);
    answers.extend(get_from("pod1", VIP, 80, 4));
    answers.extend(get_from("pod2", VIP, 80, 4));
    report.check(
        "drained-endpoint-gets-no-new-connections",
        all_answer(&answers).and_then(|()| {
            if answers.iter().any(|a| a == "pod3") { Err(format!("{:?}", counts(&answers))) } else { Ok(()) }
        }),
    );
    let back = ipvs.sync(&plans, &settings, &changed).await;
    report.check(
        "partial-sync-restores-endpoint",
        match back {
            Ok(_) => match weight_of("10.244.0.4").as_deref() {
                Some("1") => Ok(()),
                other => Err(format!("weight of 10.244.0.4 is {other:?}:\n{}", sh("ipvsadm -Ln"))),
            },
            Err(e) => Err(e.to_string()),
        },
    );

    // --- 1,000 services x 10 endpoints ---
    let many = many_plans(1000, 10);
    let started = Instant::now();
    let stats = ipvs.sync(&many, &settings, &Changes::Full).await;
    let first = started.elapsed();
    report.check("sync-1000x10", stats.as_ref().map(drop).map_err(|e| e.to_string()));
    println!("TIME ipvs-sync-1000x10 {}", first.as_millis());
    if let Ok(stats) = stats {
        println!(
            "INFO ipvs-sync-1000x10 payload={} render={:?} apply={:?}",
            stats.payload_size, stats.render, stats.apply
        );
    }
    let started = Instant::now();
    let again = ipvs.sync(&many, &settings, &Changes::Full).await;
    println!("TIME ipvs-resync-1000x10-unchanged {}", started.elapsed().as_millis());
    report.check(
        "resync-unchanged-sends-nothing",
        match again {
            Ok(_) if ipvs.last_changes() == 0 => Ok(()),
            Ok(_) => Err(format!(
                "{} netlink requests or address changes on an unchanged resync",
                ipvs.last_changes()
            )),
            Err(e) => Err(e.to_string()),
        },
    );
    report.check(
        "rule-count-1000x10",
        match ipvs.rule_count().await {
            Ok(11000) => Ok(()),
            other => Err(format!("{other:?}, expected 11000")),
        },
    );
    report.check(
        "back-to-one",
        ipvs.sync(&plans, &settings, &Changes::Full).await.map(drop).map_err(|e| e.to_string()),
    );
    report.check(
        "rule-count-after-shrink",
        match ipvs.rule_count().await {
            Ok(12) => Ok(()),
            other => Err(format!("{other:?}, expected 12")),
        },
    );

    // --- switches: ipvs -> iptables -> ipvs -> nftables -> ipvs, new mode first, old one cleaned ---
    let mut iptables = IptablesProxier::new(Runner::host());
    report.check(
        "switch-to-iptables",
        iptables.sync(&plans, &settings, &Changes::Full).await.map(drop).map_err(|e| e.to_string()),
    );
    report.check("cleanup-ipvs", ipvs.cleanup().await.map_err(|e| e.to_string()));
    report.check("no-ipvs-left-after-iptables", no_ipvs_mode_left());
    report.check("traffic-iptables", all_answer(&get(VIP.parse().expect("ip"), 80, 6)));

    let mut ipvs = IpvsProxier::with_scheduler(Runner::host(), IpvsScheduler::Rr);
    report.check(
        "switch-iptables-to-ipvs",
        ipvs.sync(&plans, &settings, &Changes::Full).await.map(drop).map_err(|e| e.to_string()),
    );
    report.check("cleanup-iptables", iptables.cleanup().await.map_err(|e| e.to_string()));
    report.check("no-iptables-left", no_iptables_mode_left());
    report.check("traffic-ipvs-after-iptables", all_answer(&get(VIP.parse().expect("ip"), 80, 6)));

    let mut nftables = NftablesProxier::new(Runner::host());
    report.check(
        "switch-ipvs-to-nftables",
        nftables.sync(&plans, &settings, &Changes::Full).await.map(drop).map_err(|e| e.to_string()),
    );
    report.check("cleanup-ipvs-2", ipvs.cleanup().await.map_err(|e| e.to_string()));
    report.check("no-ipvs-left-after-nftables", no_ipvs_mode_left());
    report.check("traffic-nftables", all_answer(&get(VIP.parse().expect("ip"), 80, 6)));

    let mut ipvs = IpvsProxier::with_scheduler(Runner::host(), IpvsScheduler::Rr);
    report.check(
        "switch-nftables-to-ipvs",
        ipvs.sync(&plans, &settings, &Changes::Full).await.map(drop).map_err(|e| e.to_string()),
    );
    report.check("cleanup-nftables", nftables.cleanup().await.map_err(|e| e.to_string()));
    report.check("no-nftables-left", no_nftables_mode_left());
    report.check("traffic-ipvs-after-nftables", all_answer(&get(VIP.parse().expect("ip"), 80, 6)));

    report.check("final-cleanup", ipvs.cleanup().await.map_err(|e| e.to_string()));
    report.check(
        "nothing-left",
        no_ipvs_mode_left().and_then(|()| no_iptables_mode_left()).and_then(|()| no_nftables_mode_left()),
    );
    report.failures
}
