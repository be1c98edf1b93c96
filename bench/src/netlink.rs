//! Network-programming latency and cold start from the kernel's own nftables events: a netlink
//! socket in the proxy's namespace, subscribed to `NFNLGRP_NFTABLES`, timestamps every datagram as
//! it arrives and looks for addresses in the rules and set elements the kernel announces: the
//! pending changes' ([`Tracker`]), or every address of the load during the cold start
//! ([`ColdStart`]).
//!
//! Every commit to nf_tables in a namespace (`nft -f`, and `iptables-restore` with the nf_tables
//! backend, which is what iptables 1.8.9 is) is broadcast to that namespace's listeners once the
//! commit is done, as `NFT_MSG_NEW*` messages carrying the whole object. Nothing is decoded beyond
//! the netlink framing: each change's new endpoint comes from 10.64.0.0/10, a range no other
//! address of the load, of the namespace or of either proxy uses, and every address is fresh
//! (`load::next_change_ip`), so its 4 big-endian bytes in a new rule or set element (a match, a DNAT
//! target, a map element; kube-proxy's anonymous `numgen ... map { ... }` arrives as NEWSET +
//! NEWSETELEM) can only be that change being programmed. A stray match of 4 unrelated bytes (a
//! counter, a handle) could only make a latency shorter, and needs those bytes to equal one of the
//! few addresses pending at that moment. The load and its changes are IPv4, so only the 4-byte form
//! is searched.
//!
//! Lossless by construction or by fallback: the socket gets a 256 MiB buffer, and when the kernel
//! still overruns it (`ENOBUFS`), every change pending at that moment is resolved by kernel dumps
//! instead (as `--detect poll` does) and counted as such; so is every change not seen within
//! [`crate::NETLINK_GRACE`] of the last write. Nothing is dropped silently.
//!
//! The cold start looks for the load's own addresses (the ClusterIPs and the endpoints of
//! 10.128.0.0/9), which are not fresh, so there the scan is stricter: only 4-byte windows at
//! 4-byte-aligned offsets of the message payload are looked up. Netlink attributes are 4-byte
//! aligned, an nftables data attribute (`NFTA_DATA_VALUE` of a comparison, an immediate, a set
//! key or a concatenation, whose fields are padded to 4 bytes each) starts with the address, and
//! iptables-nft's native `-s`/`-d` matches are such comparisons; its `DNAT` target is an
//! `xt_target` blob (`NFTA_TARGET_INFO`: `struct nf_nat_ipv4_multi_range_compat`, the address at
//! offset 8). A false match needs an aligned 4-byte field equal to a missing address; the kernel
//! dump that confirms every cold start (`crate::cold`) catches an address that never arrives.

use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasherDefault, Hasher},
    os::fd::{AsFd, OwnedFd},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use rustix::{
    io::Errno,
    net::{
        AddressFamily, RecvFlags, SocketType,
        netlink::{NETFILTER, SocketAddrNetlink},
    },
};

// --- linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h ---
const NLMSG_HDRLEN: usize = 16;
/// `struct nfgenmsg { u8 family; u8 version; be16 res_id; }`, after the netlink header.
const NFGENMSG_LEN: usize = 4;
/// `NFNLGRP_NFTABLES` (`enum nfnetlink_groups`).
const NFNLGRP_NFTABLES: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_NEWSETELEM: u16 = 12;

/// Receive buffer of the socket (SO_RCVBUFFORCE: we are root; the kernel doubles it).
const SOCKET_BUFFER: usize = 256 << 20;
/// One `recv`: larger than any datagram the kernel builds for events.
const RECV_BUFFER: usize = 1 << 20;
/// How often the listener looks at its stop flag.
const RECV_TIMEOUT: Duration = Duration::from_millis(100);

/// The messages of one datagram: (type, payload after the netlink header). Messages are
/// concatenated, each padded to 4 bytes; a malformed length ends the walk.
pub fn messages(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u32::from_ne_bytes(buf.get(0..4)?.try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return None;
        }
        let msg_type = u16::from_ne_bytes([buf[4], buf[5]]);
        let payload = &buf[NLMSG_HDRLEN..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((msg_type, payload))
    })
}

