//! The IPVS data plane: kube-proxy's IPVS proxier, programmed over the kernel's generic-netlink
//! IPVS family (no `ipvsadm` at run time), plus a dummy interface of our own
//! ([`render::DUMMY_INTERFACE`]) for the service addresses and a few iptables rules (chains
//! `FPVS-*`) for masquerade, rejects and load-balancer source ranges.
//!
//! [`netlink`] encodes and decodes the IPVS family (pure); [`render`] turns plans into the desired
//! IPVS state and diffs it against the kernel's (pure); [`IpvsProxier`] reads the kernel, applies the
//! difference and cleans up.
//!
//! # Network namespaces
//! Netlink is not a tool that [`Runner`] could run inside `ip netns exec`: a netlink socket talks
//! to the network namespace it was created in. When the runner names a namespace, the socket is
//! created on a short-lived thread that first enters `/run/netns/<name>` (`setns`), so IPVS, the
//! `ip`/`iptables` tools and the sysctls all act on the same namespace; without a name they act on
//! the agent's own, which is the node's on a real node. The VM test (`tests/vm/`) runs the agent
//! binary in the guest's initial namespace and its pods in namespaces of their own.
//!
//! # Syncs
//! Full syncs read every virtual server and the real servers of ours back from the kernel and send
//! only the difference; partial syncs diff against what the last successful sync applied. The
//! (protocol, node port) pairs we serve on node addresses are kept in a small file under
//! `/run/fleetproxy/`, so that a restarted agent still recognises its node-port virtual servers.

pub mod netlink;
pub mod render;

use std::{
    collections::BTreeSet,
    net::IpAddr,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    time::Instant,
};

use fleetproxy_api::{IpvsScheduler, ProxyMode};
use rustix::net::{
    AddressFamily, Protocol, RecvFlags, SendFlags, SocketType,
    netlink::{GENERIC, SocketAddrNetlink},
};

use self::{
    netlink::{Destination, Message, Request, Service, ServiceId},
    render::{Current, DUMMY_INTERFACE, Desired, Ownership},
};
use crate::{
    dataplane::{Changes, DataPlane, DataPlaneError, SyncStats},
    exec::Runner,
    model::IpFamily,
    policy::{NodeSettings, ServicePlan},
};

const NETLINK_TOOL: &str = "IPVS netlink";
/// Requests sent in one datagram. The kernel acknowledges each one; the acknowledgements of a batch
/// must fit the socket's receive buffer, or the kernel drops them (ENOBUFS).
const BATCH_REQUESTS: usize = 100;
/// Receive buffer asked for (the kernel caps it at net.core.rmem_max).
const SOCKET_BUFFER: usize = 4 << 20;
const RECV_BUFFER: usize = 256 * 1024;
const RECV_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The sysctls IPVS mode needs (as kube-proxy sets them): conntrack for IPVS connections, so that
/// masquerade works, and expiry of connections to removed real servers.
const SYSCTLS: [&str; 3] = [
    "net.ipv4.vs.conntrack=1",
    "net.ipv4.vs.expire_nodest_conn=1",
    "net.ipv4.vs.expire_quiescent_template=1",
];

fn apply_error(message: impl Into<String>) -> DataPlaneError {
    DataPlaneError::Apply { tool: NETLINK_TOOL.into(), message: message.into() }
}

/// A blocking generic-netlink socket bound to the IPVS family.
struct GenlSocket {
    fd: OwnedFd,
    family: u16,
    seq: u32,
    buf: Vec<u8>,
}

fn io_error(what: &str, err: impl std::fmt::Display) -> DataPlaneError {
    apply_error(format!("{what}: {err}"))
}

impl GenlSocket {
    /// Opens a socket in `netns` (or our own namespace) and resolves the IPVS family.
    fn open(netns: Option<&str>) -> Result<Self, DataPlaneError> {
        let fd = open_netlink(GENERIC, netns)?;
        let mut socket = Self { fd, family: 0, seq: 0, buf: vec![0; RECV_BUFFER] };
        let seq = socket.next_seq();
        socket.send(&netlink::encode_get_family(seq))?;
        let mut family = None;
        socket.receive_until(seq, false, |message| {
            if let Message::Data { attrs, .. } = message {
                family = Some(netlink::decode_family_id(attrs).map_err(|e| apply_error(e.to_string()))?);
            }
            Ok(())
        })?;
        socket.family = family.ok_or_else(|| apply_error("the kernel did not name the IPVS family"))?;
        Ok(socket)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, bytes: &[u8]) -> Result<(), DataPlaneError> {
        rustix::net::sendto(&self.fd, bytes, SendFlags::empty(), &SocketAddrNetlink::new(0, 0))
            .map_err(|e| io_error("send", e))?;
        Ok(())
    }

