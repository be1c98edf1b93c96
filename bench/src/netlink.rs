//! Network-programming latency from the kernel's own nftables events: a netlink socket in the
//! proxy's namespace, subscribed to `NFNLGRP_NFTABLES`, timestamps every datagram as it arrives and
//! looks for the pending changes' addresses in the rules and set elements the kernel announces.
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

use std::{
    collections::HashMap,
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

fn lock(tracker: &Mutex<Tracker>) -> std::sync::MutexGuard<'_, Tracker> {
    tracker.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A thread in the proxy's namespace reading its nftables events into a [`Tracker`].
pub struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Subscribes in namespace `netns` and returns once subscribed, so that every change
    /// registered afterwards is announced to us. `keep` picks the changes' addresses.
    pub fn start(netns: &str, tracker: Arc<Mutex<Tracker>>, keep: fn(u32) -> bool) -> Result<Self> {
        let path = Path::new("/run/netns").join(netns);
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, subscribed) = mpsc::channel();
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("nft-events".into())
            .spawn(move || {
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
                if let Err(e) = listen(&fd, &tracker, keep, &flag) {
                    lock(&tracker).failed = Some(format!("{e:#}"));
                }
            })
            .context("spawning the netlink listener")?;
        subscribed.recv().map_err(|_| anyhow!("the netlink listener died"))??;
        Ok(Self { stop, thread: Some(thread) })
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

fn listen(fd: &OwnedFd, tracker: &Mutex<Tracker>, keep: fn(u32) -> bool, stop: &AtomicBool) -> Result<()> {
    let mut buf = vec![0u8; RECV_BUFFER];
    while !stop.load(Ordering::Relaxed) {
        match rustix::net::recv(fd, &mut buf[..], RecvFlags::TRUNC) {
            Ok((len, full)) => {
                let at = Instant::now();
                if full > len {
                    // Cut short: whatever the rest held is lost, as in an overrun.
                    lock(tracker).overrun();
                }
                let found = addresses_in(&buf[..len], keep);
                if !found.is_empty() {
                    let mut t = lock(tracker);
                    for ip in found {
                        t.event(ip, at);
                    }
                }
            }
            Err(Errno::NOBUFS) => lock(tracker).overrun(),
            Err(Errno::AGAIN | Errno::INTR) => {}
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
