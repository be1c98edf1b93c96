//! A network-namespace lab for kernel tests: a "node" namespace that a data plane programs, "pod"
//! namespaces running real TCP/UDP servers that answer with their own name, and "client" namespaces
//! outside the node that reach it through a routed veth link.
//!
//! Nothing here knows about iptables, nftables or IPVS: a test programs the node namespace with
//! whatever it exercises (see [`Netns::command`]) and sends traffic with [`Netns::probe`].
//!
//! ```text
//!            client-a (10.L.128.2)          pod-1 (10.L.1.2)   pod-2 (10.L.2.2) ...
//!                  |                             |                  |
//!             10.L.128.1                     10.L.1.1           10.L.2.1
//!            +----------------------- node ------------------------------+
//!            |  lo: 10.L.255.1/32, fd00:L:ff::1/128 (the node IP)         |
//!            |  default routes via lo, forwarding on                     |
//!            +-----------------------------------------------------------+
//! ```
//!
//! Every host (pod or client) sits on its own point-to-point /24 (IPv4) and /64 (IPv6) with the
//! node as its gateway. Pods take host indices 1..=127, so every pod address lies in
//! [`Lab::pod_cidr_v4`] / [`Lab::pod_cidr_v6`]; clients take 128..=254 and lie outside them. `L` is a
//! per-lab octet; since every address lives inside the lab's own namespaces, labs running in
//! parallel cannot collide even if `L` repeats. Namespace names are unique per process and per lab
//! (`fpt-<pid>-<n>-<role>`), and [`Lab::new`] sweeps namespaces left by dead test processes.
//!
//! Everything runs as root. Servers and probes run on threads of the test process that enter the
//! namespace with `setns(2)` (no helper binaries); commands run through `ip netns exec`.

use std::{
    fmt,
    fs::File,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd,
    path::Path,
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use rustix::{
    event::{PollFd, PollFlags, Timespec, poll},
    thread::{LinkNameSpaceType, move_into_link_name_space},
};

/// Prefix of every namespace this module creates.
pub const NETNS_PREFIX: &str = "fpt-";

const NETNS_DIR: &str = "/run/netns";

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Fails loudly unless the process runs as root: kernel tests must not skip silently.
pub fn require_root() {
    let uid = rustix::process::geteuid();
    assert!(uid.is_root(), "kernel tests need root (CAP_NET_ADMIN); running as uid {}", uid.as_raw());
}

/// Runs `cmd` and returns its stdout, or an error carrying its stderr.
pub fn run_checked(cmd: &mut Command) -> Result<String> {
    let out: Output = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run_checked(Command::new("ip").args(args))
}

/// One named network namespace. Cloning shares it; the namespace is deleted when the last clone is
/// dropped (or when the [`Lab`] that made it is dropped).
#[derive(Clone)]
pub struct Netns(Arc<NetnsInner>);

struct NetnsInner {
    name: String,
}

impl Drop for NetnsInner {
    fn drop(&mut self) {
        delete_netns(&self.name);
    }
}

/// Deletes a namespace if it still exists (processes and sockets in it die with their last user).
fn delete_netns(name: &str) {
    if Path::new(NETNS_DIR).join(name).exists()
        && let Err(e) = ip(&["netns", "del", name])
    {
        eprintln!("netns: cannot delete {name}: {e:#}");
    }
}

impl fmt::Debug for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Netns({})", self.0.name)
    }
}

impl Netns {
    /// Creates a namespace with `lo` up.
    pub fn create(name: &str) -> Result<Self> {
        ip(&["netns", "add", name])?;
        let ns = Self(Arc::new(NetnsInner { name: name.to_owned() }));
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// A command that runs `program` inside this namespace (`ip netns exec <name> <program>`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.name(), program]);
        cmd
    }

