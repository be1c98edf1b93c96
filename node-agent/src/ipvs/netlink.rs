//! The kernel's IPVS generic-netlink family, encoded and decoded by hand. Pure: bytes in, bytes out.
//!
//! The family is small and fixed (nine commands, two nested attribute sets), so hand encoding is
//! shorter and easier to check than a generic netlink crate: every constant below is taken from
//! `include/uapi/linux/ip_vs.h`, `include/uapi/linux/netlink.h` and `include/uapi/linux/genetlink.h`,
//! and the unit tests compare whole messages with byte layouts computed by hand from those headers.
//!
//! Layout of one request:
//! ```text
//! nlmsghdr   { len: u32, type: u16 (family id), flags: u16, seq: u32, pid: u32 }   16 bytes
//! genlmsghdr { cmd: u8, version: u8 (IPVS_GENL_VERSION = 1), reserved: u16 }       4 bytes
//! nlattr     { len: u16, type: u16 } + payload, padded to 4 bytes; nested sets carry NLA_F_NESTED
//! ```
//! Integers are in host byte order except the ports (`__be16`) and IPv4 netmasks (`__be32`), which
//! the kernel keeps in network byte order.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

// --- netlink.h ---
pub const NLMSG_HDRLEN: usize = 16;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLMSG_ERROR: u16 = 0x2;
pub const NLMSG_DONE: u16 = 0x3;
pub const NLA_F_NESTED: u16 = 0x8000;
pub const NLA_TYPE_MASK: u16 = 0x3fff;

// --- genetlink.h ---
pub const GENL_HDRLEN: usize = 4;
pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;

// --- ip_vs.h ---
pub const IPVS_GENL_NAME: &str = "IPVS";
pub const IPVS_GENL_VERSION: u8 = 0x1;

pub const IPVS_CMD_NEW_SERVICE: u8 = 1;
pub const IPVS_CMD_SET_SERVICE: u8 = 2;
pub const IPVS_CMD_DEL_SERVICE: u8 = 3;
pub const IPVS_CMD_GET_SERVICE: u8 = 4;
pub const IPVS_CMD_NEW_DEST: u8 = 5;
pub const IPVS_CMD_SET_DEST: u8 = 6;
pub const IPVS_CMD_DEL_DEST: u8 = 7;
pub const IPVS_CMD_GET_DEST: u8 = 8;
pub const IPVS_CMD_FLUSH: u8 = 17;

pub const IPVS_CMD_ATTR_SERVICE: u16 = 1;
pub const IPVS_CMD_ATTR_DEST: u16 = 2;

pub const IPVS_SVC_ATTR_AF: u16 = 1;
pub const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
pub const IPVS_SVC_ATTR_ADDR: u16 = 3;
pub const IPVS_SVC_ATTR_PORT: u16 = 4;
pub const IPVS_SVC_ATTR_FWMARK: u16 = 5;
pub const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
pub const IPVS_SVC_ATTR_FLAGS: u16 = 7;
pub const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;
pub const IPVS_SVC_ATTR_NETMASK: u16 = 9;

pub const IPVS_DEST_ATTR_ADDR: u16 = 1;
pub const IPVS_DEST_ATTR_PORT: u16 = 2;
pub const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
pub const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
pub const IPVS_DEST_ATTR_U_THRESH: u16 = 5;
pub const IPVS_DEST_ATTR_L_THRESH: u16 = 6;
pub const IPVS_DEST_ATTR_ACTIVE_CONNS: u16 = 7;
pub const IPVS_DEST_ATTR_INACT_CONNS: u16 = 8;
pub const IPVS_DEST_ATTR_PERSIST_CONNS: u16 = 9;
pub const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;

/// `IP_VS_SVC_F_PERSISTENT`: sessionAffinity ClientIP.
pub const IP_VS_SVC_F_PERSISTENT: u32 = 0x0001;
/// `IP_VS_SVC_F_SCHED1`: for sh and mh, `sh-fallback` / `mh-fallback`: when the hashed real server is
/// unavailable (weight 0), pick another instead of refusing the connection.
pub const IP_VS_SVC_F_SCHED1: u32 = 0x0008;
/// `IP_VS_SVC_F_HASHED`: set by the kernel on every service it holds; not ours to compare.
pub const IP_VS_SVC_F_HASHED: u32 = 0x0002;
/// `IP_VS_CONN_F_MASQ`: NAT forwarding (the only method kube-proxy uses).
pub const IP_VS_CONN_F_MASQ: u32 = 0x0000;
/// `IP_VS_SCHEDNAME_MAXLEN`, including the terminating NUL.
pub const IP_VS_SCHEDNAME_MAXLEN: usize = 16;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;
pub const IPPROTO_UDP: u16 = 17;
pub const IPPROTO_SCTP: u16 = 132;