/// Whether a message of `msg_type` announces something that can hold an endpoint address.
pub fn announces_addresses(msg_type: u16) -> bool {
    msg_type >> 8 == NFNL_SUBSYS_NFTABLES
        && matches!(msg_type & 0xff, NFT_MSG_NEWRULE | NFT_MSG_NEWSET | NFT_MSG_NEWSETELEM)
}

/// Every IPv4 address `keep` accepts, as 4 big-endian bytes at any offset of `bytes`.
pub fn scan_be_ipv4(bytes: &[u8], keep: fn(u32) -> bool, mut found: impl FnMut(u32)) {
    for window in bytes.windows(4) {
        let ip = u32::from_be_bytes([window[0], window[1], window[2], window[3]]);
        if keep(ip) {
            found(ip);
        }
    }
}

/// The addresses `keep` accepts in the new rules and sets of one datagram.
pub fn addresses_in(datagram: &[u8], keep: fn(u32) -> bool) -> Vec<u32> {
    let mut out = Vec::new();
    for (msg_type, payload) in messages(datagram) {
        if announces_addresses(msg_type) && payload.len() > NFGENMSG_LEN {
            scan_be_ipv4(&payload[NFGENMSG_LEN..], keep, |ip| out.push(ip));
        }
    }
    out
}

/// A multiplicative hash for `u32` keys: one multiplication, no allocation (SipHash would cost
/// more than the rest of the scan).
#[derive(Clone, Copy, Debug, Default)]
pub struct MulHasher(u64);

const MUL: u64 = 0x9e37_79b9_7f4a_7c15;

impl Hasher for MulHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(MUL);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(MUL);
    }
}

/// /16 prefixes in a bitmap: 65,536 bits.
const PREFIX_WORDS: usize = (1 << 16) / 64;

/// IPv4 addresses still to be seen, with a bitmap of their /16 prefixes in front of the hash
/// set: the load lives in a few /16s, so nearly every window of a message is rejected by one bit.
#[derive(Debug)]
pub struct AddressSet {
    set: HashSet<u32, BuildHasherDefault<MulHasher>>,
    /// Bit `ip >> 16` is set for every address ever inserted (never cleared: a hint only).
    prefixes: Box<[u64; PREFIX_WORDS]>,
}

impl AddressSet {
    pub fn new(addresses: impl IntoIterator<Item = u32>) -> Self {
        let mut s = Self { set: HashSet::default(), prefixes: Box::new([0; PREFIX_WORDS]) };
        for ip in addresses {
            let p = (ip >> 16) as usize;
            s.prefixes[p / 64] |= 1 << (p % 64);
            s.set.insert(ip);
        }
        s
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Removes every address held as 4 big-endian bytes at an offset of `bytes` that is a multiple
    /// of 4; how many were removed.
    pub fn remove_aligned(&mut self, bytes: &[u8]) -> usize {
        let before = self.set.len();
        if before == 0 {
            return 0;
        }
        for chunk in bytes.chunks_exact(4) {
            let ip = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let p = (ip >> 16) as usize;
            if self.prefixes[p / 64] & (1 << (p % 64)) != 0 {
                self.set.remove(&ip);
            }
        }
        before - self.set.len()
    }

    /// Removes what the new rules, sets and set elements of one datagram hold (payloads after
    /// the `nfgenmsg`, which starts 4-byte aligned like every message); how many were removed.
    pub fn remove_announced(&mut self, datagram: &[u8]) -> usize {
        let mut removed = 0;
        for (msg_type, payload) in messages(datagram) {
            if announces_addresses(msg_type) && payload.len() > NFGENMSG_LEN {
                removed += self.remove_aligned(&payload[NFGENMSG_LEN..]);
            }
        }
        removed
    }
}

/// The cold start as the listener sees it: which of the load's addresses the kernel has not
/// announced yet, and when the last one arrived.
#[derive(Debug)]
pub struct ColdStart {
    missing: AddressSet,
    /// Arrival of the datagram after which no address was missing.
    pub complete_at: Option<Instant>,
    /// CPU seconds of the proxy's process tree at that moment (see [`ColdStart::set_pid`]).
    pub cpu_at_complete: Option<f64>,
    /// ENOBUFS or truncated datagrams before the cold start was complete: events may be lost.
    pub overruns: usize,
    /// Every datagram still to come arrives after this instant (the latest datagram handled, or the
    /// start of a `recv` that found nothing queued).
    pub caught_up: Option<Instant>,
    /// Why the listener stopped, if it did.
    pub failed: Option<String>,
    pid: Option<u32>,
}

impl ColdStart {
    pub fn new(expected: &HashSet<u32>) -> Self {
        Self {
            missing: AddressSet::new(expected.iter().copied()),
            complete_at: None,
            cpu_at_complete: None,
            overruns: 0,
            caught_up: None,
            failed: None,
            pid: None,
        }
    }

