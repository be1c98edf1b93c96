//! Reading our tables over netlink: which of our tables exist, the names of their chains, sets
//! and maps (what a full sync must delete if it no longer wants them), and how many rules and
//! static elements they hold (a dump of their rules and of the static sets' elements, counted
//! message by message). `nft list table` would count the same at 10,000 services in 5.7 s and 330 MiB (the
//! `-j` form: 780 MiB), and even `nft list tables` fetches every rule first (1.6 s, 330 MiB).
//!
//! What counts matches what a user would count in `nft list table`: every rule, and every element
//! of the verdict maps and static sets (an interval once, not as its two kernel elements). The
//! affinity sets hold clients, not rules, and are not counted.

use rustix::net::{RecvFlags, SendFlags, netlink::SocketAddrNetlink};

use super::{
    netlink::{
        AF_INET, AF_INET6, NFNL_SUBSYS_NFTABLES, NFT_SET_ANONYMOUS, NFT_SET_ELEM_INTERVAL_END, NFT_SET_MAP,
        NFTA_CHAIN_NAME, NFTA_CHAIN_TABLE, NFTA_DATA_VERDICT, NFTA_EXPR_DATA, NFTA_EXPR_NAME, NFTA_LIST_ELEM,
        NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS, NFTA_RULE_TABLE, NFTA_SET_ELEM_FLAGS,
        NFTA_SET_ELEM_LIST_ELEMENTS, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_FLAGS,
        NFTA_SET_NAME, NFTA_TABLE_NAME, NFTA_VERDICT_CHAIN, family_byte,
    },
    render::{KernelObjects, Table},
};
use crate::{
    dataplane::DataPlaneError,
    ipvs::{
        netlink::{Message, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_HDRLEN, attributes, find, parse_messages},
        open_netlink,
    },
    model::IpFamily,
};

const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_GETSETELEM: u16 = 13;
/// The immediate expression's data (its value or verdict).
const NFTA_IMMEDIATE_DATA: u16 = 2;
const ENOENT: i32 = 2;
const RECV_BUFFER: usize = 1 << 20;
const NETFILTER: rustix::net::Protocol = rustix::net::netlink::NETFILTER;

fn read_back_error(message: impl std::fmt::Display) -> DataPlaneError {
    DataPlaneError::ReadBack { what: "our nftables tables over netlink".into(), message: message.to_string() }
}

/// A dump request: netlink header, nfgenmsg for `family`, then `(type, string)` attributes.
/// `family` `None`: every family.
pub fn dump_request(message: u16, family: Option<IpFamily>, seq: u32, attrs: &[(u16, &str)]) -> Vec<u8> {
    let mut out = vec![0u8; NLMSG_HDRLEN];
    let af = family.map_or(0, family_byte);
    out.extend_from_slice(&[af, 0, 0, 0]);
    for (kind, value) in attrs {
        let payload_len = value.len() + 1;
        let len = u16::try_from(4 + payload_len).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    let total = u32::try_from(out.len()).unwrap_or(u32::MAX);
    out[0..4].copy_from_slice(&total.to_ne_bytes());
    out[4..6].copy_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | message).to_ne_bytes());
    out[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    out[8..12].copy_from_slice(&seq.to_ne_bytes());
    out
}

/// The elements one `NEWSETELEM` message carries (its attributes after nfgenmsg), intervals'
/// end markers left out.
pub fn count_elements(attrs: &[u8]) -> Result<u64, String> {
    let mut count = 0;
    for (kind, list) in attributes(attrs).map_err(|e| e.to_string())? {
        if kind != NFTA_SET_ELEM_LIST_ELEMENTS {
            continue;
        }
        for (_, element) in attributes(list).map_err(|e| e.to_string())? {
            let interval_end = attributes(element).map_err(|e| e.to_string())?.iter().any(|(k, v)| {
                *k == NFTA_SET_ELEM_FLAGS
                    && v.get(0..4).is_some_and(|b| {
                        u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & NFT_SET_ELEM_INTERVAL_END != 0
                    })
            });
            if !interval_end {
                count += 1;
            }
        }
    }
    Ok(count)
}