/// A virtual server as the kernel knows it (`IPVS_CMD_ATTR_SERVICE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// The identity: address family, protocol, address and port (or a firewall mark).
    pub id: ServiceId,
    /// Scheduler name (`rr`, `sh`, ...).
    pub scheduler: String,
    /// `IP_VS_SVC_F_*`; on read-back the kernel adds `IP_VS_SVC_F_HASHED`.
    pub flags: u32,
    /// Persistence timeout in seconds (meaningful with `IP_VS_SVC_F_PERSISTENT`).
    pub timeout: u32,
    /// Persistence netmask, as the kernel stores it: an IPv4 mask in network byte order, or an IPv6
    /// prefix length.
    pub netmask: u32,
}

/// What identifies a virtual server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceId {
    /// protocol (`IPPROTO_*`), address, port.
    Addr { protocol: u16, addr: IpAddr, port: u16 },
    /// A firewall-mark service (never ours; kept so that read-back sees it and leaves it alone).
    Fwmark { af: u16, fwmark: u32 },
}

impl ServiceId {
    pub fn af(&self) -> u16 {
        match self {
            Self::Addr { addr, .. } => af_of(addr),
            Self::Fwmark { af, .. } => *af,
        }
    }
}

/// A real server of a virtual server (`IPVS_CMD_ATTR_DEST`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Destination {
    pub addr: IpAddr,
    pub port: u16,
    /// `IP_VS_CONN_F_*` forwarding method.
    pub fwd_method: u32,
    pub weight: u32,
    pub upper_threshold: u32,
    pub lower_threshold: u32,
    /// Read back only (ignored when encoding).
    pub active_conns: u32,
    pub inactive_conns: u32,
    pub persist_conns: u32,
}

impl Destination {
    /// A NAT-forwarded real server with `weight`.
    pub fn masq(addr: IpAddr, port: u16, weight: u32) -> Self {
        Self {
            addr,
            port,
            fwd_method: IP_VS_CONN_F_MASQ,
            weight,
            upper_threshold: 0,
            lower_threshold: 0,
            active_conns: 0,
            inactive_conns: 0,
            persist_conns: 0,
        }
    }
}

/// One request to the IPVS family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    NewService(Service),
    SetService(Service),
    DelService(ServiceId),
    NewDest(ServiceId, Destination),
    SetDest(ServiceId, Destination),
    DelDest(ServiceId, IpAddr, u16),
    /// Dump of every virtual server.
    GetServices,
    /// Dump of the real servers of one virtual server.
    GetDests(ServiceId),
    /// Removes every virtual server (clean-up of a whole node; never used by the agent itself).
    Flush,
}

impl Request {
    fn command(&self) -> u8 {
        match self {
            Self::NewService(_) => IPVS_CMD_NEW_SERVICE,
            Self::SetService(_) => IPVS_CMD_SET_SERVICE,
            Self::DelService(_) => IPVS_CMD_DEL_SERVICE,
            Self::NewDest(..) => IPVS_CMD_NEW_DEST,
            Self::SetDest(..) => IPVS_CMD_SET_DEST,
            Self::DelDest(..) => IPVS_CMD_DEL_DEST,
            Self::GetServices => IPVS_CMD_GET_SERVICE,
            Self::GetDests(_) => IPVS_CMD_GET_DEST,
            Self::Flush => IPVS_CMD_FLUSH,
        }
    }

    /// Whether the kernel answers with a multi-part dump rather than an acknowledgement.
    pub fn is_dump(&self) -> bool {
        matches!(self, Self::GetServices | Self::GetDests(_))
    }
}

pub fn af_of(addr: &IpAddr) -> u16 {
    if addr.is_ipv4() { AF_INET } else { AF_INET6 }
}

/// The persistence netmask the kernel expects for a single client address of `af`.
pub fn host_netmask(af: u16) -> u32 {
    if af == AF_INET { u32::from_ne_bytes([0xff; 4]) } else { 128 }
}

