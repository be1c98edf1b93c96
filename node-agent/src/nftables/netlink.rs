//! The nftables netlink writer: [`Command`]s become one `NFNL_SUBSYS_NFTABLES` batch, sent on a
//! `NETLINK_NETFILTER` socket — what `nft -f` sends, without its process, its cache fetch of our
//! whole ruleset and its parser.
//!
//! [`encode`] is pure: it mimics the messages nft 1.0.6 sends for the same nft syntax (the
//! [`Display`](std::fmt::Display) of each command), so that `nft list ruleset` prints what we wrote
//! exactly as if nft had written it (the kernel test `tests/nftables_netlink.rs` compares both).
//! What each statement becomes, in nft's `--debug=netlink` notation:
//!
//! | statement | expressions |
//! | --- | --- |
//! | `ct state new` / `ct status dnat` | `ct load` · `bitwise & 0x8` / `& 0x20` · `cmp neq 0` |
//! | `fib daddr type local` | `fib daddr type` · `cmp eq 2` (RTN_LOCAL) |
//! | `ip saddr 10.0.0.0/8` | `payload load 1b @ nh + 12` · `cmp eq 0x0a` (a prefix not on a byte boundary: the whole address, `bitwise` mask, `cmp`) |
//! | `meta l4proto tcp` / `th dport 80` | `meta load l4proto` / `payload load 2b @ th + 2` · `cmp` |
//! | `a . b @set` / `vmap @map` | one load per field into consecutive 32-bit registers · `lookup` (`dreg 0` for a verdict map) |
//! | `meta mark & M == 0` | `meta load mark` · `bitwise & M` · `cmp eq 0` |
//! | `meta mark set meta mark \| B` (`^ B`) | `meta load mark` · `bitwise & ~B ^ B` (`& ~0 ^ B`) · `meta set mark` |
//! | `numgen random mod N 0` | `numgen random mod N` · `cmp eq 0` |
//! | `dnat to A:P` | `immediate reg 1 A` · `immediate reg 2 P` · `nat dnat addr reg 1 proto reg 2 flags 0x2` |
//! | `dnat ip to numgen … map { … }` | anonymous map `__map%d` (`integer : ipv4_addr . inet_service`, constant) and its elements · `numgen` · `lookup dreg 1` · `nat dnat` |
//! | `numgen random mod N vmap { … }` | anonymous verdict map and its elements · `numgen` · `lookup dreg 0` |
//! | `update @set { ip saddr }` | `payload load` · `dynset update` |
//! | `masquerade fully-random` | `masq flags 0x10` |
//! | `reject with tcp reset` | (`meta l4proto tcp` unless the rule already matched it) · `reject type 1` |
//! | `reject` | `reject type 0 code 3` (ip6: code 4) |
//! | verdicts | `immediate reg 0 drop/return/jump/goto` |
//!
//! Sets carry nft's user data (key byte order, …) so that `nft list` prints them like its own;
//! interval sets get a start and an end element per network (an end past the last address is an
//! "open" start instead; a set created or flushed in the same transaction also gets a leading end
//! element at zero when no network starts there), as nft sends them. Element lists are cut into messages of at most [`ELEMENTS_BYTES`].
//!
//! [`Nftables::apply`] sends the batch in one `sendto` (the kernel runs the whole transaction in
//! that call: all of it or nothing) and reads the outcome: errors name the failing message's
//! sequence number, which [`Batch::command_of`] maps back to the command; the last message asks for
//! an acknowledgement, so success is known, not inferred from silence.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    os::fd::OwnedFd,
};

use rustix::net::{RecvFlags, SendFlags, netlink::SocketAddrNetlink, sockopt};

use super::{
    render::Table,
    ruleset::{
        ChainType, Command, Element, Field, Hook, HookPoint, KeyType, Rule, SetSpec, Stmt, Value, Verdict,
    },
};
use crate::{
    dataplane::DataPlaneError,
    ipvs::{
        netlink::{Message, NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST, parse_messages},
        open_netlink,
    },
    model::{IpFamily, Protocol},
};

// --- netlink.h, nfnetlink.h ---
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
pub(super) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(super) const AF_INET: u8 = 2;
pub(super) const AF_INET6: u8 = 10;

// --- nf_tables.h: messages ---
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

// --- nf_tables.h: attributes ---
pub(super) const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_TABLE_USERDATA: u16 = 6;
pub(super) const NFTA_CHAIN_TABLE: u16 = 1;
pub(super) const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
pub(super) const NFTA_RULE_TABLE: u16 = 1;
pub(super) const NFTA_RULE_CHAIN: u16 = 2;
pub(super) const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub(super) const NFTA_LIST_ELEM: u16 = 1;
pub(super) const NFTA_EXPR_NAME: u16 = 1;
pub(super) const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
pub(super) const NFTA_SET_NAME: u16 = 2;
pub(super) const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_TIMEOUT: u16 = 11;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_DESC_SIZE: u16 = 1;
pub(super) const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub(super) const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub(super) const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
pub(super) const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
pub(super) const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
pub(super) const NFTA_VERDICT_CHAIN: u16 = 2;

pub(super) const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_CONSTANT: u32 = 0x2;
const NFT_SET_INTERVAL: u32 = 0x4;
pub(super) const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFT_SET_EVAL: u32 = 0x20;
pub(super) const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
const NF_DROP: i32 = 0;
const NF_ACCEPT: u32 = 1;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;

// --- nft's data types (datatype.h) and libnftnl's user data (udata.h, set.h, table.h) ---
const TYPE_INTEGER: u32 = 4;
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_BITS: u32 = 6;
const UDATA_TABLE_COMMENT: u8 = 0;
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const UDATA_SET_DATABYTEORDER: u8 = 1;
const UDATA_SET_KEY_TYPEOF: u8 = 3;
const UDATA_SET_DATA_TYPEOF: u8 = 4;
const UDATA_SET_DATA_INTERVAL: u8 = 6;
const UDATA_SET_ELEM_FLAGS: u8 = 1;
const UDATA_SET_ELEM_F_INTERVAL_OPEN: u32 = 1;
const BYTEORDER_INVALID: u32 = 0;
const BYTEORDER_HOST: u32 = 1;
const BYTEORDER_BIG: u32 = 2;
/// The `typeof` user data nft 1.0.6 gives every set with a concatenated key (the same bytes
/// whatever the parts).
const UDATA_CONCAT_TYPEOF: [u8; 8] = [0x00, 0x04, 0x0d, 0x00, 0x00, 0x00, 0x01, 0x00];
/// … and an anonymous verdict map's data.
const UDATA_VERDICT_TYPEOF: [u8; 8] = [0x00, 0x04, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00];

// --- expressions ---
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;
const NFT_REG32_00: u32 = 8;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_META_MARK: u32 = 3;
const NFT_META_L4PROTO: u32 = 16;
const NFT_CT_STATE: u32 = 0;
const NFT_CT_STATUS: u32 = 2;
const NF_CT_STATE_NEW_BIT: u32 = 1 << 3;
const IPS_DST_NAT: u32 = 1 << 5;
const NFTA_FIB_F_SADDR: u32 = 1;
const NFTA_FIB_F_DADDR: u32 = 2;
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const RTN_LOCAL: u32 = 2;
const NFT_NG_RANDOM: u32 = 1;
const NFT_DYNSET_OP_UPDATE: u32 = 1;
const NFT_NAT_DNAT: u32 = 1;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;
const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 0x10;
const NFT_REJECT_ICMP_UNREACH: u32 = 0;
const NFT_REJECT_TCP_RST: u32 = 1;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMPV6_PORT_UNREACH: u8 = 4;