    /// Reads messages until the answer to `seq` is complete: its acknowledgement (`dump: false`)
    /// or its `NLMSG_DONE` (`dump: true`). Data messages go to `each`.
    fn receive_until(
        &mut self,
        seq: u32,
        dump: bool,
        mut each: impl FnMut(&Message) -> Result<(), DataPlaneError>,
    ) -> Result<(), DataPlaneError> {
        loop {
            let (len, _) = rustix::net::recv(&self.fd, &mut self.buf[..], RecvFlags::empty())
                .map_err(|e| io_error("receive", e))?;
            for message in
                netlink::parse_messages(&self.buf[..len]).map_err(|e| apply_error(e.to_string()))?
            {
                match message {
                    Message::Error { seq: s, errno } if s == seq => {
                        if errno != 0 {
                            return Err(apply_error(errno_text(errno)));
                        }
                        if !dump {
                            return Ok(());
                        }
                    }
                    Message::Done { seq: s } if s == seq && dump => return Ok(()),
                    ref data @ Message::Data { seq: s, .. } if s == seq => each(data)?,
                    _ => {}
                }
            }
        }
    }

    fn dump(&mut self, request: &Request) -> Result<Vec<Vec<u8>>, DataPlaneError> {
        let seq = self.next_seq();
        self.send(&netlink::encode(request, self.family, seq))?;
        let mut out = Vec::new();
        self.receive_until(seq, true, |message| {
            if let Message::Data { attrs, .. } = message {
                out.push(attrs.clone());
            }
            Ok(())
        })?;
        Ok(out)
    }

    fn services(&mut self) -> Result<Vec<Service>, DataPlaneError> {
        self.dump(&Request::GetServices)?
            .iter()
            .map(|attrs| netlink::decode_service(attrs).map_err(|e| read_back_error(e.to_string())))
            .collect()
    }

    fn dests(&mut self, id: ServiceId) -> Result<Vec<Destination>, DataPlaneError> {
        self.dump(&Request::GetDests(id))?
            .iter()
            .map(|attrs| netlink::decode_dest(attrs, id.af()).map_err(|e| read_back_error(e.to_string())))
            .collect()
    }

    /// Sends `requests` in batches; every one is acknowledged. Returns the first refusal, naming
    /// the request.
    fn apply(&mut self, requests: &[Request]) -> Result<(), DataPlaneError> {
        let mut index = 0;
        while index < requests.len() {
            let mut batch = Vec::new();
            let mut seqs = Vec::new();
            while index < requests.len() && seqs.len() < BATCH_REQUESTS {
                let seq = self.next_seq();
                batch.extend(netlink::encode(&requests[index], self.family, seq));
                seqs.push((seq, index));
                index += 1;
            }
            self.send(&batch)?;
            let mut pending: BTreeSet<u32> = seqs.iter().map(|(s, _)| *s).collect();
            let mut failure = None;
            while !pending.is_empty() {
                let (len, _) = rustix::net::recv(&self.fd, &mut self.buf[..], RecvFlags::empty())
                    .map_err(|e| io_error("receive", e))?;
                for message in
                    netlink::parse_messages(&self.buf[..len]).map_err(|e| apply_error(e.to_string()))?
                {
                    if let Message::Error { seq, errno } = message
                        && pending.remove(&seq)
                        && errno != 0
                        && failure.is_none()
                    {
                        let at = seqs.iter().find(|(s, _)| *s == seq).map_or(0, |(_, i)| *i);
                        failure = Some(apply_error(format!("{}: {:?}", errno_text(errno), requests[at])));
                    }
                }
            }
            if let Some(failure) = failure {
                return Err(failure);
            }
        }
        Ok(())
    }
}

/// A netlink socket of `protocol` in the network namespace `netns` (or ours): a socket stays in the
/// namespace it was created in, so it is created on a thread that entered `/run/netns/<netns>`.
pub(crate) fn open_netlink(protocol: Protocol, netns: Option<&str>) -> Result<OwnedFd, DataPlaneError> {
    let Some(name) = netns else { return new_socket(protocol) };
    let path = Path::new("/run/netns").join(name);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let ns = std::fs::File::open(&path)
                    .map_err(|e| io_error(&format!("open {}", path.display()), e))?;
                rustix::thread::move_into_link_name_space(
                    ns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .map_err(|e| io_error(&format!("setns {}", path.display()), e))?;
                new_socket(protocol)
            })
            .join()
            .unwrap_or_else(|_| Err(apply_error("netns thread panicked")))
    })
}