/// A netlink message under construction; attributes are appended in place.
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn new(msg_type: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish()
        buf.extend_from_slice(&msg_type.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel fills in ours
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Self { buf }
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn u16(&mut self, kind: u16, value: u16) {
        self.attr(kind, &value.to_ne_bytes());
    }

    fn u32(&mut self, kind: u16, value: u32) {
        self.attr(kind, &value.to_ne_bytes());
    }

    fn be16(&mut self, kind: u16, value: u16) {
        self.attr(kind, &value.to_be_bytes());
    }

    fn addr(&mut self, kind: u16, addr: &IpAddr) {
        match addr {
            IpAddr::V4(v4) => self.attr(kind, &v4.octets()),
            IpAddr::V6(v6) => self.attr(kind, &v6.octets()),
        }
    }

    fn string(&mut self, kind: u16, value: &str) {
        let mut bytes = value.as_bytes().to_vec();
        bytes.push(0);
        self.attr(kind, &bytes);
    }

    /// Opens a nested attribute; returns where its header is, for [`Writer::end_nested`].
    fn start_nested(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn end_nested(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn write_service_id(w: &mut Writer, id: &ServiceId) {
    w.u16(IPVS_SVC_ATTR_AF, id.af());
    match id {
        ServiceId::Addr { protocol, addr, port } => {
            w.u16(IPVS_SVC_ATTR_PROTOCOL, *protocol);
            w.addr(IPVS_SVC_ATTR_ADDR, addr);
            w.be16(IPVS_SVC_ATTR_PORT, *port);
        }
        ServiceId::Fwmark { fwmark, .. } => w.u32(IPVS_SVC_ATTR_FWMARK, *fwmark),
    }
}

fn write_service(w: &mut Writer, service: &Service) {
    let at = w.start_nested(IPVS_CMD_ATTR_SERVICE);
    write_service_id(w, &service.id);
    w.string(IPVS_SVC_ATTR_SCHED_NAME, &service.scheduler);
    // struct ip_vs_flags { __u32 flags; __u32 mask; }: set every bit as given.
    let mut flags = service.flags.to_ne_bytes().to_vec();
    flags.extend_from_slice(&u32::MAX.to_ne_bytes());
    w.attr(IPVS_SVC_ATTR_FLAGS, &flags);
    w.u32(IPVS_SVC_ATTR_TIMEOUT, service.timeout);
    w.u32(IPVS_SVC_ATTR_NETMASK, service.netmask);
    w.end_nested(at);
}

fn write_service_key(w: &mut Writer, id: &ServiceId) {
    let at = w.start_nested(IPVS_CMD_ATTR_SERVICE);
    write_service_id(w, id);
    w.end_nested(at);
}

fn write_dest(w: &mut Writer, dest: &Destination, full: bool) {
    let at = w.start_nested(IPVS_CMD_ATTR_DEST);
    w.addr(IPVS_DEST_ATTR_ADDR, &dest.addr);
    w.be16(IPVS_DEST_ATTR_PORT, dest.port);
    if full {
        w.u32(IPVS_DEST_ATTR_FWD_METHOD, dest.fwd_method);
        w.u32(IPVS_DEST_ATTR_WEIGHT, dest.weight);
        w.u32(IPVS_DEST_ATTR_U_THRESH, dest.upper_threshold);
        w.u32(IPVS_DEST_ATTR_L_THRESH, dest.lower_threshold);
    }
    w.u16(IPVS_DEST_ATTR_ADDR_FAMILY, af_of(&dest.addr));
    w.end_nested(at);
}

/// Encodes `request` for the IPVS family whose id the kernel gave us (see
/// [`encode_get_family`]). Changes ask for an acknowledgement (`NLM_F_ACK`); gets are dumps.
pub fn encode(request: &Request, family: u16, seq: u32) -> Vec<u8> {
    let flags = if request.is_dump() { NLM_F_REQUEST | NLM_F_DUMP } else { NLM_F_REQUEST | NLM_F_ACK };
    let mut w = Writer::new(family, flags, seq, request.command(), IPVS_GENL_VERSION);
    match request {
        Request::NewService(service) | Request::SetService(service) => write_service(&mut w, service),
        Request::DelService(id) | Request::GetDests(id) => write_service_key(&mut w, id),
        Request::NewDest(id, dest) | Request::SetDest(id, dest) => {
            write_service_key(&mut w, id);
            write_dest(&mut w, dest, true);
        }
        Request::DelDest(id, addr, port) => {
            write_service_key(&mut w, id);
            write_dest(&mut w, &Destination::masq(*addr, *port, 0), false);
        }
        Request::GetServices | Request::Flush => {}
    }
    w.finish()
}

/// `CTRL_CMD_GETFAMILY` for "IPVS": the kernel answers with the family's id.
pub fn encode_get_family(seq: u32) -> Vec<u8> {
    let mut w = Writer::new(GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, seq, CTRL_CMD_GETFAMILY, 1);
    w.string(CTRL_ATTR_FAMILY_NAME, IPVS_GENL_NAME);
    w.finish()
}

/// Something the kernel sent back that we could not make sense of.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed netlink message: {0}")]
pub struct DecodeError(pub String);

fn malformed(what: impl Into<String>) -> DecodeError {
    DecodeError(what.into())
}

/// One message of a kernel answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// A generic-netlink message: its command and its attributes (the bytes after genlmsghdr).
    Data { msg_type: u16, flags: u16, seq: u32, cmd: u8, attrs: Vec<u8> },
    /// `NLMSG_ERROR`: `errno` is 0 for an acknowledgement, else a negative errno.
    Error { seq: u32, errno: i32 },
    /// `NLMSG_DONE`: the end of a dump.
    Done { seq: u32 },
}

fn read_u16(bytes: &[u8], at: usize) -> Result<u16, DecodeError> {
    bytes.get(at..at + 2).map(|b| u16::from_ne_bytes([b[0], b[1]])).ok_or_else(|| malformed("truncated u16"))
}

fn read_u32(bytes: &[u8], at: usize) -> Result<u32, DecodeError> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| malformed("truncated u32"))
}

/// Splits one `recv` buffer into its messages.
pub fn parse_messages(mut buf: &[u8]) -> Result<Vec<Message>, DecodeError> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = read_u32(buf, 0)? as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(malformed(format!("message length {len} of {} bytes", buf.len())));
        }
        let msg_type = read_u16(buf, 4)?;
        let flags = read_u16(buf, 6)?;
        let seq = read_u32(buf, 8)?;
        let payload = &buf[NLMSG_HDRLEN..len];
        out.push(match msg_type {
            NLMSG_ERROR => Message::Error { seq, errno: read_u32(payload, 0)? as i32 },
            NLMSG_DONE => Message::Done { seq },
            _ => {
                if payload.len() < GENL_HDRLEN {
                    return Err(malformed("generic netlink header missing"));
                }
                Message::Data {
                    msg_type,
                    flags,
                    seq,
                    cmd: payload[0],
                    attrs: payload[GENL_HDRLEN..].to_vec(),
                }
            }
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The attributes of one attribute set: (type without flags, payload).
pub fn attributes(mut bytes: &[u8]) -> Result<Vec<(u16, &[u8])>, DecodeError> {
    let mut out = Vec::new();
    while bytes.len() >= 4 {
        let len = read_u16(bytes, 0)? as usize;
        let kind = read_u16(bytes, 2)? & NLA_TYPE_MASK;
        if len < 4 || len > bytes.len() {
            return Err(malformed(format!("attribute {kind} of length {len} in {} bytes", bytes.len())));
        }
        out.push((kind, &bytes[4..len]));
        bytes = &bytes[align4(len).min(bytes.len())..];
    }
    Ok(out)
}

/// The payload of the first attribute of `kind` in `attrs`.
pub fn find<'a>(attrs: &[(u16, &'a [u8])], kind: u16) -> Option<&'a [u8]> {
    attrs.iter().find(|(k, _)| *k == kind).map(|(_, payload)| *payload)
}