    /// The proxy's pid, once spawned: its process tree's CPU time is read when the last address
    /// arrives.
    pub fn set_pid(&mut self, pid: u32) {
        self.pid = Some(pid);
    }

    /// Addresses not announced yet.
    pub fn missing(&self) -> usize {
        self.missing.len()
    }

    /// Whether netlink can still tell when the cold start ends: no event lost before it ended and
    /// the listener alive until then.
    pub fn usable(&self) -> bool {
        self.overruns == 0 && (self.complete_at.is_some() || self.failed.is_none())
    }

    /// Handles one event of the listener.
    pub fn event(&mut self, event: Event<'_>) {
        match event {
            Event::Datagram(bytes, at) => {
                if self.complete_at.is_none() {
                    self.missing.remove_announced(bytes);
                    if self.missing.is_empty() {
                        self.complete_at = Some(at);
                        self.cpu_at_complete = self.pid.map(crate::proxy::tree_cpu_seconds);
                    }
                }
                self.caught_up = Some(at);
            }
            Event::Idle(since) => self.caught_up = Some(since),
            Event::Overrun => {
                if self.complete_at.is_none() {
                    self.overruns += 1;
                }
            }
            Event::Failed(why) => self.failed = Some(why),
        }
    }
}

/// How a change was seen in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A netlink event: the time the datagram arrived.
    Event,
    /// A kernel dump (`--detect poll`, or after an overrun or the grace period): its end.
    Dump,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Event => "netlink",
            Source::Dump => "dump",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Change {
    sent: Instant,
    /// Events can no longer tell (an overrun since it was sent, or the grace period is over, or
    /// `--detect poll`): only a dump resolves it.
    by_dump: bool,
}

/// The changes written to the API server and not seen in the kernel yet, and those seen.
#[derive(Debug, Default)]
pub struct Tracker {
    pending: HashMap<u32, Change>,
    /// (latency in ms, how it was seen), in the order seen.
    pub done: Vec<(f64, Source)>,
    /// ENOBUFS (and truncated datagrams) seen by the listener.
    pub overruns: usize,
    /// Why the listener stopped, if it did on its own (the latency phase fails then).
    pub failed: Option<String>,
}

impl Tracker {
    /// Registers a change just before its API write. `by_dump`: only dumps will resolve it.
    pub fn register(&mut self, ip: u32, by_dump: bool) {
        self.pending.insert(ip, Change { sent: Instant::now(), by_dump });
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Pending changes that events can still resolve.
    pub fn awaiting_events(&self) -> usize {
        self.pending.values().filter(|c| !c.by_dump).count()
    }

    /// Whether some pending change waits for a dump.
    pub fn wants_dump(&self) -> bool {
        self.pending.values().any(|c| c.by_dump)
    }

    /// `ip` was announced by a datagram that arrived `at`; only messages after the change was
    /// registered count.
    fn event(&mut self, ip: u32, at: Instant) {
        if let Some(change) = self.pending.get(&ip)
            && !change.by_dump
            && at >= change.sent
        {
            self.done.push((ms(at - change.sent), Source::Event));
            self.pending.remove(&ip);
        }
    }

    /// Events may have been lost: every change pending now is left to dumps.
    fn overrun(&mut self) {
        self.overruns += 1;
        self.all_to_dump();
    }

    /// Every change pending now is left to dumps.
    pub fn all_to_dump(&mut self) {
        for change in self.pending.values_mut() {
            change.by_dump = true;
        }
    }

    /// `ip` is in a dump that ended at `end`.
    pub fn dumped(&mut self, ip: u32, end: Instant) {
        if let Some(change) = self.pending.get(&ip)
            && change.by_dump
        {
            self.done.push((ms(end.saturating_duration_since(change.sent)), Source::Dump));
            self.pending.remove(&ip);
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the listener thread hands over, in the order it happened.
#[derive(Debug)]
pub enum Event<'a> {
    /// A datagram (or what fit of it) that arrived at the given instant.
    Datagram(&'a [u8], Instant),
    /// The kernel dropped events (`ENOBUFS`), or a datagram was cut short: something was lost.
    Overrun,
    /// A `recv` that started at this instant found nothing queued: every datagram to come arrives
    /// later.
    Idle(Instant),
    /// The listener stopped on this error.
    Failed(String),
}

/// A thread in the proxy's namespace handing its nftables events to a handler.
pub struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Subscribes in namespace `netns` and returns once subscribed, so that every commit after
    /// this call is announced to `handler`, which runs on the listener's thread.
    pub fn start(netns: &str, mut handler: impl FnMut(Event<'_>) + Send + 'static) -> Result<Self> {
        let path = Path::new("/run/netns").join(netns);
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, subscribed) = mpsc::channel();
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("nft-events".into())
            .spawn(move || {
                // The highest priority: a datagram is stamped when it is read, and a proxy that
                // commits 40 MB of rules in 2 s on two cores, next to the benchmark's own dumps,
                // otherwise gets its cold start stamped seconds late. On Linux this sets the
                // calling thread's nice value only.
                if let Err(e) = rustix::process::setpriority_process(None, -20) {
                    eprintln!("bench: cannot raise the netlink listener's priority: {e}");
                }
                let fd = match subscribe(&path) {
                    Ok(fd) => {
                        let _ = ready.send(Ok(()));
                        fd
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                if let Err(e) = listen(&fd, &mut handler, &flag) {
                    handler(Event::Failed(format!("{e:#}")));
                }
            })
            .context("spawning the netlink listener")?;
        subscribed.recv().map_err(|_| anyhow!("the netlink listener died"))??;
        Ok(Self { stop, thread: Some(thread) })
    }

    /// A listener resolving the changes of a [`Tracker`] whose addresses `keep` accepts.
    pub fn for_changes(netns: &str, tracker: Arc<Mutex<Tracker>>, keep: fn(u32) -> bool) -> Result<Self> {
        Self::start(netns, move |event| match event {
            Event::Datagram(bytes, at) => {
                // Scanned before taking the lock, which the sender and the main loop share.
                let found = addresses_in(bytes, keep);
                if !found.is_empty() {
                    let mut t = lock(&tracker);
                    for ip in found {
                        t.event(ip, at);
                    }
                }
            }
            Event::Overrun => lock(&tracker).overrun(),
            Event::Idle(_) => {}
            Event::Failed(why) => lock(&tracker).failed = Some(why),
        })
    }

    /// A listener feeding a [`ColdStart`].
    pub fn for_cold_start(netns: &str, cold: Arc<Mutex<ColdStart>>) -> Result<Self> {
        Self::start(netns, move |event| lock(&cold).event(event))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Moves this thread into the namespace at `path` and opens a socket there on NFNLGRP_NFTABLES.
fn subscribe(path: &Path) -> Result<OwnedFd> {
    let ns = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    rustix::thread::move_into_link_name_space(ns.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
        .with_context(|| format!("setns {}", path.display()))?;
    let fd = rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, Some(NETFILTER))
        .context("netlink socket")?;
    rustix::net::sockopt::set_socket_recv_buffer_size_force(&fd, SOCKET_BUFFER).context("SO_RCVBUFFORCE")?;
    rustix::net::sockopt::set_socket_timeout(&fd, rustix::net::sockopt::Timeout::Recv, Some(RECV_TIMEOUT))
        .context("SO_RCVTIMEO")?;
    // Groups 1..=32 can be joined at bind time (bit N-1 of the mask), the same membership as
    // setsockopt(NETLINK_ADD_MEMBERSHIP), which rustix has no safe call for.
    rustix::net::bind(&fd, &SocketAddrNetlink::new(0, 1 << (NFNLGRP_NFTABLES - 1)))
        .context("joining NFNLGRP_NFTABLES")?;
    Ok(fd)
}

fn listen(fd: &OwnedFd, handler: &mut impl FnMut(Event<'_>), stop: &AtomicBool) -> Result<()> {
    let mut buf = vec![0u8; RECV_BUFFER];
    while !stop.load(Ordering::Relaxed) {
        let before = Instant::now();
        match rustix::net::recv(fd, &mut buf[..], RecvFlags::TRUNC) {
            Ok((len, full)) => {
                let at = Instant::now();
                if full > len {
                    // Cut short: whatever the rest held is lost, as in an overrun.
                    handler(Event::Overrun);
                }
                handler(Event::Datagram(&buf[..len], at));
            }
            Err(Errno::NOBUFS) => handler(Event::Overrun),
            Err(Errno::AGAIN) => handler(Event::Idle(before)),
            Err(Errno::INTR) => {}
            Err(e) => return Err(e).context("receiving nftables events"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::is_change_ip as change_ip;

    /// One netlink message: header (host order), nfgenmsg, then `body`, padded to 4 bytes.
    fn message(msg_type: u16, body: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + NFGENMSG_LEN + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&msg_type.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes()); // flags
        m.extend_from_slice(&7u32.to_ne_bytes()); // seq
        m.extend_from_slice(&0u32.to_ne_bytes()); // pid
        m.extend_from_slice(&[2, 0, 0, 0]); // nfgenmsg: AF_INET, version 0
        m.extend_from_slice(body);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    const NEWRULE: u16 = 10 << 8 | 6;
    const NEWSET: u16 = 10 << 8 | 9;
    const NEWSETELEM: u16 = 10 << 8 | 12;
    const DELSETELEM: u16 = 10 << 8 | 14;
    const NEWGEN: u16 = 10 << 8 | 15;

    #[test]
    fn splits_a_datagram_into_padded_messages() {
        let mut datagram = message(NEWRULE, &[1, 2, 3]); // 23 bytes, padded to 24
        datagram.extend(message(NEWGEN, &[]));
        datagram.extend(message(NEWSETELEM, &[9; 8]));
        let got: Vec<(u16, usize)> = messages(&datagram).map(|(t, p)| (t, p.len())).collect();
        assert_eq!(got, [(NEWRULE, 4 + 3), (NEWGEN, 4), (NEWSETELEM, 4 + 8)]);
    }

    #[test]
    fn stops_at_a_malformed_length() {
        let mut datagram = message(NEWRULE, &[0; 4]);
        let mut bad = message(NEWRULE, &[0; 4]);
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        datagram.extend(bad);
        assert_eq!(messages(&datagram).count(), 1);
        assert_eq!(messages(&[0; 10]).count(), 0);
        let mut short = message(NEWRULE, &[]);
        short[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(messages(&short).count(), 0);
    }

    #[test]
    fn only_new_rules_sets_and_elements_count() {
        assert!(announces_addresses(NEWRULE));
        assert!(announces_addresses(NEWSET));
        assert!(announces_addresses(NEWSETELEM));
        assert!(!announces_addresses(DELSETELEM));
        assert!(!announces_addresses(NEWGEN));
        // NFT_MSG_NEWRULE's number in another subsystem (ctnetlink is 1).
        assert!(!announces_addresses(1 << 8 | 6));
    }

    #[test]
    fn finds_addresses_in_new_objects_only() {
        let new_ip = [10, 64, 0, 7];
        let old_ip = [10, 64, 0, 9];
        // An attribute at an odd offset, as in a concatenation or a compat target's struct.
        let mut rule = vec![0xaa, 0xbb, 0xcc];
        rule.extend_from_slice(&new_ip);
        rule.extend_from_slice(&[10, 128, 0, 1]); // the load's range: not a change
        let mut datagram = message(NEWGEN, &new_ip); // a generation carries no rule
        datagram.extend(message(DELSETELEM, &old_ip)); // a deletion names the old address
        datagram.extend(message(NEWRULE, &rule));
        datagram.extend(message(NEWSETELEM, &[0, 0, 0, 1, 10, 64, 1, 2, 0x1f, 0x90]));
        let got: Vec<String> = addresses_in(&datagram, change_ip)
            .into_iter()
            .map(|ip| std::net::Ipv4Addr::from(ip).to_string())
            .collect();
        assert_eq!(got, ["10.64.0.7", "10.64.1.2"]);
        // The nfgenmsg header itself is not searched.
        let mut header_only = message(NEWRULE, &[]);
        header_only[16..20].copy_from_slice(&new_ip);
        assert!(addresses_in(&header_only, change_ip).is_empty());
    }

    fn ip(a: [u8; 4]) -> u32 {
        u32::from_be_bytes(a)
    }

    #[test]
    fn the_aligned_scan_finds_addresses_at_multiples_of_four_only() {
        let (a, b, c) = (ip([10, 96, 0, 10]), ip([10, 128, 0, 1]), ip([10, 128, 0, 2]));
        let mut set = AddressSet::new([a, b, c]);
        assert_eq!(set.len(), 3);
        // `b` at offset 2: not aligned.
        let mut unaligned = vec![0, 0];
        unaligned.extend_from_slice(&b.to_be_bytes());
        unaligned.extend_from_slice(&[0, 0]);
        assert_eq!(set.remove_aligned(&unaligned), 0);
        // `a` at offset 4; `c` cut short by the end of the bytes.
        let mut bytes = vec![0xff; 4];
        bytes.extend_from_slice(&a.to_be_bytes());
        bytes.extend_from_slice(&c.to_be_bytes()[..3]);
        assert_eq!(set.remove_aligned(&bytes), 1);
        assert_eq!(set.len(), 2);
        // Seen twice: removed once.
        assert_eq!(set.remove_aligned(&a.to_be_bytes()), 0);
        let mut both = b.to_be_bytes().to_vec();
        both.extend_from_slice(&c.to_be_bytes());
        assert_eq!(set.remove_aligned(&both), 2);
        assert!(set.is_empty());
        assert_eq!(set.remove_aligned(&both), 0);
    }

    #[test]
    fn the_prefix_filter_never_hides_an_address() {
        // Addresses spread over many /16s, and neighbours in other /16s that must stay.
        let addrs: Vec<u32> = (0..5000u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        let mut set = AddressSet::new(addrs.iter().copied());
        let noise: Vec<u8> = addrs.iter().flat_map(|a| (a ^ 0x0001_0000).to_be_bytes()).collect();
        let hits = set.remove_aligned(&noise);
        let expected_hits = addrs.iter().filter(|a| addrs.contains(&(*a ^ 0x0001_0000))).count();
        assert_eq!(hits, expected_hits);
        let all: Vec<u8> = addrs.iter().flat_map(|a| a.to_be_bytes()).collect();
        set.remove_aligned(&all);
        assert!(set.is_empty());
    }

    #[test]
    fn announced_addresses_are_aligned_to_the_payload_after_nfgenmsg() {
        let (a, b) = (ip([10, 96, 3, 4]), ip([10, 128, 0, 9]));
        let mut set = AddressSet::new([a, b]);
        // A rule with a 3-byte message body before the address would put it at an unaligned
        // offset: not counted. After a 4-byte attribute header it is.
        let mut unaligned = vec![0xaa, 0xbb, 0xcc];
        unaligned.extend_from_slice(&a.to_be_bytes());
        let mut aligned = vec![0x08, 0x00, 0x01, 0x00];
        aligned.extend_from_slice(&b.to_be_bytes());
        let mut datagram = message(NEWRULE, &unaligned);
        datagram.extend(message(DELSETELEM, &a.to_be_bytes())); // a deletion does not count
        datagram.extend(message(NEWSETELEM, &aligned));
        assert_eq!(set.remove_announced(&datagram), 1);
        assert_eq!(set.len(), 1);
        // The header is not searched either.
        let mut header = message(NEWRULE, &[]);
        header[16..20].copy_from_slice(&a.to_be_bytes());
        assert_eq!(set.remove_announced(&header), 0);
        assert_eq!(set.remove_announced(&message(NEWSET, &a.to_be_bytes())), 1);
        assert!(set.is_empty());
    }

    #[test]
    fn a_cold_start_ends_with_the_datagram_that_brings_the_last_address() {
        let (a, b) = (ip([10, 96, 0, 1]), ip([10, 128, 0, 1]));
        let mut cold = ColdStart::new(&[a, b].into_iter().collect());
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(5);
        let t2 = t0 + Duration::from_millis(9);
        cold.event(Event::Idle(t0));
        assert_eq!(cold.caught_up, Some(t0));
        cold.event(Event::Datagram(&message(NEWRULE, &a.to_be_bytes()), t1));
        assert_eq!((cold.missing(), cold.complete_at, cold.caught_up), (1, None, Some(t1)));
        let mut last = message(NEWGEN, &b.to_be_bytes());
        last.extend(message(NEWSETELEM, &b.to_be_bytes()));
        cold.event(Event::Datagram(&last, t2));
        assert_eq!((cold.missing(), cold.complete_at), (0, Some(t2)));
        assert!(cold.usable());
        // Later events do not move the end; an overrun after it does not matter.
        cold.event(Event::Overrun);
        cold.event(Event::Datagram(&last, t2 + Duration::from_millis(1)));
        assert_eq!((cold.complete_at, cold.overruns), (Some(t2), 0));
        assert!(cold.usable());
    }

    #[test]
    fn a_cold_start_with_lost_events_is_not_netlinks_to_tell() {
        let a = ip([10, 96, 0, 1]);
        let mut cold = ColdStart::new(&[a].into_iter().collect());
        cold.event(Event::Overrun);
        cold.event(Event::Datagram(&message(NEWRULE, &a.to_be_bytes()), Instant::now()));
        assert!(cold.complete_at.is_some());
        assert!(!cold.usable());
        assert_eq!(cold.overruns, 1);
        let mut failed = ColdStart::new(&[a].into_iter().collect());
        failed.event(Event::Failed("gone".into()));
        assert!(!failed.usable());
    }

    #[test]
    fn events_resolve_changes_registered_before_them() {
        let mut t = Tracker::default();
        let ip = u32::from_be_bytes([10, 64, 0, 7]);
        let before = Instant::now();
        t.register(ip, false);
        t.event(ip, before); // arrived before the change was registered: not this change
        assert_eq!(t.pending(), 1);
        t.event(ip, Instant::now());
        assert_eq!(t.pending(), 0);
        assert_eq!(t.done.len(), 1);
        assert_eq!(t.done[0].1, Source::Event);
        t.event(ip, Instant::now()); // seen once only
        assert_eq!(t.done.len(), 1);
    }

    #[test]
    fn an_overrun_leaves_pending_changes_to_dumps() {
        let mut t = Tracker::default();
        let (a, b, c) = (1, 2, 3);
        t.register(a, false);
        t.register(b, false);
        assert!(!t.wants_dump());
        t.overrun();
        t.register(c, false); // after the overrun: events still tell
        assert!(t.wants_dump());
        assert_eq!(t.awaiting_events(), 1);
        let now = Instant::now();
        t.event(a, now);
        t.event(c, now);
        assert_eq!(t.pending(), 2, "a waits for a dump, c was seen");
        t.dumped(a, now);
        t.dumped(b, now);
        assert_eq!(t.pending(), 0);
        let sources: Vec<Source> = t.done.iter().map(|d| d.1).collect();
        assert_eq!(sources, [Source::Event, Source::Dump, Source::Dump]);
        assert_eq!(t.overruns, 1);
    }

    #[test]
    fn dumps_resolve_only_changes_left_to_them() {
        let mut t = Tracker::default();
        t.register(1, false);
        t.register(2, true);
        let now = Instant::now();
        t.dumped(1, now);
        t.dumped(2, now);
        assert_eq!(t.pending(), 1);
        t.all_to_dump();
        t.dumped(1, now);
        assert_eq!(t.pending(), 0);
    }
}