    /// Runs `program args...` inside this namespace; its stdout, or an error with its stderr.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        run_checked(self.command(program).args(args))
    }

    /// Runs `ip -n <name> args...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A veth pair: `link` here, its peer `eth0` inside `peer` (both down, without addresses).
    pub fn add_veth(&self, link: &str, peer: &Netns) -> Result<()> {
        self.ip(&["link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", peer.name()])
            .map(drop)
    }

    /// Sets a sysctl inside this namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run("sysctl", &["-q", "-w", &format!("{key}={value}")]).map(drop)
    }

    /// Runs `f` on a new thread that has entered this namespace, and waits for it. Sockets created
    /// by `f` belong to this namespace.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        self.spawn(f)?.join()
    }

    /// Starts `f` on a new thread inside this namespace; returns once the thread has entered it.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<NsThread<T>> {
        let path = Path::new(NETNS_DIR).join(self.name());
        let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new().name(format!("netns-{}", self.name())).spawn(move || {
            let entered = move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network));
            let ok = entered.is_ok();
            // The caller waits for this message below.
            let _ = entered_tx.send(entered);
            if ok { Some(f()) } else { None }
        })?;
        match entered_rx.recv() {
            Ok(Ok(())) => Ok(NsThread { handle, netns: self.name().to_owned() }),
            Ok(Err(e)) => bail!("setns into {}: {e}", self.name()),
            Err(_) => bail!("thread for netns {} died before entering it", self.name()),
        }
    }

    /// One request to `addr` from this namespace: connects (TCP) or sends a datagram (UDP) and
    /// reads the answer, waiting at most `timeout`.
    pub fn probe(&self, proto: Proto, addr: SocketAddr, timeout: Duration) -> Outcome {
        match self.enter(move || probe_here(proto, addr, timeout)) {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Failed(format!("{e:#}")),
        }
    }

    /// Starts a server on `addr` inside this namespace that answers every TCP connection or UDP
    /// datagram with `name`; returns once it listens. It runs until the [`Server`] is dropped.
    pub fn serve(&self, name: &str, proto: Proto, addr: SocketAddr) -> Result<Server> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let reply = name.to_owned();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread = self.spawn(move || serve_here(proto, addr, &reply, &stop_flag, &bound_tx))?;
        let server = Server { stop, thread: Some(thread) };
        match bound_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(server),
            Ok(Err(e)) => bail!("server {name} on {addr}: {e}"),
            Err(_) => bail!("server {name} on {addr} did not start"),
        }
    }

    /// `count` requests to `addr` from this namespace, each from a new socket (new source port).
    pub fn probe_many(
        &self,
        proto: Proto,
        addr: SocketAddr,
        count: usize,
        timeout: Duration,
    ) -> Vec<Outcome> {
        match self.enter(move || (0..count).map(|_| probe_here(proto, addr, timeout)).collect()) {
            Ok(outcomes) => outcomes,
            Err(e) => vec![Outcome::Failed(format!("{e:#}")); count],
        }
    }
}

/// A thread running inside a namespace (see [`Netns::spawn`]).
pub struct NsThread<T> {
    handle: JoinHandle<Option<T>>,
    netns: String,
}

impl<T> NsThread<T> {
    /// Waits for the thread and returns what it returned.
    pub fn join(self) -> Result<T> {
        match self.handle.join() {
            Ok(Some(value)) => Ok(value),
            Ok(None) => bail!("thread could not enter netns {}", self.netns),
            Err(_) => bail!("thread inside netns {} panicked", self.netns),
        }
    }
}

/// Transport protocol of a server or a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

/// What a probe got back.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A server answered with this name.
    Answered(String),
    /// Actively refused (TCP RST or ICMP port/admin unreachable).
    Refused,
    /// Nothing came back in time.
    Timeout,
    /// A firewall rule of the probing namespace itself stopped the request before it left (EPERM:
    /// a REJECT or DROP in the OUTPUT path, seen on UDP sends from that namespace).
    Blocked,
    /// Any other error (unreachable network, setns failure, ...).
    Failed(String),
}

impl Outcome {
    /// The name of the server that answered, if any.
    pub fn answer(&self) -> Option<&str> {
        match self {
            Self::Answered(name) => Some(name),
            _ => None,
        }
    }
}

fn classify(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused | K::ConnectionReset => Outcome::Refused,
        K::TimedOut | K::WouldBlock => Outcome::Timeout,
        K::PermissionDenied => Outcome::Blocked,
        _ => Outcome::Failed(e.to_string()),
    }
}

/// One request from the current thread's namespace (for use inside [`Netns::spawn`]).
pub fn probe_here(proto: Proto, addr: SocketAddr, timeout: Duration) -> Outcome {
    let result = match proto {
        Proto::Tcp => probe_tcp(addr, timeout),
        Proto::Udp => probe_udp(addr, timeout),
    };
    match result {
        Ok(answer) => Outcome::Answered(answer),
        Err(e) => classify(&e),
    }
}

fn probe_tcp(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer.trim().to_owned())
}

fn probe_udp(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let bind: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(bind)?;
    // Connected, so that an ICMP port-unreachable surfaces as ECONNREFUSED.
    socket.connect(addr)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send(b"who\n")?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

/// A pod or a client: one namespace behind its own veth link to the node.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub netns: Netns,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    /// The node's addresses on this host's link (the host's gateways).
    pub gateway_v4: Ipv4Addr,
    pub gateway_v6: Ipv6Addr,
}

impl Host {
    /// This host's address in `family` (true: IPv6).
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 { self.v6.into() } else { self.v4.into() }
    }
}

/// A TCP or UDP server started with [`Netns::serve`]: answers every connection or datagram with a
/// name. Dropping it stops it.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<NsThread<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A node namespace with pods and clients around it. Dropping the lab stops its servers and deletes
/// its namespaces.
pub struct Lab {
    id: String,
    octet: u8,
    node: Netns,
    pods: Vec<Host>,
    clients: Vec<Host>,
    servers: Vec<Server>,
}