struct Dumper {
    fd: std::os::fd::OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Dumper {
    fn open(netns: Option<&str>) -> Result<Self, DataPlaneError> {
        Ok(Self { fd: open_netlink(NETFILTER, netns)?, seq: 0, buf: vec![0; RECV_BUFFER] })
    }

    /// Sends a dump request and folds every answer through `each`; a missing table or set
    /// (`ENOENT`) is an empty dump.
    fn dump(
        &mut self,
        message: u16,
        family: Option<IpFamily>,
        attrs: &[(u16, &str)],
        mut each: impl FnMut(u8, &[u8]) -> Result<u64, String>,
    ) -> Result<u64, DataPlaneError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let request = dump_request(message, family, seq, attrs);
        rustix::net::sendto(&self.fd, &request, SendFlags::empty(), &SocketAddrNetlink::new(0, 0))
            .map_err(read_back_error)?;
        let mut total = 0;
        loop {
            let (len, _) = rustix::net::recv(&self.fd, &mut self.buf[..], RecvFlags::empty())
                .map_err(read_back_error)?;
            for reply in parse_messages(&self.buf[..len]).map_err(read_back_error)? {
                match reply {
                    Message::Done { seq: s } if s == seq => return Ok(total),
                    Message::Error { seq: s, errno } if s == seq => {
                        return match -errno {
                            0 => Ok(total),
                            ENOENT => Ok(0),
                            code => Err(read_back_error(std::io::Error::from_raw_os_error(code))),
                        };
                    }
                    Message::Data { seq: s, cmd: af, attrs, .. } if s == seq => {
                        // For nftables the byte after the netlink header is nfgenmsg's family.
                        total += each(af, &attrs).map_err(read_back_error)?;
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Our tables, in `netns` (or ours). Blocking.
pub fn our_tables(netns: Option<&str>) -> Result<Vec<Table>, DataPlaneError> {
    let mut tables = Vec::new();
    Dumper::open(netns)?.dump(NFT_MSG_GETTABLE, None, &[], |af, attrs| {
        let family = match af {
            AF_INET => "ip",
            AF_INET6 => "ip6",
            _ => return Ok(0),
        };
        for (kind, name) in attributes(attrs).map_err(|e| e.to_string())? {
            let name = name.strip_suffix(b"\0").and_then(|n| std::str::from_utf8(n).ok());
            if let Some(table) =
                name.filter(|_| kind == NFTA_TABLE_NAME).and_then(|n| Table::parse(family, n))
            {
                tables.push(table);
            }
        }
        Ok(0)
    })?;
    Ok(tables)
}

/// A string attribute's value, without its terminating NUL.
fn string(value: &[u8]) -> Option<&str> {
    std::str::from_utf8(value.strip_suffix(b"\0").unwrap_or(value)).ok()
}

/// The family keyword (`ip`, `ip6`) of an nfgenmsg family; others are not ours.
fn family_kw(af: u8) -> Option<&'static str> {
    match af {
        AF_INET => Some("ip"),
        AF_INET6 => Some("ip6"),
        _ => None,
    }
}

/// The names of the chains, sets and maps of our tables, in `netns` (or ours): two dumps, of
/// chains and of sets (anonymous sets left out: they belong to their rules). Blocking.
pub fn kernel_objects(netns: Option<&str>) -> Result<KernelObjects, DataPlaneError> {
    let mut objects = KernelObjects::default();
    let mut dumper = Dumper::open(netns)?;
    for message in [NFT_MSG_GETCHAIN, NFT_MSG_GETSET] {
        dumper.dump(message, None, &[], |af, attrs| {
            let Some(family) = family_kw(af) else { return Ok(0) };
            let (mut table, mut name, mut flags) = (None, None, 0);
            for (kind, value) in attributes(attrs).map_err(|e| e.to_string())? {
                match kind {
                    // NFTA_CHAIN_TABLE and NFTA_SET_TABLE are both 1.
                    NFTA_CHAIN_TABLE => table = string(value).map(str::to_owned),
                    NFTA_CHAIN_NAME if message == NFT_MSG_GETCHAIN => name = string(value).map(str::to_owned),
                    NFTA_SET_NAME if message == NFT_MSG_GETSET => name = string(value).map(str::to_owned),
                    NFTA_SET_FLAGS if message == NFT_MSG_GETSET => {
                        flags = value.get(0..4).map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    }
                    _ => {}
                }
            }
            let (Some(table), Some(name)) = (table.and_then(|t| Table::parse(family, &t)), name) else {
                return Ok(0);
            };
            let objects = objects.table_mut(table);
            match message {
                NFT_MSG_GETCHAIN => objects.chains.insert(name),
                _ if flags & NFT_SET_ANONYMOUS != 0 => false,
                _ if flags & NFT_SET_MAP != 0 => objects.maps.insert(name),
                _ => objects.sets.insert(name),
            };
            Ok(0)
        })?;
    }
    Ok(objects)
}

/// Rules and static elements of our tables in both families, in `netns` (or ours). Blocking.
pub fn count_rules(netns: Option<&str>) -> Result<u64, DataPlaneError> {
    let mut dumper = Dumper::open(netns)?;
    let mut count = 0;
    for table in Table::all() {
        let name = table.name();
        let family = Some(table.family);
        count += dumper.dump(NFT_MSG_GETRULE, family, &[(NFTA_RULE_TABLE, &name)], |_, _| Ok(1))?;
        for set in table.static_sets() {
            count += dumper.dump(
                NFT_MSG_GETSETELEM,
                family,
                &[(NFTA_SET_ELEM_LIST_TABLE, &name), (NFTA_SET_ELEM_LIST_SET, set)],
                |_, attrs| count_elements(attrs),
            )?;
        }
    }
    Ok(count)
}

/// The first attribute of `kind` in `bytes`.
fn nested(bytes: &[u8], kind: u16) -> Result<Option<&[u8]>, String> {
    Ok(find(&attributes(bytes).map_err(|e| e.to_string())?, kind))
}

/// The chain an expression jumps or goes to: iptables-nft writes `-j CHAIN` as an immediate
/// verdict.
fn jump_target(expression: &[u8]) -> Result<Option<&str>, String> {
    if nested(expression, NFTA_EXPR_NAME)?.and_then(string) != Some("immediate") {
        return Ok(None);
    }
    let Some(data) = nested(expression, NFTA_EXPR_DATA)? else { return Ok(None) };
    let Some(value) = nested(data, NFTA_IMMEDIATE_DATA)? else { return Ok(None) };
    let Some(verdict) = nested(value, NFTA_DATA_VERDICT)? else { return Ok(None) };
    Ok(nested(verdict, NFTA_VERDICT_CHAIN)?.and_then(string))
}

/// The chain a rule (a `NEWRULE` message's attributes after nfgenmsg) is in, and the chain it
/// jumps or goes to, if any.
fn rule_chains(attrs: &[u8]) -> Result<(Option<&str>, Option<&str>), String> {
    let chain = nested(attrs, NFTA_RULE_CHAIN)?.and_then(string);
    let mut target = None;
    if let Some(expressions) = nested(attrs, NFTA_RULE_EXPRESSIONS)? {
        for (kind, expression) in attributes(expressions).map_err(|e| e.to_string())? {
            if kind == NFTA_LIST_ELEM {
                target = jump_target(expression)?.or(target);
            }
        }
    }
    Ok((chain, target))
}

/// Rules of ours in iptables-nft's `tables` of `family`, in `netns` (or ours): every rule of a
/// chain named `prefix...`, and every rule elsewhere that jumps or goes to one, as `iptables-save`
/// would show them, but counted message by message instead of printing the whole table (at
/// 10,000 services `iptables-save -t nat` takes seconds and hundreds of MiB). Blocking.
pub fn count_xtables_rules(
    netns: Option<&str>,
    family: IpFamily,
    tables: &[&str],
    prefix: &str,
) -> Result<u64, DataPlaneError> {
    let mut dumper = Dumper::open(netns)?;
    let mut count = 0;
    for table in tables {
        count += dumper.dump(NFT_MSG_GETRULE, Some(family), &[(NFTA_RULE_TABLE, table)], |_, attrs| {
            let (chain, target) = rule_chains(attrs)?;
            let ours = |name: Option<&str>| name.is_some_and(|n| n.starts_with(prefix));
            Ok(u64::from(ours(chain) || ours(target)))
        })?;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_dump_request_names_the_table() {
        let request =
            dump_request(NFT_MSG_GETRULE, Some(IpFamily::V6), 7, &[(NFTA_RULE_TABLE, "fleetproxy")]);
        assert_eq!(request.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes([request[0], request[1], request[2], request[3]]) as usize,
            request.len()
        );
        assert_eq!(u16::from_ne_bytes([request[4], request[5]]), 0x0a07);
        assert_eq!(u16::from_ne_bytes([request[6], request[7]]), 0x301);
        assert_eq!(request[16], 10, "AF_INET6");
        assert_eq!(&request[24..35], b"fleetproxy\0");
    }

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&u16::try_from(4 + payload.len()).expect("short").to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    #[test]
    fn elements_are_counted_without_interval_ends() {
        let key = attr(1, &attr(1, &[10, 0, 0, 0]));
        let plain = attr(1, &key);
        let end = attr(1, &[key.clone(), attr(NFTA_SET_ELEM_FLAGS, &1u32.to_be_bytes())].concat());
        let list = attr(NFTA_SET_ELEM_LIST_ELEMENTS | 0x8000, &[plain.clone(), plain, end].concat());
        let attrs = [attr(NFTA_SET_ELEM_LIST_TABLE, b"fleetproxy\0"), list].concat();
        assert_eq!(count_elements(&attrs), Ok(2));
    }
}