fn get_u16(attrs: &[(u16, &[u8])], kind: u16) -> Result<u16, DecodeError> {
    find(attrs, kind)
        .ok_or_else(|| malformed(format!("attribute {kind} missing")))
        .and_then(|p| read_u16(p, 0))
}

fn get_u32(attrs: &[(u16, &[u8])], kind: u16) -> Result<u32, DecodeError> {
    find(attrs, kind)
        .ok_or_else(|| malformed(format!("attribute {kind} missing")))
        .and_then(|p| read_u32(p, 0))
}

fn get_be16(attrs: &[(u16, &[u8])], kind: u16) -> Result<u16, DecodeError> {
    get_u16(attrs, kind).map(u16::from_be)
}

fn get_addr(attrs: &[(u16, &[u8])], kind: u16, af: u16) -> Result<IpAddr, DecodeError> {
    let payload = find(attrs, kind).ok_or_else(|| malformed(format!("address attribute {kind} missing")))?;
    match af {
        AF_INET => payload
            .get(..4)
            .map(|b| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
            .ok_or_else(|| malformed("short IPv4 address")),
        AF_INET6 => payload
            .get(..16)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .map(|b| IpAddr::V6(Ipv6Addr::from(b)))
            .ok_or_else(|| malformed("short IPv6 address")),
        other => Err(malformed(format!("address family {other}"))),
    }
}

/// The family id in the answer to [`encode_get_family`] (the attributes of its Data message).
pub fn decode_family_id(attrs: &[u8]) -> Result<u16, DecodeError> {
    get_u16(&attributes(attrs)?, CTRL_ATTR_FAMILY_ID)
}

/// A virtual server from one message of a `GET_SERVICE` dump (its attributes).
pub fn decode_service(attrs: &[u8]) -> Result<Service, DecodeError> {
    let top = attributes(attrs)?;
    let nested =
        find(&top, IPVS_CMD_ATTR_SERVICE).ok_or_else(|| malformed("IPVS_CMD_ATTR_SERVICE missing"))?;
    let a = attributes(nested)?;
    let af = get_u16(&a, IPVS_SVC_ATTR_AF)?;
    let fwmark = find(&a, IPVS_SVC_ATTR_FWMARK).map(|p| read_u32(p, 0)).transpose()?.unwrap_or(0);
    let id = if fwmark != 0 {
        ServiceId::Fwmark { af, fwmark }
    } else {
        ServiceId::Addr {
            protocol: get_u16(&a, IPVS_SVC_ATTR_PROTOCOL)?,
            addr: get_addr(&a, IPVS_SVC_ATTR_ADDR, af)?,
            port: get_be16(&a, IPVS_SVC_ATTR_PORT)?,
        }
    };
    let scheduler = find(&a, IPVS_SVC_ATTR_SCHED_NAME)
        .map(|p| String::from_utf8_lossy(p.split(|b| *b == 0).next().unwrap_or_default()).into_owned())
        .unwrap_or_default();
    let flags = get_u32(&a, IPVS_SVC_ATTR_FLAGS)?;
    Ok(Service {
        id,
        scheduler,
        flags,
        timeout: get_u32(&a, IPVS_SVC_ATTR_TIMEOUT)?,
        netmask: get_u32(&a, IPVS_SVC_ATTR_NETMASK)?,
    })
}

/// A real server from one message of a `GET_DEST` dump (its attributes). `service_af` is the
/// family of the virtual server, used when the kernel predates `IPVS_DEST_ATTR_ADDR_FAMILY`.
pub fn decode_dest(attrs: &[u8], service_af: u16) -> Result<Destination, DecodeError> {
    let top = attributes(attrs)?;
    let nested = find(&top, IPVS_CMD_ATTR_DEST).ok_or_else(|| malformed("IPVS_CMD_ATTR_DEST missing"))?;
    let a = attributes(nested)?;
    let af = find(&a, IPVS_DEST_ATTR_ADDR_FAMILY).map(|p| read_u16(p, 0)).transpose()?.unwrap_or(service_af);
    let optional = |kind| find(&a, kind).map(|p| read_u32(p, 0)).transpose().map(Option::unwrap_or_default);
    Ok(Destination {
        addr: get_addr(&a, IPVS_DEST_ATTR_ADDR, af)?,
        port: get_be16(&a, IPVS_DEST_ATTR_PORT)?,
        fwd_method: get_u32(&a, IPVS_DEST_ATTR_FWD_METHOD)?,
        weight: get_u32(&a, IPVS_DEST_ATTR_WEIGHT)?,
        upper_threshold: optional(IPVS_DEST_ATTR_U_THRESH)?,
        lower_threshold: optional(IPVS_DEST_ATTR_L_THRESH)?,
        active_conns: optional(IPVS_DEST_ATTR_ACTIVE_CONNS)?,
        inactive_conns: optional(IPVS_DEST_ATTR_INACT_CONNS)?,
        persist_conns: optional(IPVS_DEST_ATTR_PERSIST_CONNS)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    /// Little-endian helpers: the tests spell out the bytes an x86_64 kernel expects.
    fn le16(v: u16) -> [u8; 2] {
        v.to_le_bytes()
    }
    fn le32(v: u32) -> [u8; 4] {
        v.to_le_bytes()
    }

    fn cluster_service() -> Service {
        Service {
            id: ServiceId::Addr { protocol: IPPROTO_TCP, addr: v4(10, 96, 0, 10), port: 80 },
            scheduler: "rr".into(),
            flags: 0,
            timeout: 0,
            netmask: host_netmask(AF_INET),
        }
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn new_service_matches_the_uapi_layout() {
        let bytes = encode(&Request::NewService(cluster_service()), 0x25, 7);
        let mut want: Vec<u8> = Vec::new();
        // nlmsghdr: total length 92, type 0x25, flags REQUEST|ACK, seq 7, pid 0.
        want.extend(le32(92));
        want.extend(le16(0x25));
        want.extend(le16(0x0005));
        want.extend(le32(7));
        want.extend(le32(0));
        // genlmsghdr: IPVS_CMD_NEW_SERVICE, version 1.
        want.extend([1, 1, 0, 0]);
        // IPVS_CMD_ATTR_SERVICE | NLA_F_NESTED: 4 + 7 * 8 + 12 = 72 bytes.
        want.extend(le16(72));
        want.extend(le16(0x8001));
        // AF = AF_INET (u16, padded)
        want.extend([6, 0, 1, 0, 2, 0, 0, 0]);
        // PROTOCOL = TCP
        want.extend([6, 0, 2, 0, 6, 0, 0, 0]);
        // ADDR = 10.96.0.10
        want.extend([8, 0, 3, 0, 10, 96, 0, 10]);
        // PORT = 80 in network byte order
        want.extend([6, 0, 4, 0, 0, 80, 0, 0]);
        // SCHED_NAME = "rr\0", padded
        want.extend([7, 0, 6, 0, b'r', b'r', 0, 0]);
        // FLAGS = struct ip_vs_flags { flags 0, mask ~0 }
        want.extend([12, 0, 7, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        // TIMEOUT = 0
        want.extend([8, 0, 8, 0, 0, 0, 0, 0]);
        // NETMASK = 255.255.255.255
        want.extend([8, 0, 9, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(bytes, want);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn persistent_ipv6_service() {
        let service = Service {
            id: ServiceId::Addr { protocol: IPPROTO_UDP, addr: "fd00::a".parse().expect("ip"), port: 53 },
            scheduler: "sh".into(),
            flags: IP_VS_SVC_F_PERSISTENT,
            timeout: 10800,
            netmask: host_netmask(AF_INET6),
        };
        let bytes = encode(&Request::SetService(service.clone()), 0x25, 1);
        assert_eq!(bytes[16], IPVS_CMD_SET_SERVICE);
        let nested = &bytes[20..];
        let mut want: Vec<u8> = Vec::new();
        want.extend(le16(84));
        want.extend(le16(0x8001));
        want.extend([6, 0, 1, 0, 10, 0, 0, 0]); // AF_INET6
        want.extend([6, 0, 2, 0, 17, 0, 0, 0]); // UDP
        want.extend([20, 0, 3, 0]);
        want.extend([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a]);
        want.extend([6, 0, 4, 0, 0, 53, 0, 0]);
        want.extend([7, 0, 6, 0, b's', b'h', 0, 0]);
        want.extend([12, 0, 7, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        want.extend([8, 0, 8, 0]);
        want.extend(le32(10800));
        want.extend([8, 0, 9, 0, 128, 0, 0, 0]); // prefix length 128
        assert_eq!(nested, &want[..]);
        assert_eq!(bytes.len(), 20 + 84);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn new_dest_carries_service_key_and_full_dest() {
        let id = ServiceId::Addr { protocol: IPPROTO_SCTP, addr: v4(10, 0, 0, 1), port: 9000 };
        let dest = Destination::masq(v4(10, 244, 1, 5), 8080, 1);
        let bytes = encode(&Request::NewDest(id, dest), 0x25, 3);
        let mut want: Vec<u8> = Vec::new();
        want.extend(le32(116));
        want.extend(le16(0x25));
        want.extend(le16(0x0005));
        want.extend(le32(3));
        want.extend(le32(0));
        want.extend([IPVS_CMD_NEW_DEST, 1, 0, 0]);
        // service key: AF, PROTOCOL, ADDR, PORT
        want.extend(le16(36));
        want.extend(le16(0x8001));
        want.extend([6, 0, 1, 0, 2, 0, 0, 0]);
        want.extend([6, 0, 2, 0, 132, 0, 0, 0]);
        want.extend([8, 0, 3, 0, 10, 0, 0, 1]);
        want.extend([6, 0, 4, 0, 0x23, 0x28, 0, 0]); // 9000 = 0x2328
        // dest: ADDR, PORT, FWD_METHOD, WEIGHT, U_THRESH, L_THRESH, ADDR_FAMILY
        want.extend(le16(60));
        want.extend(le16(0x8002));
        want.extend([8, 0, 1, 0, 10, 244, 1, 5]);
        want.extend([6, 0, 2, 0, 0x1f, 0x90, 0, 0]); // 8080 = 0x1f90
        want.extend([8, 0, 3, 0, 0, 0, 0, 0]);
        want.extend([8, 0, 4, 0, 1, 0, 0, 0]);
        want.extend([8, 0, 5, 0, 0, 0, 0, 0]);
        want.extend([8, 0, 6, 0, 0, 0, 0, 0]);
        want.extend([6, 0, 11, 0, 2, 0, 0, 0]);
        assert_eq!(bytes, want);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn deletes_and_dumps() {
        let id = ServiceId::Addr { protocol: IPPROTO_TCP, addr: v4(10, 96, 0, 10), port: 80 };
        let del = encode(&Request::DelService(id), 0x25, 9);
        assert_eq!(u32::from_le_bytes([del[0], del[1], del[2], del[3]]) as usize, del.len());
        assert_eq!(del.len(), 20 + 36);
        assert_eq!(&del[6..8], &le16(NLM_F_REQUEST | NLM_F_ACK));
        assert_eq!(del[16], IPVS_CMD_DEL_SERVICE);

        let del_dest = encode(&Request::DelDest(id, v4(10, 244, 0, 2), 8080), 0x25, 10);
        // service key (36) + dest with ADDR, PORT and ADDR_FAMILY only (4 + 8 + 8 + 8).
        assert_eq!(del_dest.len(), 20 + 36 + 28);
        assert_eq!(&del_dest[56..60], &[28, 0, 0x02, 0x80]);

        let dump = encode(&Request::GetServices, 0x25, 11);
        assert_eq!(
            dump,
            [le32(20).as_slice(), &le16(0x25), &le16(0x0301), &le32(11), &le32(0), &[4, 1, 0, 0]].concat()
        );

        let dests = encode(&Request::GetDests(id), 0x25, 12);
        assert_eq!(&dests[6..8], &le16(0x0301));
        assert_eq!(dests[16], IPVS_CMD_GET_DEST);
        assert_eq!(dests.len(), 20 + 36);

        let flush = encode(&Request::Flush, 0x25, 13);
        assert_eq!(flush.len(), 20);
        assert_eq!(flush[16], 17);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn get_family_request() {
        let bytes = encode_get_family(1);
        let mut want: Vec<u8> = Vec::new();
        want.extend(le32(32));
        want.extend(le16(0x10));
        want.extend(le16(0x0005));
        want.extend(le32(1));
        want.extend(le32(0));
        want.extend([3, 1, 0, 0]);
        want.extend([9, 0, 2, 0, b'I', b'P', b'V', b'S', 0, 0, 0, 0]);
        assert_eq!(bytes, want);
    }

    /// A kernel answer built the way ip_vs_ctl.c builds it: nests without NLA_F_NESTED, the
    /// address as a 16-byte `union nf_inet_addr`, HASHED in the flags, statistics we skip.
    fn kernel_service_message(seq: u32) -> Vec<u8> {
        let mut nested: Vec<u8> = Vec::new();
        nested.extend([6, 0, 1, 0, 2, 0, 0, 0]);
        nested.extend([6, 0, 2, 0, 6, 0, 0, 0]);
        nested.extend([20, 0, 3, 0, 10, 96, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        nested.extend([6, 0, 4, 0, 0, 80, 0, 0]);
        nested.extend([7, 0, 6, 0, b'r', b'r', 0, 0]);
        nested.extend([12, 0, 7, 0, 3, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        nested.extend([8, 0, 8, 0]);
        nested.extend(le32(180));
        nested.extend([8, 0, 9, 0, 0xff, 0xff, 0xff, 0xff]);
        // IPVS_SVC_ATTR_STATS (10), nested, one u32 inside
        nested.extend([12, 0, 10, 0, 8, 0, 1, 0, 5, 0, 0, 0]);
        let mut msg: Vec<u8> = Vec::new();
        let total = 16 + 4 + 4 + nested.len();
        msg.extend(le32(total as u32));
        msg.extend(le16(0x25));
        msg.extend(le16(NLM_F_MULTI));
        msg.extend(le32(seq));
        msg.extend(le32(1234));
        msg.extend([IPVS_CMD_NEW_SERVICE, 1, 0, 0]);
        msg.extend(le16((4 + nested.len()) as u16));
        msg.extend(le16(IPVS_CMD_ATTR_SERVICE));
        msg.extend(nested);
        msg
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn decodes_a_service_dump() {
        let mut buf = kernel_service_message(5);
        buf.extend(kernel_service_message(5));
        // NLMSG_DONE with its int payload
        buf.extend(le32(20));
        buf.extend(le16(NLMSG_DONE));
        buf.extend(le16(NLM_F_MULTI));
        buf.extend(le32(5));
        buf.extend(le32(1234));
        buf.extend(le32(0));
        let messages = parse_messages(&buf).expect("parses");
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[2], Message::Done { seq: 5 });
        let Message::Data { cmd, attrs, flags, .. } = &messages[0] else { panic!("data expected") };
        assert_eq!(*cmd, IPVS_CMD_NEW_SERVICE);
        assert_eq!(*flags, NLM_F_MULTI);
        let service = decode_service(attrs).expect("decodes");
        assert_eq!(
            service,
            Service {
                id: ServiceId::Addr { protocol: IPPROTO_TCP, addr: v4(10, 96, 0, 10), port: 80 },
                scheduler: "rr".into(),
                flags: IP_VS_SVC_F_PERSISTENT | IP_VS_SVC_F_HASHED,
                timeout: 180,
                netmask: host_netmask(AF_INET),
            }
        );
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn decodes_a_dest_and_errors() {
        let mut nested: Vec<u8> = Vec::new();
        nested.extend([20, 0, 1, 0, 10, 244, 1, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        nested.extend([6, 0, 2, 0, 0x1f, 0x90, 0, 0]);
        nested.extend([8, 0, 3, 0, 0, 0, 0, 0]);
        nested.extend([8, 0, 4, 0, 1, 0, 0, 0]);
        nested.extend([8, 0, 5, 0, 0, 0, 0, 0]);
        nested.extend([8, 0, 6, 0, 0, 0, 0, 0]);
        nested.extend([8, 0, 7, 0, 3, 0, 0, 0]);
        nested.extend([8, 0, 8, 0, 4, 0, 0, 0]);
        nested.extend([8, 0, 9, 0, 0, 0, 0, 0]);
        nested.extend([6, 0, 11, 0, 2, 0, 0, 0]);
        let mut attrs: Vec<u8> = Vec::new();
        attrs.extend(le16((4 + nested.len()) as u16));
        attrs.extend(le16(IPVS_CMD_ATTR_DEST | NLA_F_NESTED));
        attrs.extend(nested);
        let dest = decode_dest(&attrs, AF_INET).expect("decodes");
        assert_eq!(dest.addr, v4(10, 244, 1, 5));
        assert_eq!(dest.port, 8080);
        assert_eq!(dest.weight, 1);
        assert_eq!((dest.active_conns, dest.inactive_conns), (3, 4));

        // NLMSG_ERROR -EEXIST (17) with the original header echoed.
        let mut err: Vec<u8> = Vec::new();
        err.extend(le32(36));
        err.extend(le16(NLMSG_ERROR));
        err.extend(le16(0));
        err.extend(le32(9));
        err.extend(le32(1234));
        err.extend((-17i32).to_le_bytes());
        err.extend([0; 16]);
        assert_eq!(parse_messages(&err).expect("parses"), vec![Message::Error { seq: 9, errno: -17 }]);

        // A length that runs past the buffer is an error, not a panic.
        let mut bad = err.clone();
        bad[0] = 200;
        assert!(parse_messages(&bad).is_err());
        assert!(attributes(&[200, 0, 1, 0]).is_err());
    }

    #[test]
    fn family_id_answer() {
        let mut attrs: Vec<u8> = Vec::new();
        attrs.extend([9, 0, 2, 0, b'I', b'P', b'V', b'S', 0, 0, 0, 0]);
        attrs.extend([6, 0, 1, 0]);
        attrs.extend(0x25u16.to_ne_bytes());
        attrs.extend([0, 0]);
        assert_eq!(decode_family_id(&attrs).expect("id"), 0x25);
    }
}