impl Lab {
    /// Creates the node namespace (forwarding on, node IP on `lo`, default routes via `lo` so that locally generated traffic to virtual IPs has a route).
    pub fn new() -> Result<Self> {
        require_root();
        sweep_stale();
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let id = format!("{NETNS_PREFIX}{pid}-{n}");
        let octet = u8::try_from((pid.wrapping_mul(31).wrapping_add(n) % 250) + 1).unwrap_or(1);
        let node = Netns::create(&format!("{id}-node"))?;
        let lab = Self { id, octet, node, pods: Vec::new(), clients: Vec::new(), servers: Vec::new() };
        let node = &lab.node;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        node.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        // No dummy interfaces in every container; `lo` carries the node IP just as well. The default
        // routes exist so that locally generated traffic to a virtual IP passes the routing lookup
        // and reaches nat OUTPUT; what no rule redirects dies on `lo`.
        node.ip(&["addr", "add", &format!("{}/32", lab.node_ip_v4()), "dev", "lo"])?;
        node.ip(&["-6", "addr", "add", &format!("{}/128", lab.node_ip_v6()), "dev", "lo", "nodad"])?;
        node.ip(&["route", "add", "default", "dev", "lo"])?;
        node.ip(&["-6", "route", "add", "default", "dev", "lo"])?;
        Ok(lab)
    }

    /// This lab's unique id; also the prefix of its namespace names.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node namespace.
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// The node's own IPv4 address (on `lo`), as a NodePort or a client would use it.
    pub fn node_ip_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet, 255, 1)
    }

    pub fn node_ip_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, u16::from(self.octet), 0xff, 0, 0, 0, 0, 1)
    }

    pub fn node_ip(&self, v6: bool) -> IpAddr {
        if v6 { self.node_ip_v6().into() } else { self.node_ip_v4().into() }
    }

    /// Holds every pod address (host indices 1..=127) and no client address.
    pub fn pod_cidr_v4(&self) -> ipnet::Ipv4Net {
        ipnet::Ipv4Net::new(Ipv4Addr::new(10, self.octet, 0, 0), 17).unwrap_or_default()
    }

    pub fn pod_cidr_v6(&self) -> ipnet::Ipv6Net {
        ipnet::Ipv6Net::new(Ipv6Addr::new(0xfd00, u16::from(self.octet), 0, 0, 0, 0, 0, 0), 41)
            .unwrap_or_default()
    }

    pub fn pods(&self) -> &[Host] {
        &self.pods
    }

    pub fn clients(&self) -> &[Host] {
        &self.clients
    }

    /// Adds a pod namespace named `<lab>-<name>` linked to the node; `name` is also what its servers
    /// answer with.
    pub fn add_pod(&mut self, name: &str) -> Result<Host> {
        let index = u8::try_from(self.pods.len() + 1).ok().filter(|i| *i <= 127).context("too many pods")?;
        let host = self.attach(name, index)?;
        self.pods.push(host.clone());
        Ok(host)
    }

    /// Adds a client namespace outside the pod network, routed through the node.
    pub fn add_client(&mut self, name: &str) -> Result<Host> {
        let index =
            u8::try_from(self.clients.len() + 128).ok().filter(|i| *i <= 254).context("too many clients")?;
        let host = self.attach(name, index)?;
        self.clients.push(host.clone());
        Ok(host)
    }

    fn attach(&self, name: &str, index: u8) -> Result<Host> {
        let netns = Netns::create(&format!("{}-{name}", self.id))?;
        let o = self.octet;
        let v4 = Ipv4Addr::new(10, o, index, 2);
        let gateway_v4 = Ipv4Addr::new(10, o, index, 1);
        let v6 = Ipv6Addr::new(0xfd00, u16::from(o), u16::from(index), 0, 0, 0, 0, 2);
        let gateway_v6 = Ipv6Addr::new(0xfd00, u16::from(o), u16::from(index), 0, 0, 0, 0, 1);
        let node_side = format!("veth{index}");
        netns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        netns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        self.node.add_veth(&node_side, &netns)?;
        self.node.ip(&["addr", "add", &format!("{gateway_v4}/24"), "dev", &node_side])?;
        self.node.ip(&["-6", "addr", "add", &format!("{gateway_v6}/64"), "dev", &node_side, "nodad"])?;
        self.node.ip(&["link", "set", &node_side, "up"])?;
        netns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
        netns.ip(&["-6", "addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["route", "add", "default", "via", &gateway_v4.to_string()])?;
        netns.ip(&["-6", "route", "add", "default", "via", &gateway_v6.to_string()])?;
        Ok(Host { name: name.to_owned(), netns, v4, v6, gateway_v4, gateway_v6 })
    }

    /// Starts a server in `host` on `port` (both families) that answers every TCP connection or UDP
    /// datagram with the host's name. It runs until the lab is dropped.
    pub fn serve(&mut self, host: &Host, proto: Proto, port: u16) -> Result<()> {
        for addr in [IpAddr::from(host.v4), IpAddr::from(host.v6)] {
            self.servers.push(host.netns.serve(&host.name, proto, SocketAddr::new(addr, port))?);
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for server in &self.servers {
            server.stop.store(true, Ordering::Relaxed);
        }
        for server in &mut self.servers {
            if let Some(thread) = server.thread.take() {
                let _ = thread.join();
            }
        }
        // Host handles the test still holds must not keep the lab's namespaces alive.
        for host in self.pods.iter().chain(&self.clients) {
            delete_netns(host.netns.name());
        }
        delete_netns(self.node.name());
    }
}

const POLL_INTERVAL: Timespec = Timespec { tv_sec: 0, tv_nsec: 100_000_000 };

/// Serves in the current thread's namespace until `stop` is set.
fn serve_here(
    proto: Proto,
    addr: SocketAddr,
    name: &str,
    stop: &AtomicBool,
    bound: &std::sync::mpsc::Sender<std::io::Result<()>>,
) {
    let reply = format!("{name}\n");
    match proto {
        Proto::Tcp => {
            let listener = match TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = bound.send(Err(e));
                    return;
                }
            };
            let _ = bound.send(Ok(()));
            while !stop.load(Ordering::Relaxed) {
                let mut fds = [PollFd::new(&listener, PollFlags::IN)];
                if poll(&mut fds, Some(&POLL_INTERVAL)).unwrap_or(0) == 0 {
                    continue;
                }
                while let Ok((mut stream, _)) = listener.accept() {
                    // A client that went away is not the server's problem.
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.write_all(reply.as_bytes());
                }
            }
        }
        Proto::Udp => {
            let socket = match UdpSocket::bind(addr)
                .and_then(|s| s.set_read_timeout(Some(Duration::from_millis(100))).map(|()| s))
            {
                Ok(s) => s,
                Err(e) => {
                    let _ = bound.send(Err(e));
                    return;
                }
            };
            let _ = bound.send(Ok(()));
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(reply.as_bytes(), peer);
                }
            }
        }
    }
}