/// The most element bytes one `NEWSETELEM`/`DELSETELEM` message carries (an attribute's length is
/// 16 bits; nft cuts at 8 KiB).
pub const ELEMENTS_BYTES: usize = 32 * 1024;

const TOOL: &str = "nftables netlink";
/// Receive buffer: an error echoes the failing message (at most ~64 KiB, see [`ELEMENTS_BYTES`]).
const RECV_BUFFER: usize = 256 * 1024;

/// A command that cannot be encoded (a value of the wrong kind or family for its field).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("command {index} cannot be encoded: {reason}")]
pub struct EncodeError {
    /// Index of the command in the list.
    pub index: usize,
    pub reason: String,
}

/// One encoded transaction: `BATCH_BEGIN`, the messages, `BATCH_END`, numbered from `first_seq`.
#[derive(Clone, Debug)]
pub struct Batch {
    bytes: Vec<u8>,
    first_seq: u32,
    /// The command each message (in order, after `BATCH_BEGIN`) encodes.
    owners: Vec<usize>,
}

impl Batch {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Messages between `BATCH_BEGIN` and `BATCH_END`.
    pub fn messages(&self) -> usize {
        self.owners.len()
    }

    /// The sequence number of `BATCH_BEGIN` (the kernel reports a failed commit under it).
    pub fn begin_seq(&self) -> u32 {
        self.first_seq
    }

    /// The sequence number of the last message, the one that asks for an acknowledgement.
    pub fn last_seq(&self) -> u32 {
        self.first_seq.wrapping_add(self.owners.len() as u32)
    }

    /// The index of the command whose message had sequence number `seq`.
    pub fn command_of(&self, seq: u32) -> Option<usize> {
        let offset = seq.wrapping_sub(self.first_seq) as usize;
        offset.checked_sub(1).and_then(|i| self.owners.get(i).copied())
    }
}

/// Encodes `commands` as one transaction whose messages are numbered from `first_seq`.
pub fn encode(commands: &[Command], first_seq: u32) -> Result<Batch, EncodeError> {
    let mut e = Encoder {
        out: Vec::with_capacity(commands.len() * 256),
        seq: first_seq,
        owners: Vec::with_capacity(commands.len()),
        command: 0,
        set_ids: HashMap::new(),
        empty_sets: HashSet::new(),
        next_set_id: 1,
        oversized: false,
        last_message: None,
    };
    e.batch_marker(NFNL_MSG_BATCH_BEGIN);
    for (index, command) in commands.iter().enumerate() {
        e.command = index;
        e.command(command).map_err(|reason| EncodeError { index, reason })?;
        if e.oversized {
            return Err(EncodeError { index, reason: "an attribute exceeds 64 KiB".into() });
        }
    }
    // Ask for an acknowledgement of the last message: the kernel sends it after the commit.
    if let Some(last) = e.last_message {
        let flags = u16::from_ne_bytes([e.out[last + 6], e.out[last + 7]]) | NLM_F_ACK;
        e.out[last + 6..last + 8].copy_from_slice(&flags.to_ne_bytes());
    }
    e.seq = e.seq.wrapping_add(1);
    e.batch_marker(NFNL_MSG_BATCH_END);
    Ok(Batch { bytes: e.out, first_seq, owners: e.owners })
}

struct Encoder {
    out: Vec<u8>,
    /// The sequence number of the last message written.
    seq: u32,
    owners: Vec<usize>,
    command: usize,
    /// Ids of the sets this transaction creates (nft numbers them from 1).
    set_ids: HashMap<(Table, String), u32>,
    /// Sets this transaction created or flushed and has not given elements since: nft starts an
    /// interval set's elements with an end at zero only when the set is empty.
    empty_sets: HashSet<(Table, String)>,
    next_set_id: u32,
    /// A nested attribute outgrew its 16-bit length.
    oversized: bool,
    last_message: Option<usize>,
}

pub(super) fn family_byte(family: IpFamily) -> u8 {
    match family {
        IpFamily::V4 => AF_INET,
        IpFamily::V6 => AF_INET6,
    }
}

fn addr_len(family: IpFamily) -> u32 {
    match family {
        IpFamily::V4 => 4,
        IpFamily::V6 => 16,
    }
}