fn new_socket(protocol: Protocol) -> Result<OwnedFd, DataPlaneError> {
    let fd = rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, Some(protocol))
        .map_err(|e| io_error("netlink socket", e))?;
    rustix::net::bind(&fd, &SocketAddrNetlink::new(0, 0)).map_err(|e| io_error("bind netlink socket", e))?;
    // The kernel answers at once; a missing answer must fail the sync, not hang it.
    rustix::net::sockopt::set_socket_timeout(&fd, rustix::net::sockopt::Timeout::Recv, Some(RECV_TIMEOUT))
        .map_err(|e| io_error("set netlink receive timeout", e))?;
    if let Err(error) = rustix::net::sockopt::set_socket_recv_buffer_size(&fd, SOCKET_BUFFER) {
        tracing::debug!(%error, "cannot enlarge the netlink receive buffer");
    }
    Ok(fd)
}

fn errno_text(errno: i32) -> String {
    let code = errno.unsigned_abs() as i32;
    format!("{} (errno {code})", std::io::Error::from_raw_os_error(code))
}

fn read_back_error(message: String) -> DataPlaneError {
    DataPlaneError::ReadBack { what: "IPVS table".into(), message }
}

/// Runs `f` on a fresh IPVS socket on a blocking thread.
async fn with_socket<T: Send + 'static>(
    netns: Option<String>,
    f: impl FnOnce(&mut GenlSocket) -> Result<T, DataPlaneError> + Send + 'static,
) -> Result<T, DataPlaneError> {
    tokio::task::spawn_blocking(move || {
        let mut socket = GenlSocket::open(netns.as_deref())?;
        f(&mut socket)
    })
    .await
    .map_err(|e| apply_error(format!("netlink task failed: {e}")))?
}

/// Every virtual server of the kernel, with the real servers of those `wanted` says to read.
fn read_current(
    socket: &mut GenlSocket,
    wanted: impl Fn(&ServiceId) -> bool,
) -> Result<Current, DataPlaneError> {
    let mut current = Current::new();
    for service in socket.services()? {
        let dests = if wanted(&service.id) { socket.dests(service.id)? } else { Vec::new() };
        current.insert(service.id, (service, dests));
    }
    Ok(current)
}

/// The node's addresses, split into those on our dummy interface and the others.
#[derive(Clone, Debug, Default)]
struct Addresses {
    dummy_exists: bool,
    bound: BTreeSet<IpAddr>,
    node: BTreeSet<IpAddr>,
}

/// Parses `ip -o addr show` (`2: eth0    inet 172.18.0.2/16 brd ... scope global eth0\ ...`).
fn parse_addresses(text: &str) -> Addresses {
    let mut out = Addresses::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [_, interface, kind, address, ..] = words[..] else { continue };
        let interface = interface.split('@').next().unwrap_or(interface);
        if interface == DUMMY_INTERFACE {
            out.dummy_exists = true;
        }
        if kind != "inet" && kind != "inet6" {
            continue;
        }
        let Some(ip) = address.split('/').next().and_then(|a| a.parse::<IpAddr>().ok()) else { continue };
        if interface == DUMMY_INTERFACE {
            // A link-local address the kernel gave the interface is not a service address.
            if !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80) {
                out.bound.insert(ip);
            }
        } else {
            out.node.insert(ip);
        }
    }
    out
}

/// What the last successful sync applied, for partial syncs.
#[derive(Clone, Debug)]
struct Applied {
    desired: Desired,
    settings: NodeSettings,
}

/// The IPVS backend.
#[derive(Debug)]
pub struct IpvsProxier {
    runner: Runner,
    scheduler: IpvsScheduler,
    applied: Option<Applied>,
    state_file: PathBuf,
    /// Netlink requests and address changes the last successful sync sent.
    last_changes: usize,
}

impl IpvsProxier {
    /// A proxier with the default scheduler (rr).
    pub fn new(runner: Runner) -> Self {
        Self::with_scheduler(runner, IpvsScheduler::default())
    }