/// Deletes `fpt-<pid>-...` namespaces whose process is gone (left by a crashed or killed test run).
pub fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            delete_netns(&name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(2);

    /// The lab itself, without any data plane: servers answer directly, a closed port refuses, and
    /// clients reach pods through the node in both families.
    #[test]
    fn lab_routes_and_serves() {
        let mut lab = Lab::new().expect("lab");
        let pod = lab.add_pod("pod-a").expect("pod");
        let client = lab.add_client("client").expect("client");
        lab.serve(&pod, Proto::Tcp, 8080).expect("tcp server");
        lab.serve(&pod, Proto::Udp, 5353).expect("udp server");
        assert!(lab.pod_cidr_v4().contains(&pod.v4) && !lab.pod_cidr_v4().contains(&client.v4));
        assert!(lab.pod_cidr_v6().contains(&pod.v6) && !lab.pod_cidr_v6().contains(&client.v6));

        for v6 in [false, true] {
            for from in [lab.node(), &client.netns] {
                let tcp = SocketAddr::new(pod.addr(v6), 8080);
                assert_eq!(
                    from.probe(Proto::Tcp, tcp, T),
                    Outcome::Answered("pod-a".into()),
                    "{from:?} tcp {tcp}"
                );
                let udp = SocketAddr::new(pod.addr(v6), 5353);
                assert_eq!(
                    from.probe(Proto::Udp, udp, T),
                    Outcome::Answered("pod-a".into()),
                    "{from:?} udp {udp}"
                );
                let closed = SocketAddr::new(pod.addr(v6), 9);
                assert_eq!(from.probe(Proto::Tcp, closed, T), Outcome::Refused, "{from:?} tcp {closed}");
                assert_eq!(from.probe(Proto::Udp, closed, T), Outcome::Refused, "{from:?} udp {closed}");
            }
            // The node's own address answers pings of the route table: a closed port refuses.
            let node = SocketAddr::new(lab.node_ip(v6), 9);
            assert_eq!(client.netns.probe(Proto::Tcp, node, T), Outcome::Refused);
        }
        let names: Vec<String> = std::fs::read_dir(NETNS_DIR)
            .expect("netns dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(lab.id()))
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        let id = lab.id().to_owned();
        drop(lab);
        let left = std::fs::read_dir(NETNS_DIR)
            .expect("netns dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{id}-")))
            .count();
        assert_eq!(left, 0, "namespaces left after drop");
    }
}