fn ip_bytes(addr: &IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn proto_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

/// nft's register number for the 32-bit register `index` (legacy 128-bit numbers when aligned).
fn register(index: u32) -> u32 {
    if index.is_multiple_of(4) { NFT_REG_1 + index / 4 } else { NFT_REG32_00 + index }
}

fn family_of_addr(addr: &IpAddr) -> IpFamily {
    IpFamily::of(addr)
}

fn check_family(addr: &IpAddr, family: IpFamily) -> Result<(), String> {
    if family_of_addr(addr) == family {
        Ok(())
    } else {
        Err(format!("address {addr} in a {family:?} rule or set"))
    }
}

/// Message writing: headers, attributes and nests appended to `out`.
impl Encoder {
    fn header(&mut self, kind: u16, flags: u16, family: u8, res_id: u16) -> usize {
        let at = self.out.len();
        self.out.extend_from_slice(&0u32.to_ne_bytes());
        self.out.extend_from_slice(&kind.to_ne_bytes());
        self.out.extend_from_slice(&flags.to_ne_bytes());
        self.out.extend_from_slice(&self.seq.to_ne_bytes());
        self.out.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, version 0, res_id (big endian).
        self.out.extend_from_slice(&[family, 0]);
        self.out.extend_from_slice(&res_id.to_be_bytes());
        at
    }

    fn finish(&mut self, at: usize) {
        let len = (self.out.len() - at) as u32;
        self.out[at..at + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn batch_marker(&mut self, kind: u16) {
        let at = self.header(kind, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        self.finish(at);
    }

    /// Starts a message of the command being encoded; [`Encoder::finish`] ends it.
    fn message(&mut self, kind: u16, flags: u16, family: IpFamily) -> usize {
        self.seq = self.seq.wrapping_add(1);
        self.owners.push(self.command);
        let at =
            self.header((NFNL_SUBSYS_NFTABLES << 8) | kind, NLM_F_REQUEST | flags, family_byte(family), 0);
        self.last_message = Some(at);
        at
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        if len > usize::from(u16::MAX) {
            self.oversized = true;
        }
        self.out.extend_from_slice(&(len as u16).to_ne_bytes());
        self.out.extend_from_slice(&kind.to_ne_bytes());
        self.out.extend_from_slice(payload);
        self.out.resize(self.out.len().next_multiple_of(4), 0);
    }

    fn string(&mut self, kind: u16, value: &str) {
        let mut bytes = Vec::with_capacity(value.len() + 1);
        bytes.extend_from_slice(value.as_bytes());
        bytes.push(0);
        self.attr(kind, &bytes);
    }

    fn be32(&mut self, kind: u16, value: u32) {
        self.attr(kind, &value.to_be_bytes());
    }

    fn nest_start(&mut self, kind: u16) -> usize {
        let at = self.out.len();
        self.out.extend_from_slice(&[0, 0]);
        self.out.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn nest_end(&mut self, at: usize) {
        let len = self.out.len() - at;
        if len > usize::from(u16::MAX) {
            self.oversized = true;
        }
        self.out[at..at + 2].copy_from_slice(&(len as u16).to_ne_bytes());
    }

    fn nest(&mut self, kind: u16, f: impl FnOnce(&mut Self)) {
        let at = self.nest_start(kind);
        f(self);
        self.nest_end(at);
    }

    /// `NFTA_DATA_VALUE` inside `kind`.
    fn data_value(&mut self, kind: u16, value: &[u8]) {
        self.nest(kind, |e| e.attr(NFTA_DATA_VALUE, value));
    }

    /// `NFTA_DATA_VERDICT` inside `kind`.
    fn data_verdict(&mut self, kind: u16, verdict: &Verdict) {
        let (code, chain) = match verdict {
            Verdict::Drop => (NF_DROP, None),
            Verdict::Return => (NFT_RETURN, None),
            Verdict::Jump(chain) => (NFT_JUMP, Some(chain)),
            Verdict::Goto(chain) => (NFT_GOTO, Some(chain)),
        };
        self.nest(kind, |e| {
            e.nest(NFTA_DATA_VERDICT, |e| {
                e.attr(NFTA_VERDICT_CODE, &code.to_be_bytes());
                if let Some(chain) = chain {
                    e.string(NFTA_VERDICT_CHAIN, chain);
                }
            });
        });
    }
}

/// Commands.
impl Encoder {
    fn command(&mut self, command: &Command) -> Result<(), String> {
        match command {
            Command::AddTable(table) => {
                let at = self.message(NFT_MSG_NEWTABLE, 0, table.family);
                self.string(NFTA_TABLE_NAME, &table.name());
                self.be32(NFTA_TABLE_FLAGS, 0);
                let comment = super::ruleset::TABLE_COMMENT;
                let mut udata = vec![UDATA_TABLE_COMMENT, u8::try_from(comment.len() + 1).unwrap_or(u8::MAX)];
                udata.extend_from_slice(comment.as_bytes());
                udata.push(0);
                self.attr(NFTA_TABLE_USERDATA, &udata);
                self.finish(at);
            }
            Command::DeleteTable(table) => {
                let at = self.message(NFT_MSG_DELTABLE, 0, table.family);
                self.string(NFTA_TABLE_NAME, &table.name());
                self.finish(at);
            }
            Command::AddChain { table, name, hook } => {
                let at = self.message(NFT_MSG_NEWCHAIN, NLM_F_CREATE, table.family);
                self.string(NFTA_CHAIN_TABLE, &table.name());
                self.string(NFTA_CHAIN_NAME, name);
                if let Some(hook) = hook {
                    self.base_chain(hook);
                }
                self.finish(at);
            }
            Command::FlushChain { table, name } => {
                let at = self.message(NFT_MSG_DELRULE, 0, table.family);
                self.string(NFTA_RULE_TABLE, &table.name());
                self.string(NFTA_RULE_CHAIN, name);
                self.finish(at);
            }
            Command::DeleteChain { table, name } => {
                let at = self.message(NFT_MSG_DELCHAIN, 0, table.family);
                self.string(NFTA_CHAIN_TABLE, &table.name());
                self.string(NFTA_CHAIN_NAME, name);
                self.finish(at);
            }
            Command::AddRule { table, chain, rule } => self.rule(*table, chain, rule)?,
            Command::AddSet { table, name, spec } => self.named_set(*table, name, spec)?,
            Command::FlushSet { table, name, .. } => {
                self.empty_sets.insert((*table, name.clone()));
                let at = self.message(NFT_MSG_DELSETELEM, 0, table.family);
                self.string(NFTA_SET_ELEM_LIST_SET, name);
                self.string(NFTA_SET_ELEM_LIST_TABLE, &table.name());
                self.finish(at);
            }
            Command::DeleteSet { table, name, .. } => {
                self.empty_sets.remove(&(*table, name.clone()));
                let at = self.message(NFT_MSG_DELSET, 0, table.family);
                self.string(NFTA_SET_TABLE, &table.name());
                self.string(NFTA_SET_NAME, name);
                self.finish(at);
            }
            Command::AddElements { table, set, elements } => {
                let empty = !elements.is_empty() && self.empty_sets.remove(&(*table, set.clone()));
                let elements = set_elements(table.family, elements, empty)?;
                let id = self.set_ids.get(&(*table, set.clone())).copied();
                self.elements(NFT_MSG_NEWSETELEM, *table, set, id, &elements);
            }
            Command::DeleteElements { table, set, elements } => {
                let elements = set_elements(table.family, elements, false)?;
                self.elements(NFT_MSG_DELSETELEM, *table, set, None, &elements);
            }
        }
        Ok(())
    }

    fn base_chain(&mut self, hook: &Hook) {
        let kind = match hook.kind {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
        };
        let number = match hook.hook {
            HookPoint::Prerouting => 0,
            HookPoint::Input => 1,
            HookPoint::Forward => 2,
            HookPoint::Output => 3,
            HookPoint::Postrouting => 4,
        };
        self.string(NFTA_CHAIN_TYPE, kind);
        self.be32(NFTA_CHAIN_POLICY, NF_ACCEPT);
        self.nest(NFTA_CHAIN_HOOK, |e| {
            e.be32(NFTA_HOOK_HOOKNUM, number);
            e.attr(NFTA_HOOK_PRIORITY, &hook.priority.to_be_bytes());
        });
    }

    fn new_set_id(&mut self) -> u32 {
        let id = self.next_set_id;
        self.next_set_id += 1;
        id
    }

    fn named_set(&mut self, table: Table, name: &str, spec: &SetSpec) -> Result<(), String> {
        let key = Key::of(&spec.key)?;
        if spec.interval && spec.key.len() != 1 {
            return Err("an interval set with a concatenated key".into());
        }
        let id = self.new_set_id();
        self.set_ids.insert((table, name.to_owned()), id);
        self.empty_sets.insert((table, name.to_owned()));
        let mut flags = 0;
        if spec.interval {
            flags |= NFT_SET_INTERVAL;
        }
        if spec.verdict_map {
            flags |= NFT_SET_MAP;
        }
        if spec.timeout_s.is_some() {
            flags |= NFT_SET_TIMEOUT | NFT_SET_EVAL;
        }
        let mut udata = Vec::new();
        udata_u32(&mut udata, UDATA_SET_KEYBYTEORDER, key.byteorder);
        if spec.verdict_map {
            udata_u32(&mut udata, UDATA_SET_DATABYTEORDER, BYTEORDER_INVALID);
        }
        if spec.key.len() > 1 {
            udata_bytes(&mut udata, UDATA_SET_KEY_TYPEOF, &UDATA_CONCAT_TYPEOF);
        }
        if spec.verdict_map {
            udata_u32(&mut udata, UDATA_SET_DATA_INTERVAL, 0);
        }

        let at = self.message(NFT_MSG_NEWSET, NLM_F_CREATE, table.family);
        self.string(NFTA_SET_TABLE, &table.name());
        self.string(NFTA_SET_NAME, name);
        self.be32(NFTA_SET_FLAGS, flags);
        self.be32(NFTA_SET_KEY_TYPE, key.type_id);
        self.be32(NFTA_SET_KEY_LEN, key.len);
        if spec.verdict_map {
            self.be32(NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT);
            self.be32(NFTA_SET_DATA_LEN, 0);
        }
        self.be32(NFTA_SET_ID, id);
        if let Some(timeout) = spec.timeout_s {
            self.attr(NFTA_SET_TIMEOUT, &timeout.saturating_mul(1000).to_be_bytes());
        }
        self.attr(NFTA_SET_USERDATA, &udata);
        self.finish(at);
        Ok(())
    }

    /// An anonymous constant map `__map%d` of numgen results `0..n` (host byte order) to `data`,
    /// with its elements; returns its id.
    fn anonymous_map(&mut self, table: Table, data: AnonData, values: Vec<ElemData>) -> u32 {
        let id = self.new_set_id();
        let mut udata = Vec::new();
        udata_u32(&mut udata, UDATA_SET_KEYBYTEORDER, BYTEORDER_HOST);
        udata_u32(&mut udata, UDATA_SET_DATABYTEORDER, BYTEORDER_INVALID);
        let (data_type, data_len) = match data {
            AnonData::Verdict => {
                udata_bytes(&mut udata, UDATA_SET_DATA_TYPEOF, &UDATA_VERDICT_TYPEOF);
                (NFT_DATA_VERDICT, 0)
            }
            AnonData::AddrPort(family) => {
                let addr = if family == IpFamily::V4 { TYPE_IPADDR } else { TYPE_IP6ADDR };
                ((addr << TYPE_BITS) | TYPE_INET_SERVICE, addr_len(family) + 4)
            }
        };
        udata_u32(&mut udata, UDATA_SET_DATA_INTERVAL, 0);

        let at = self.message(NFT_MSG_NEWSET, NLM_F_CREATE, table.family);
        self.string(NFTA_SET_TABLE, &table.name());
        self.string(NFTA_SET_NAME, "__map%d");
        self.be32(NFTA_SET_FLAGS, NFT_SET_ANONYMOUS | NFT_SET_CONSTANT | NFT_SET_MAP);
        self.be32(NFTA_SET_KEY_TYPE, TYPE_INTEGER);
        self.be32(NFTA_SET_KEY_LEN, 4);
        self.be32(NFTA_SET_DATA_TYPE, data_type);
        self.be32(NFTA_SET_DATA_LEN, data_len);
        self.be32(NFTA_SET_ID, id);
        self.nest(NFTA_SET_DESC, |e| e.be32(NFTA_SET_DESC_SIZE, values.len() as u32));
        self.attr(NFTA_SET_USERDATA, &udata);
        self.finish(at);

        let elements: Vec<Elem> = values
            .into_iter()
            .enumerate()
            .map(|(i, data)| Elem {
                key: (i as u32).to_ne_bytes().to_vec(),
                end: false,
                open: false,
                data: Some(data),
            })
            .collect();
        self.elements(NFT_MSG_NEWSETELEM, table, "__map%d", Some(id), &elements);
        id
    }

    /// `NEWSETELEM`/`DELSETELEM` messages for `elements`, cut at [`ELEMENTS_BYTES`]. No message
    /// at all for no elements (a `DELSETELEM` without elements would flush the set).
    fn elements(&mut self, kind: u16, table: Table, set: &str, id: Option<u32>, elements: &[Elem]) {
        let flags = if kind == NFT_MSG_NEWSETELEM { NLM_F_CREATE } else { 0 };
        let mut rest = elements;
        while !rest.is_empty() {
            let at = self.message(kind, flags, table.family);
            self.string(NFTA_SET_ELEM_LIST_TABLE, &table.name());
            self.string(NFTA_SET_ELEM_LIST_SET, set);
            if let Some(id) = id {
                self.be32(NFTA_SET_ELEM_LIST_SET_ID, id);
            }
            let list = self.nest_start(NFTA_SET_ELEM_LIST_ELEMENTS);
            let mut n = 0;
            while let Some((element, tail)) = rest.split_first() {
                if n > 0 && self.out.len() - list > ELEMENTS_BYTES {
                    break;
                }
                n += 1;
                self.element(n, element);
                rest = tail;
            }
            self.nest_end(list);
            self.finish(at);
        }
    }

    fn element(&mut self, n: u16, element: &Elem) {
        self.nest(n, |e| {
            if element.end {
                e.be32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
            }
            e.data_value(NFTA_SET_ELEM_KEY, &element.key);
            match &element.data {
                Some(ElemData::Verdict(verdict)) => e.data_verdict(NFTA_SET_ELEM_DATA, verdict),
                Some(ElemData::Value(value)) => e.data_value(NFTA_SET_ELEM_DATA, value),
                None => {}
            }
            if element.open {
                let mut udata = Vec::new();
                udata_u32(&mut udata, UDATA_SET_ELEM_FLAGS, UDATA_SET_ELEM_F_INTERVAL_OPEN);
                e.attr(NFTA_SET_ELEM_USERDATA, &udata);
            }
        });
    }
}

fn udata_bytes(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    out.push(kind);
    out.push(value.len() as u8);
    out.extend_from_slice(value);
}

fn udata_u32(out: &mut Vec<u8>, kind: u8, value: u32) {
    udata_bytes(out, kind, &value.to_ne_bytes());
}

/// A set key's type as the kernel and nft's user data see it.
struct Key {
    type_id: u32,
    len: u32,
    byteorder: u32,
}

impl Key {
    fn of(parts: &[KeyType]) -> Result<Self, String> {
        let part = |key: &KeyType| match key {
            KeyType::Ipv4Addr => (TYPE_IPADDR, 4, BYTEORDER_BIG),
            KeyType::Ipv6Addr => (TYPE_IP6ADDR, 16, BYTEORDER_BIG),
            KeyType::InetProto => (TYPE_INET_PROTOCOL, 1, BYTEORDER_INVALID),
            KeyType::InetService => (TYPE_INET_SERVICE, 2, BYTEORDER_BIG),
        };
        match parts {
            [] => Err("a set without a key".into()),
            [one] => {
                let (type_id, len, byteorder) = part(one);
                Ok(Self { type_id, len, byteorder })
            }
            _ => {
                let type_id = parts.iter().fold(0, |acc, p| (acc << TYPE_BITS) | part(p).0);
                let len = parts.iter().map(|p| part(p).1.next_multiple_of(4)).sum();
                Ok(Self { type_id, len, byteorder: BYTEORDER_INVALID })
            }
        }
    }
}

enum AnonData {
    Verdict,
    AddrPort(IpFamily),
}

enum ElemData {
    Verdict(Verdict),
    Value(Vec<u8>),
}

/// One kernel set element: a key, an interval end flag, nft's "open interval" flag, map data.
struct Elem {
    key: Vec<u8>,
    end: bool,
    open: bool,
    data: Option<ElemData>,
}

/// A value as a set key part: its bytes, unpadded.
fn value_bytes(value: &Value, family: IpFamily) -> Result<Vec<u8>, String> {
    match value {
        Value::Addr(addr) => {
            check_family(addr, family)?;
            Ok(ip_bytes(addr))
        }
        Value::Net(net) => Err(format!("network {net} outside an interval set")),
        Value::Proto(p) => Ok(vec![proto_number(*p)]),
        Value::Port(p) => Ok(p.to_be_bytes().to_vec()),
    }
}

/// The first and the last address of a network (or of one address) as big-endian integers.
fn range(value: &Value, family: IpFamily) -> Result<(u128, u128, u32), String> {
    let (addr, prefix) = match value {
        Value::Addr(addr) => (*addr, if addr.is_ipv4() { 32 } else { 128 }),
        Value::Net(net) => (net.addr(), u32::from(net.prefix_len())),
        other => return Err(format!("{other} in an interval set")),
    };
    check_family(&addr, family)?;
    let (bits, value) = match addr {
        IpAddr::V4(a) => (32, u128::from(u32::from(a))),
        IpAddr::V6(a) => (128, u128::from(a)),
    };
    let host = if prefix >= bits { 0 } else { (u128::MAX >> (128 - bits)) >> prefix };
    Ok((value & !host, value | host, bits))
}

fn int_bytes(value: u128, bits: u32) -> Vec<u8> {
    value.to_be_bytes()[16 - (bits / 8) as usize..].to_vec()
}

/// The kernel elements of `elements`: key parts padded to 4 bytes in a concatenation; a network
/// becomes a start and an end element as nft 1.0.6 sends them (sorted; into an empty set, with a
/// leading end at zero when no network starts there).
fn set_elements(family: IpFamily, elements: &[Element], into_empty: bool) -> Result<Vec<Elem>, String> {
    let data = |element: &Element| element.verdict.clone().map(ElemData::Verdict);
    let interval = elements.iter().any(|e| e.key.iter().any(|v| matches!(v, Value::Net(_))));
    if !interval {
        return elements
            .iter()
            .map(|element| {
                let key = match element.key.as_slice() {
                    [one] => value_bytes(one, family)?,
                    parts => {
                        let mut key = Vec::new();
                        for part in parts {
                            key.extend(value_bytes(part, family)?);
                            key.resize(key.len().next_multiple_of(4), 0);
                        }
                        key
                    }
                };
                Ok(Elem { key, end: false, open: false, data: data(element) })
            })
            .collect();
    }
    let mut ranges = Vec::with_capacity(elements.len());
    for element in elements {
        let [value] = element.key.as_slice() else {
            return Err("a network in a concatenated key".into());
        };
        ranges.push((range(value, family)?, data(element)));
    }
    ranges.sort_by_key(|((start, _, _), _)| *start);
    let mut out = Vec::with_capacity(ranges.len() * 2 + 1);
    if into_empty
        && let Some(((start, _, bits), _)) = ranges.first()
        && *start != 0
    {
        out.push(Elem { key: int_bytes(0, *bits), end: true, open: false, data: None });
    }
    for ((start, last, bits), data) in ranges {
        let max = u128::MAX >> (128 - bits);
        let open = last == max;
        out.push(Elem { key: int_bytes(start, bits), end: false, open, data });
        if !open {
            out.push(Elem { key: int_bytes(last + 1, bits), end: true, open: false, data: None });
        }
    }
    Ok(out)
}

/// Rules and their expressions. Inside an expression's data, the attribute numbers are its
/// `NFTA_<EXPRESSION>_*` of `nf_tables.h`, written in the order nft sends them.
impl Encoder {
    fn rule(&mut self, table: Table, chain: &str, rule: &Rule) -> Result<(), String> {
        let family = rule.family;
        if family != table.family {
            return Err(format!("a {family:?} rule in table {table}"));
        }
        // Anonymous maps first: the rule refers to them by id.
        let mut anonymous = Vec::new();
        for stmt in &rule.stmts {
            match stmt {
                Stmt::DnatNumgenMap(targets) => {
                    let mut values = Vec::with_capacity(targets.len());
                    for (addr, port) in targets {
                        check_family(addr, family)?;
                        let mut value = ip_bytes(addr);
                        value.extend_from_slice(&port.to_be_bytes());
                        value.extend_from_slice(&[0, 0]);
                        values.push(ElemData::Value(value));
                    }
                    anonymous.push(self.anonymous_map(table, AnonData::AddrPort(family), values));
                }
                Stmt::NumgenGoto(chains) => {
                    let values = chains.iter().map(|c| ElemData::Verdict(Verdict::Goto(c.clone()))).collect();
                    anonymous.push(self.anonymous_map(table, AnonData::Verdict, values));
                }
                _ => {}
            }
        }
        let mut anonymous = anonymous.into_iter();

        let at = self.message(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, family);
        self.string(NFTA_RULE_TABLE, &table.name());
        self.string(NFTA_RULE_CHAIN, chain);
        let list = self.nest_start(NFTA_RULE_EXPRESSIONS);
        let mut l4proto_tcp = false;
        for stmt in &rule.stmts {
            match stmt {
                Stmt::CtStateNew => self.ct_bit(NFT_CT_STATE, NF_CT_STATE_NEW_BIT),
                Stmt::CtStatusDnat => self.ct_bit(NFT_CT_STATUS, IPS_DST_NAT),
                Stmt::FibLocal(field) => {
                    let flags = if *field == Field::Saddr { NFTA_FIB_F_SADDR } else { NFTA_FIB_F_DADDR };
                    self.expr("fib", |e| {
                        e.be32(3, flags);
                        e.be32(2, NFT_FIB_RESULT_ADDRTYPE);
                        e.be32(1, NFT_REG_1);
                    });
                    self.cmp(NFT_CMP_EQ, &RTN_LOCAL.to_ne_bytes());
                }
                Stmt::Cmp { field, negate, value } => {
                    if *field == Field::L4proto && !negate && *value == Value::Proto(Protocol::Tcp) {
                        l4proto_tcp = true;
                    }
                    self.compare(family, *field, *negate, value)?;
                }
                Stmt::Lookup { fields, set } => {
                    self.load_fields(family, fields)?;
                    let id = self.set_ids.get(&(table, set.clone())).copied();
                    self.lookup(set, id, None);
                }
                Stmt::Vmap { fields, map } => {
                    self.load_fields(family, fields)?;
                    let id = self.set_ids.get(&(table, map.clone())).copied();
                    self.lookup(map, id, Some(NFT_REG_VERDICT));
                }
                Stmt::MarkClear(mask) => {
                    self.meta_load(NFT_META_MARK);
                    self.bitwise(true, &mask.to_ne_bytes(), &[0; 4]);
                    self.cmp(NFT_CMP_EQ, &[0; 4]);
                }
                Stmt::MarkOr(bits) => self.set_mark(!bits, *bits),
                Stmt::MarkXor(bits) => self.set_mark(u32::MAX, *bits),
                Stmt::NumgenIsZero(modulus) => {
                    self.numgen(*modulus);
                    self.cmp(NFT_CMP_EQ, &[0; 4]);
                }
                Stmt::Dnat(addr, port) => {
                    check_family(addr, family)?;
                    self.immediate(NFT_REG_1, &ip_bytes(addr));
                    self.immediate(NFT_REG_2, &port.to_be_bytes());
                    self.dnat(family, NFT_REG_2, Some(NF_NAT_RANGE_PROTO_SPECIFIED));
                }
                Stmt::DnatNumgenMap(targets) => {
                    let id = anonymous.next().ok_or("anonymous map missing")?;
                    self.numgen(targets.len() as u32);
                    self.lookup("__map%d", Some(id), Some(NFT_REG_1));
                    self.dnat(family, register(addr_len(family) / 4), None);
                }
                Stmt::NumgenGoto(chains) => {
                    let id = anonymous.next().ok_or("anonymous map missing")?;
                    self.numgen(chains.len() as u32);
                    self.lookup("__map%d", Some(id), Some(NFT_REG_VERDICT));
                }
                Stmt::UpdateSaddr(set) => {
                    self.load_fields(family, &[Field::Saddr])?;
                    let id = self.set_ids.get(&(table, set.clone())).copied();
                    self.expr("dynset", |e| {
                        e.be32(4, NFT_REG_1);
                        e.be32(3, NFT_DYNSET_OP_UPDATE);
                        e.string(1, set);
                        if let Some(id) = id {
                            e.be32(2, id);
                        }
                    });
                }
                Stmt::Masquerade => self.expr("masq", |e| e.be32(1, NF_NAT_RANGE_PROTO_RANDOM_FULLY)),
                Stmt::RejectTcpReset => {
                    // nft adds the protocol match the reset needs, unless the rule has it.
                    if !l4proto_tcp {
                        self.meta_load(NFT_META_L4PROTO);
                        self.cmp(NFT_CMP_EQ, &[proto_number(Protocol::Tcp)]);
                    }
                    self.reject(NFT_REJECT_TCP_RST, 0);
                }
                Stmt::Reject => {
                    let code = if family == IpFamily::V4 { ICMP_PORT_UNREACH } else { ICMPV6_PORT_UNREACH };
                    self.reject(NFT_REJECT_ICMP_UNREACH, code);
                }
                Stmt::Verdict(verdict) => self.expr("immediate", |e| {
                    e.be32(1, NFT_REG_VERDICT);
                    e.data_verdict(2, verdict);
                }),
            }
        }
        self.nest_end(list);
        self.finish(at);
        Ok(())
    }

    fn expr(&mut self, name: &str, data: impl FnOnce(&mut Self)) {
        self.nest(NFTA_LIST_ELEM, |e| {
            e.string(NFTA_EXPR_NAME, name);
            e.nest(NFTA_EXPR_DATA, data);
        });
    }

    fn payload(&mut self, dreg: u32, base: u32, offset: u32, len: u32) {
        self.expr("payload", |e| {
            e.be32(1, dreg);
            e.be32(2, base);
            e.be32(3, offset);
            e.be32(4, len);
        });
    }

    fn meta_load_into(&mut self, key: u32, dreg: u32) {
        self.expr("meta", |e| {
            e.be32(2, key);
            e.be32(1, dreg);
        });
    }

    fn meta_load(&mut self, key: u32) {
        self.meta_load_into(key, NFT_REG_1);
    }

    fn cmp(&mut self, op: u32, data: &[u8]) {
        self.expr("cmp", |e| {
            e.be32(1, NFT_REG_1);
            e.be32(2, op);
            e.data_value(3, data);
        });
    }

    /// `reg 1 = (reg 1 & mask) ^ xor`; nft sends the operation (boolean) for meta mark only.
    fn bitwise(&mut self, with_op: bool, mask: &[u8], xor: &[u8]) {
        self.expr("bitwise", |e| {
            e.be32(1, NFT_REG_1);
            e.be32(2, NFT_REG_1);
            if with_op {
                e.be32(6, 0);
            }
            e.be32(3, mask.len() as u32);
            e.data_value(4, mask);
            e.data_value(5, xor);
        });
    }

    fn ct_bit(&mut self, key: u32, bit: u32) {
        self.expr("ct", |e| {
            e.be32(2, key);
            e.be32(1, NFT_REG_1);
        });
        self.bitwise(false, &bit.to_ne_bytes(), &[0; 4]);
        self.cmp(NFT_CMP_NEQ, &[0; 4]);
    }

    fn set_mark(&mut self, mask: u32, xor: u32) {
        self.meta_load(NFT_META_MARK);
        self.bitwise(true, &mask.to_ne_bytes(), &xor.to_ne_bytes());
        self.expr("meta", |e| {
            e.be32(2, NFT_META_MARK);
            e.be32(3, NFT_REG_1);
        });
    }

    fn numgen(&mut self, modulus: u32) {
        self.expr("numgen", |e| {
            e.be32(1, NFT_REG_1);
            e.be32(2, modulus);
            e.be32(3, NFT_NG_RANDOM);
            e.be32(4, 0);
        });
    }

    fn immediate(&mut self, dreg: u32, value: &[u8]) {
        self.expr("immediate", |e| {
            e.be32(1, dreg);
            e.data_value(2, value);
        });
    }

    fn dnat(&mut self, family: IpFamily, proto_reg: u32, flags: Option<u32>) {
        self.expr("nat", |e| {
            e.be32(1, NFT_NAT_DNAT);
            e.be32(2, u32::from(family_byte(family)));
            e.be32(3, NFT_REG_1);
            e.be32(5, proto_reg);
            if let Some(flags) = flags {
                e.be32(7, flags);
            }
        });
    }

    fn reject(&mut self, kind: u32, code: u8) {
        self.expr("reject", |e| {
            e.be32(1, kind);
            e.attr(2, &[code]);
        });
    }

    fn lookup(&mut self, set: &str, id: Option<u32>, dreg: Option<u32>) {
        self.expr("lookup", |e| {
            e.be32(2, NFT_REG_1);
            if let Some(dreg) = dreg {
                e.be32(3, dreg);
            }
            e.string(1, set);
            if let Some(id) = id {
                e.be32(4, id);
            }
        });
    }

    /// Loads `field` into `dreg`; returns its length in bytes.
    fn load(&mut self, family: IpFamily, field: Field, dreg: u32, len: Option<u32>) -> u32 {
        let addr = addr_len(family);
        let (saddr, daddr) = if family == IpFamily::V4 { (12, 16) } else { (8, 24) };
        match field {
            Field::Saddr => self.payload(dreg, NFT_PAYLOAD_NETWORK_HEADER, saddr, len.unwrap_or(addr)),
            Field::Daddr => self.payload(dreg, NFT_PAYLOAD_NETWORK_HEADER, daddr, len.unwrap_or(addr)),
            Field::L4proto => {
                self.meta_load_into(NFT_META_L4PROTO, dreg);
                return 1;
            }
            Field::Dport => {
                self.payload(dreg, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
                return 2;
            }
        }
        len.unwrap_or(addr)
    }

    /// Loads a concatenation of fields into consecutive 32-bit registers from register 1.
    fn load_fields(&mut self, family: IpFamily, fields: &[Field]) -> Result<(), String> {
        let mut index = 0;
        for field in fields {
            let len = self.load(family, *field, register(index), None);
            index += len.div_ceil(4);
        }
        if index > 16 { Err("a concatenation longer than the registers".into()) } else { Ok(()) }
    }

    fn compare(&mut self, family: IpFamily, field: Field, negate: bool, value: &Value) -> Result<(), String> {
        let op = if negate { NFT_CMP_NEQ } else { NFT_CMP_EQ };
        match (field, value) {
            (Field::Saddr | Field::Daddr, Value::Addr(addr)) => {
                check_family(addr, family)?;
                self.load(family, field, NFT_REG_1, None);
                self.cmp(op, &ip_bytes(addr));
            }
            (Field::Saddr | Field::Daddr, Value::Net(net)) => {
                check_family(&net.addr(), family)?;
                let bits = addr_len(family) * 8;
                let prefix = u32::from(net.prefix_len());
                let network = ip_bytes(&net.network());
                if prefix == bits {
                    self.load(family, field, NFT_REG_1, None);
                    self.cmp(op, &network);
                } else if prefix > 0 && prefix.is_multiple_of(8) {
                    // nft loads only the prefix's bytes.
                    self.load(family, field, NFT_REG_1, Some(prefix / 8));
                    self.cmp(op, &network[..(prefix / 8) as usize]);
                } else {
                    self.load(family, field, NFT_REG_1, None);
                    let mask = ip_bytes(&net.netmask());
                    self.bitwise(false, &mask, &vec![0; mask.len()]);
                    self.cmp(op, &network);
                }
            }
            (Field::L4proto, Value::Proto(protocol)) => {
                self.load(family, field, NFT_REG_1, None);
                self.cmp(op, &[proto_number(*protocol)]);
            }
            (Field::Dport, Value::Port(port)) => {
                self.load(family, field, NFT_REG_1, None);
                self.cmp(op, &port.to_be_bytes());
            }
            (field, value) => return Err(format!("{value} compared with {field:?}")),
        }
        Ok(())
    }
}

/// A `NETLINK_NETFILTER` socket that applies transactions.
#[derive(Debug)]
pub struct Nftables {
    fd: OwnedFd,
    /// The next sequence number.
    seq: u32,
    send_buffer: usize,
    recv_buffer: usize,
    buf: Vec<u8>,
}

fn apply_error(message: impl Into<String>) -> DataPlaneError {
    DataPlaneError::Apply { tool: TOOL.into(), message: message.into() }
}

/// A command's nft syntax for an error message: trimmed, and cut after a few hundred characters
/// (an element list can be thousands of lines).
fn describe(command: &Command) -> String {
    const MAX: usize = 300;
    let text = command.to_string();
    let text = text.trim();
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{} …", &text[..cut]),
        None => text.to_owned(),
    }
}

fn errno_text(errno: i32) -> String {
    let code = errno.unsigned_abs() as i32;
    format!("{} (errno {code})", std::io::Error::from_raw_os_error(code))
}

impl Nftables {
    /// A socket in the network namespace `netns` (`/run/netns/<name>`), or in ours.
    pub fn open(netns: Option<&str>) -> Result<Self, DataPlaneError> {
        let fd = open_netlink(rustix::net::netlink::NETFILTER, netns)?;
        Ok(Self { fd, seq: 1, send_buffer: 0, recv_buffer: 0, buf: vec![0; RECV_BUFFER] })
    }

    /// Applies `commands` as one transaction: all of them, or (on any error) none.
    pub fn apply(&mut self, commands: &[Command]) -> Result<(), DataPlaneError> {
        let batch = encode(commands, self.seq).map_err(|e| {
            let command = commands.get(e.index).map(describe).unwrap_or_default();
            apply_error(format!("cannot encode \"{command}\": {}", e.reason))
        })?;
        if batch.messages() == 0 {
            return Ok(());
        }
        self.seq = batch.last_seq().wrapping_add(2);
        self.size_buffers(&batch);

        let sent =
            rustix::net::sendto(&self.fd, batch.bytes(), SendFlags::empty(), &SocketAddrNetlink::new(0, 0))
                .map_err(|e| apply_error(format!("send {} bytes: {e}", batch.bytes().len())))?;
        if sent != batch.bytes().len() {
            return Err(apply_error(format!("sent {sent} of {} bytes", batch.bytes().len())));
        }
        self.outcome(&batch, commands)
    }

    /// The send buffer must hold the whole batch (one datagram); the receive buffer the errors
    /// of a batch that fails everywhere. Forced past the system limits when we may (root).
    fn size_buffers(&mut self, batch: &Batch) {
        let send = batch.bytes().len() + 64 * 1024;
        if send > self.send_buffer {
            if sockopt::set_socket_send_buffer_size_force(&self.fd, send).is_err()
                && let Err(error) = sockopt::set_socket_send_buffer_size(&self.fd, send)
            {
                tracing::debug!(%error, "cannot enlarge the nftables netlink send buffer");
            }
            self.send_buffer = send;
        }
        let recv = (batch.messages() * 1024 + batch.bytes().len()).max(1 << 20);
        if recv > self.recv_buffer {
            if sockopt::set_socket_recv_buffer_size_force(&self.fd, recv).is_err()
                && let Err(error) = sockopt::set_socket_recv_buffer_size(&self.fd, recv)
            {
                tracing::debug!(%error, "cannot enlarge the nftables netlink receive buffer");
            }
            self.recv_buffer = recv;
        }
    }

    /// Reads the kernel's answers to `batch` until the acknowledgement of its last message.
    ///
    /// The kernel runs the whole transaction inside `sendto`, so every answer is queued by the
    /// time we read; after a lost answer (`ENOBUFS`) or a failure it reports under `BATCH_BEGIN`
    /// (a failed commit, or no memory for the error list, after which nothing else may come) we
    /// read what is left without waiting.
    fn outcome(&mut self, batch: &Batch, commands: &[Command]) -> Result<(), DataPlaneError> {
        let (first, last) = (batch.begin_seq(), batch.last_seq());
        let ours = |seq: u32| seq.wrapping_sub(first) <= last.wrapping_sub(first);
        let mut errors: Vec<(u32, i32)> = Vec::new();
        let mut acknowledged = false;
        let mut lost = false;
        let mut drain = false;
        while !acknowledged {
            let flags = if drain { RecvFlags::DONTWAIT } else { RecvFlags::empty() };
            let len = match rustix::net::recv(&self.fd, &mut self.buf[..], flags) {
                Ok((len, _)) => len,
                Err(rustix::io::Errno::NOBUFS) => {
                    lost = true;
                    drain = true;
                    continue;
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::AGAIN) if drain => break,
                Err(e) => return Err(apply_error(format!("receive the outcome: {e}"))),
            };
            let replies = parse_messages(&self.buf[..len]).map_err(|e| apply_error(e.to_string()))?;
            for reply in replies {
                let Message::Error { seq, errno } = reply else { continue };
                if !ours(seq) {
                    continue;
                }
                if errno != 0 {
                    errors.push((seq, errno));
                    if seq == first {
                        drain = true;
                    }
                }
                if seq == last {
                    acknowledged = true;
                }
            }
        }
        errors.sort_by_key(|(seq, _)| seq.wrapping_sub(first));
        if let Some(&(seq, errno)) = errors.first() {
            let what = match batch.command_of(seq) {
                Some(index) => format!(
                    "command {} of {} (\"{}\")",
                    index + 1,
                    commands.len(),
                    commands.get(index).map(describe).unwrap_or_default()
                ),
                None => "the transaction's commit".to_owned(),
            };
            let more = match errors.len() - 1 {
                0 => String::new(),
                n => format!("; {n} more errors followed"),
            };
            return Err(apply_error(format!("{what} failed: {}{more}", errno_text(errno))));
        }
        if !acknowledged {
            let why = if lost { "answers were lost (ENOBUFS)" } else { "no acknowledgement came" };
            return Err(apply_error(format!("outcome unknown: {why}")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipvs::netlink::{NLMSG_HDRLEN, attributes};

    fn table() -> Table {
        Table::main(IpFamily::V4)
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
    }

    /// The messages of a batch: (type, flags, seq, nfgenmsg + attributes).
    fn messages(batch: &Batch) -> Vec<(u16, u16, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut bytes = batch.bytes();
        while !bytes.is_empty() {
            let len = u32::from_ne_bytes(bytes[0..4].try_into().expect("len")) as usize;
            let kind = u16::from_ne_bytes([bytes[4], bytes[5]]);
            let flags = u16::from_ne_bytes([bytes[6], bytes[7]]);
            let seq = u32::from_ne_bytes(bytes[8..12].try_into().expect("seq"));
            out.push((kind, flags, seq, bytes[NLMSG_HDRLEN..len].to_vec()));
            bytes = &bytes[len.next_multiple_of(4)..];
        }
        out
    }

    #[test]
    fn a_table_is_framed_by_batch_markers_like_nft_frames_it() {
        let batch = encode(&[Command::AddTable(table())], 100).expect("encode");
        let messages = messages(&batch);
        assert_eq!(messages.len(), 3);
        // BATCH_BEGIN: family 0, version 0, res_id NFNL_SUBSYS_NFTABLES big endian.
        assert_eq!(messages[0], (0x10, 0x1, 100, hex("0000000a")));
        assert_eq!(messages[2], (0x11, 0x1, 102, hex("0000000a")));
        // As `nft --debug=mnl` shows `add table ip fleetproxy { comment "…"; }` (plus our ack).
        let expected = hex(
            "020000000f000100666c65657470726f787900000800020000000000260006000020666c65657470726f78793a20536572766963652070726f78792072756c6573000000",
        );
        assert_eq!(messages[1], (0x0a00, 0x1 | NLM_F_ACK, 101, expected));
        assert_eq!(batch.command_of(101), Some(0));
        assert_eq!(batch.command_of(100), None);
        assert_eq!(batch.command_of(102), None);
    }

    #[test]
    fn a_base_chain_carries_type_policy_and_hook() {
        let hook = Hook { kind: ChainType::Nat, hook: HookPoint::Prerouting, priority: -100 };
        let command = Command::AddChain { table: table(), name: "pre".into(), hook: Some(hook) };
        let batch = encode(&[command], 0).expect("encode");
        let (kind, flags, _, payload) = &messages(&batch)[1];
        assert_eq!((*kind, *flags), (0x0a03, 0x405));
        let expected = hex(
            "020000000f000100666c65657470726f787900000800030070726500080007006e617400080005000000000114000480080001000000000008000200ffffff9c",
        );
        assert_eq!(payload, &expected);
    }

    #[test]
    fn a_concatenated_verdict_map_declares_like_nft() {
        let spec = SetSpec::verdict_map(vec![KeyType::Ipv4Addr, KeyType::InetProto, KeyType::InetService]);
        let batch =
            encode(&[Command::AddSet { table: table(), name: "m1".into(), spec }], 0).expect("encode");
        let (kind, _, _, payload) = &messages(&batch)[1];
        assert_eq!(*kind, 0x0a09);
        let attrs = attributes(&payload[4..]).expect("attributes");
        let get = |k: u16| attrs.iter().find(|(t, _)| *t == k).map(|(_, v)| v.to_vec());
        assert_eq!(get(NFTA_SET_FLAGS), Some(hex("00000008")));
        assert_eq!(get(NFTA_SET_KEY_TYPE), Some(hex("0000730d")));
        assert_eq!(get(NFTA_SET_KEY_LEN), Some(hex("0000000c")));
        assert_eq!(get(NFTA_SET_DATA_TYPE), Some(hex("ffffff00")));
        assert_eq!(get(NFTA_SET_ID), Some(hex("00000001")));
        assert_eq!(
            get(NFTA_SET_USERDATA),
            Some(hex("000400000000 010400000000 030800040d0000000100 060400000000"))
        );
    }

    #[test]
    fn a_dnat_rule_encodes_immediates_and_nat_like_nft() {
        let rule = Rule::new(
            IpFamily::V4,
            vec![
                Stmt::Cmp { field: Field::L4proto, negate: false, value: Value::Proto(Protocol::Tcp) },
                Stmt::Dnat("10.0.0.1".parse().expect("ip"), 80),
            ],
        );
        let batch =
            encode(&[Command::AddRule { table: table(), chain: "c1".into(), rule }], 0).expect("encode");
        let (kind, flags, _, payload) = &messages(&batch)[1];
        assert_eq!((*kind, *flags), (0x0a06, 0xc05));
        // `add rule ip fleetproxy c1 meta l4proto tcp dnat to 10.0.0.1:80`, as nft 1.0.6 sends it.
        let expected = hex(
            "020000000f000100666c65657470726f787900000700020063310000e400048024000180090001006d657461000000\
             0014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108\
             000200000000000c00038005000100060000002c0001800e000100696d6d6564696174650000001800028008000100\
             000000010c000280080001000a0000012c0001800e000100696d6d6564696174650000001800028008000100000000\
             020c000280060001000050000038000180080001006e6174002c000280080001000000000108000200000000020800\
             03000000000108000500000000020800070000000002",
        );
        assert_eq!(payload, &expected);
    }

    #[test]
    fn interval_elements_are_sent_as_starts_and_ends() {
        let elements = ["10.0.0.0/24", "10.0.1.0/24", "255.255.255.255/32"]
            .iter()
            .map(|n| Element { key: vec![Value::Net(n.parse().expect("net"))], verdict: None })
            .collect::<Vec<_>>();
        let elems = set_elements(IpFamily::V4, &elements, true).expect("elements");
        let keys: Vec<(String, bool, bool)> =
            elems.iter().map(|e| (format!("{:02x?}", e.key), e.end, e.open)).collect();
        let k = |s: &str, end: bool, open: bool| (s.to_owned(), end, open);
        assert_eq!(
            keys,
            vec![
                k("[00, 00, 00, 00]", true, false),
                k("[0a, 00, 00, 00]", false, false),
                k("[0a, 00, 01, 00]", true, false),
                k("[0a, 00, 01, 00]", false, false),
                k("[0a, 00, 02, 00]", true, false),
                k("[ff, ff, ff, ff]", false, true),
            ]
        );
        // Deleting, or adding to a set that may have elements, sends no leading end.
        assert_eq!(set_elements(IpFamily::V4, &elements[..1], false).expect("elements").len(), 2);
    }

    #[test]
    fn large_element_lists_are_cut_into_messages() {
        let elements: Vec<Element> = (0..5000u32)
            .map(|i| Element {
                key: vec![
                    Value::Addr(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i))),
                    Value::Proto(Protocol::Tcp),
                    Value::Port(80),
                ],
                verdict: Some(Verdict::Goto(format!("service-{i}"))),
            })
            .collect();
        let command = Command::AddElements { table: table(), set: "m".into(), elements };
        let batch =
            encode(&[Command::FlushChain { table: table(), name: "x".into() }, command], 7).expect("encode");
        assert!(batch.messages() > 5, "{} messages", batch.messages());
        for (_, _, _, payload) in &messages(&batch) {
            assert!(payload.len() < 64 * 1024);
        }
        assert_eq!(batch.command_of(8), Some(0));
        assert_eq!(batch.command_of(batch.last_seq()), Some(1));
    }

    #[test]
    fn empty_element_lists_send_nothing() {
        let delete = Command::DeleteElements { table: table(), set: "s".into(), elements: vec![] };
        assert_eq!(encode(&[delete], 0).expect("encode").messages(), 0);
    }

    #[test]
    fn mismatched_values_are_refused() {
        let rule = Rule::new(
            IpFamily::V4,
            vec![Stmt::Cmp {
                field: Field::Daddr,
                negate: false,
                value: Value::Addr("fd00::1".parse().expect("ip")),
            }],
        );
        let error =
            encode(&[Command::AddRule { table: table(), chain: "c".into(), rule }], 0).expect_err("v6 in v4");
        assert_eq!(error.index, 0);
    }

    #[test]
    fn concatenation_registers_follow_nft() {
        assert_eq!(register(0), 1);
        assert_eq!(register(1), 9);
        assert_eq!(register(2), 10);
        assert_eq!(register(4), 2);
        assert_eq!(register(5), 13);
    }
}