    pub fn with_scheduler(runner: Runner, scheduler: IpvsScheduler) -> Self {
        let state_file = match runner.netns() {
            Some(ns) => PathBuf::from(format!("/run/fleetproxy/ipvs-node-ports-{ns}")),
            None => PathBuf::from("/run/fleetproxy/ipvs-node-ports"),
        };
        Self { runner, scheduler, applied: None, state_file, last_changes: 0 }
    }

    pub fn scheduler(&self) -> IpvsScheduler {
        self.scheduler
    }

    /// Changes the scheduler of every virtual server from the next sync on, which is then a full
    /// one (its diff sends `SET_SERVICE` for each). Call `probe` first: the new scheduler's module
    /// may be missing.
    pub fn set_scheduler(&mut self, scheduler: IpvsScheduler) {
        if scheduler != self.scheduler {
            self.scheduler = scheduler;
            self.applied = None;
        }
    }

    /// How many netlink requests and dummy-interface address changes the last successful sync
    /// sent (0 when the kernel already matched).
    pub fn last_changes(&self) -> usize {
        self.last_changes
    }

    fn netns(&self) -> Option<String> {
        self.runner.netns().map(str::to_owned)
    }

    async fn addresses(&self) -> Result<Addresses, DataPlaneError> {
        let text = self.runner.run("ip", &["-o", "addr", "show"], None).await?;
        let mut addresses = parse_addresses(&text);
        if !addresses.dummy_exists {
            let links = self.runner.run("ip", &["-o", "link", "show"], None).await?;
            addresses.dummy_exists = links.lines().any(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|n| n.trim_end_matches(':').split('@').next() == Some(DUMMY_INTERFACE))
            });
        }
        Ok(addresses)
    }

    fn recorded_node_ports(&self) -> BTreeSet<(u16, u16)> {
        std::fs::read_to_string(&self.state_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let (protocol, port) = line.split_once(' ')?;
                Some((protocol.parse().ok()?, port.parse().ok()?))
            })
            .collect()
    }

    fn record_node_ports(&self, ports: &BTreeSet<(u16, u16)>) {
        let text: String = ports.iter().map(|(protocol, port)| format!("{protocol} {port}\n")).collect();
        let written = self
            .state_file
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&self.state_file, text));
        if let Err(error) = written {
            tracing::warn!(path = %self.state_file.display(), %error, "cannot record IPVS node ports");
        }
    }

    fn ownership(
        &self,
        settings: &NodeSettings,
        addresses: &Addresses,
        extra_ports: &BTreeSet<(u16, u16)>,
    ) -> Ownership {
        let mut node_ports = self.recorded_node_ports();
        node_ports.extend(extra_ports);
        Ownership {
            excluded: settings.excluded_cidrs.clone(),
            bound: addresses.bound.clone(),
            node_ips: addresses.node.clone(),
            node_ports,
        }
    }

    /// `ip -batch -` lines that add (or delete) addresses on the dummy interface.
    async fn change_addresses(&self, verb: &str, ips: &[IpAddr]) -> Result<(), DataPlaneError> {
        if ips.is_empty() {
            return Ok(());
        }
        let mut batch = String::new();
        for ip in ips {
            let (prefix, extra) =
                if ip.is_ipv4() { (32, "") } else { (128, if verb == "add" { " nodad" } else { "" }) };
            batch.push_str(&format!("addr {verb} {ip}/{prefix} dev {DUMMY_INTERFACE}{extra}\n"));
        }
        self.runner.run("ip", &["-batch", "-"], Some(batch.as_bytes())).await.map(drop)
    }

    fn families(&self) -> Vec<IpFamily> {
        let mut families = vec![IpFamily::V4];
        if on_path("ip6tables-restore") {
            families.push(IpFamily::V6);
        }
        families
    }

    async fn iptables_save(&self, family: IpFamily) -> Result<render::SavedRules, DataPlaneError> {
        let tool = if family == IpFamily::V4 { "iptables-save" } else { "ip6tables-save" };
        let text = self.runner.run(tool, &[], None).await?;
        Ok(render::parse_saved(&text))
    }

    async fn iptables_restore(&self, family: IpFamily, input: &str) -> Result<(), DataPlaneError> {
        let tool = if family == IpFamily::V4 { "iptables-restore" } else { "ip6tables-restore" };
        self.runner.run(tool, &["--noflush", "--wait=5"], Some(input.as_bytes())).await.map(drop)
    }
}

fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(Into::into))
        .any(|dir| dir.join(tool).is_file())
}

impl DataPlane for IpvsProxier {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Ipvs
    }

    async fn probe(&self) -> Result<(), DataPlaneError> {
        let unsupported = |reason: String| DataPlaneError::Unsupported { mode: ProxyMode::Ipvs, reason };
        for tool in ["iptables-restore", "iptables-save", "ip"] {
            if !on_path(tool) {
                return Err(unsupported(format!("{tool} is not installed")));
            }
        }
        if !Path::new("/proc/net/ip_vs").exists() {
            self.runner.run("modprobe", &["ip_vs"], None).await.map_err(|e| {
                unsupported(format!(
                    "the kernel has no IPVS (/proc/net/ip_vs is missing and modprobe ip_vs failed: {e})"
                ))
            })?;
        }
        let module = self.scheduler.kernel_module();
        if !Path::new("/sys/module").join(&module).exists() {
            self.runner.run("modprobe", &[&module], None).await.map_err(|e| {
                unsupported(format!(
                    "the IPVS scheduler {} is not available (module {module} is not loaded and cannot be: {e})",
                    self.scheduler.as_str()
                ))
            })?;
        }
        with_socket(self.netns(), |socket| socket.services().map(drop))
            .await
            .map_err(|e| unsupported(format!("the kernel's IPVS netlink family does not answer: {e}")))
    }

    async fn sync(
        &mut self,
        plans: &[ServicePlan],
        settings: &NodeSettings,
        changes: &Changes,
    ) -> Result<SyncStats, DataPlaneError> {
        let previous = self.applied.take();
        let mut stats = SyncStats::default();
        let started = Instant::now();
        let addresses = self.addresses().await?;
        if !addresses.dummy_exists {
            self.runner.run("ip", &["link", "add", DUMMY_INTERFACE, "type", "dummy"], None).await?;
            // Up: IPv6 addresses on a down link stay tentative and are not local addresses yet. No
            // link-local address of its own (addrgenmode none): every address on it is a service's.
            self.runner
                .run("ip", &["link", "set", "dev", DUMMY_INTERFACE, "addrgenmode", "none"], None)
                .await?;
            self.runner.run("ip", &["link", "set", "dev", DUMMY_INTERFACE, "up"], None).await?;
            // Best effort: a failing sysctl (an older kernel) does not stop the sync.
            if let Err(error) =
                self.runner.run("sysctl", &["-w", SYSCTLS[0], SYSCTLS[1], SYSCTLS[2]], None).await
            {
                tracing::warn!(%error, "cannot set the IPVS sysctls");
            }
        }
        let mut read_time = started.elapsed();

        let started = Instant::now();
        let node_ips: Vec<IpAddr> = addresses.node.iter().copied().collect();
        let desired = render::render(plans, settings, self.scheduler.as_str(), &node_ips);
        stats.render = started.elapsed();

        let ownership = self.ownership(settings, &addresses, &desired.node_ports);
        let partial = match (&previous, changes) {
            (Some(previous), Changes::Services(changed)) if previous.settings == *settings => {
                Some((previous, changed))
            }
            _ => None,
        };
        stats.full = partial.is_none();
        let started = Instant::now();
        let current = match partial {
            Some((previous, changed)) => {
                // The last applied state, with the changed services' real servers as the kernel
                // has them now (draining ones included, with their connection counts).
                let mut current = render::as_current(&previous.desired);
                let refresh: BTreeSet<ServiceId> = desired
                    .services
                    .iter()
                    .chain(&previous.desired.services)
                    .filter(|(_, service)| changed.contains(&service.name))
                    .map(|(id, _)| *id)
                    .collect();
                let fresh = with_socket(self.netns(), move |socket| {
                    Ok(refresh.into_iter().map(|id| (id, socket.dests(id).ok())).collect::<Vec<_>>())
                })
                .await?;
                for (id, dests) in fresh {
                    match dests {
                        Some(dests) => {
                            if let Some(entry) = current.get_mut(&id) {
                                entry.1 = dests;
                            }
                        }
                        // Not in the kernel (GET_DEST of a missing service fails).
                        None => {
                            current.remove(&id);
                        }
                    }
                }
                current
            }
            None => {
                let owned = ownership.clone();
                let wanted: BTreeSet<ServiceId> = desired.services.keys().copied().collect();
                with_socket(self.netns(), move |socket| {
                    read_current(socket, |id| wanted.contains(id) || owned.owns(id))
                })
                .await?
            }
        };
        read_time += started.elapsed();
        let started = Instant::now();
        let changeset = render::diff(&desired, &current, &addresses.bound, &ownership);
        stats.render += started.elapsed();

        let started = Instant::now();
        self.change_addresses("add", &changeset.bind).await?;
        let requests = changeset.requests.clone();
        with_socket(self.netns(), move |socket| socket.apply(&requests)).await?;
        self.change_addresses("del", &changeset.unbind).await?;
        let mut lines = 0;
        for family in self.families() {
            let saved = self.iptables_save(family).await?;
            let input = render::render_iptables(family, plans, settings, &saved.missing_jumps());
            lines += input.lines().count();
            self.iptables_restore(family, &input).await?;
        }
        self.record_node_ports(&desired.node_ports);
        stats.apply = read_time + started.elapsed();
        self.last_changes = changeset.requests.len() + changeset.bind.len() + changeset.unbind.len();
        stats.payload_size = self.last_changes + lines;
        self.applied = Some(Applied { desired, settings: settings.clone() });
        Ok(stats)
    }

    async fn rule_count(&self) -> Result<u64, DataPlaneError> {
        let addresses = self.addresses().await?;
        let ownership = Ownership {
            excluded: Vec::new(),
            bound: addresses.bound.clone(),
            node_ips: addresses.node.clone(),
            node_ports: self.recorded_node_ports(),
        };
        let owned = ownership.clone();
        let current = with_socket(self.netns(), move |socket| read_current(socket, |id| owned.owns(id)))
            .await
            .map_err(|e| read_back_error(e.to_string()))?;
        Ok(current
            .iter()
            .filter(|(id, _)| ownership.owns(id))
            .map(|(_, (_, dests))| 1 + dests.len() as u64)
            .sum())
    }

    async fn cleanup(&mut self) -> Result<(), DataPlaneError> {
        self.applied = None;
        let addresses = self.addresses().await?;
        // Clean-up has no settings: ours is what sits on our interface or on a recorded node port.
        // Excluded addresses are never bound to our interface (plans drop them) nor recorded.
        let owned = self.ownership(&NodeSettings::default(), &addresses, &BTreeSet::new());
        with_socket(self.netns(), move |socket| {
            let ours: Vec<Request> = socket
                .services()?
                .into_iter()
                .filter(|s| owned.owns(&s.id))
                .map(|s| Request::DelService(s.id))
                .collect();
            socket.apply(&ours)
        })
        .await?;
        if addresses.dummy_exists {
            self.runner.run("ip", &["link", "del", DUMMY_INTERFACE], None).await?;
        }
        for family in self.families() {
            if let Some(input) = render::cleanup_iptables(&self.iptables_save(family).await?) {
                self.iptables_restore(family, &input).await?;
            }
        }
        match std::fs::remove_file(&self.state_file) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %self.state_file.display(), %error, "cannot remove the IPVS node-port record");
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_addr_output() {
        let text = "\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
2: eth0    inet 172.18.0.2/16 brd 172.18.255.255 scope global eth0\\       valid_lft forever preferred_lft forever
2: eth0    inet6 fe80::1/64 scope link \\       valid_lft forever preferred_lft forever
5: fleetproxy-ipvs    inet 10.96.0.10/32 scope global fleetproxy-ipvs\\       valid_lft forever preferred_lft forever
5: fleetproxy-ipvs    inet6 fd00::a/128 scope global \\       valid_lft forever preferred_lft forever
5: fleetproxy-ipvs    inet6 fe80::8c1:2ff:fe3d:1/64 scope link \\       valid_lft forever preferred_lft forever
";
        let addresses = parse_addresses(text);
        assert!(addresses.dummy_exists);
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(addresses.bound, BTreeSet::from([ip("10.96.0.10"), ip("fd00::a")]));
        assert_eq!(addresses.node, BTreeSet::from([ip("127.0.0.1"), ip("172.18.0.2"), ip("fe80::1")]));
    }

    #[tokio::test]
    async fn probe_explains_a_kernel_without_ipvs() {
        if Path::new("/proc/net/ip_vs").exists() {
            return;
        }
        let err = IpvsProxier::new(Runner::host()).probe().await.expect_err("no IPVS here");
        let text = err.to_string();
        assert!(matches!(err, DataPlaneError::Unsupported { mode: ProxyMode::Ipvs, .. }), "{text}");
        assert!(text.contains("ipvs mode is not available"), "{text}");
    }
}
