//! The host side of an environment's network: its bridge, its unikernels'
//! TAPs and its nftables table.
//!
//! An *environment* is a group of unikernels that share a network. hvt
//! networking is layer 2 (a guest sends and receives Ethernet frames
//! through a TAP), so the host gives each environment:
//!
//! - a Linux bridge ([`create_bridge`]) holding the first address of the
//!   environment's subnet ([`Subnet::gateway`]), the unikernels' gateway;
//! - one persistent TAP per unikernel ([`create_tap`]), a port of that
//!   bridge, which `tt-host run --net:NAME=TAP` then opens; each unikernel
//!   takes an address of the subnet ([`Subnet::host`]);
//! - one nftables table ([`EnvNet::table`], e.g. `tt-env-<id>`) holding
//!   every rule about the environment, so that replacing or removing the
//!   table replaces or removes them all and touches no other
//!   environment's or program's rules.
//!
//! # The table
//!
//! [`ruleset`] writes the table, [`apply`] loads it (`nft -f -`) as one
//! transaction that deletes the old table and creates the new one: the
//! kernel switches from the old rules to the new ones at once, never
//! through a state with none or with both. Its chains:
//!
//! - `prerouting` (nat, dstnat): each [`Forward`] DNATs packets addressed
//!   to one of the host's own addresses (`fib daddr type local`) on the
//!   forward's host port to a unikernel's address and port;
//! - `output` (nat): the same for connections the host itself opens to
//!   one of its own addresses, loopback (`127.0.0.0/8`) excepted: the
//!   kernel drops packets from 127.0.0.1 once they are sent elsewhere;
//! - `postrouting` (nat, srcnat): masquerades what the environment sends
//!   out of the bridge (`ip saddr SUBNET oifname != BRIDGE`), so that the
//!   world needs no route back to the subnet, and what a unikernel sends
//!   through a forward to another unikernel of the environment (so that
//!   the answer comes back through the host, which undoes the DNAT);
//! - `forward` and `input` (filter), present when there is something to
//!   refuse: the blacklist (nothing from the bridge to those addresses,
//!   answers included) and *deny outgoing*. With deny outgoing, packets
//!   coming from the bridge pass only to the bridge again (unikernel to
//!   unikernel) or when they belong to a connection someone else opened
//!   (`ct state established,related`: the answers to a forward, and the
//!   ICMP errors about them); whatever else a unikernel sends to other
//!   networks (`forward`) or to the host itself (`input`) is dropped.
//!
//! The base chains accept by default: the table only refuses what the
//! environment must not do. Another table (a firewall) may still drop
//! what this one accepts. Traffic between two unikernels of the
//! environment is bridged; the host's rules see it only when
//! `br_netfilter` passes bridged packets to them, so the blacklist is for
//! addresses outside the environment. Forwarding needs
//! `net.ipv4.ip_forward` ([`enable_ip_forward`]).
//!
//! Removing a forward stops new connections; connections the kernel
//! already tracks keep their translation until they end.
//!
//! # Programs and system calls
//!
//! The rules go through the `nft` program (Debian's `nftables` package),
//! which the host needs. The links need no program: bridges, TAPs,
//! addresses and flags are the socket and /dev/net/tun ioctls, and
//! [`delete_link`] is one rtnetlink request (RTM_DELLINK), which deletes
//! any kind of link, a TAP a process still holds included. Every function
//! acts on the calling thread's network namespace (and `nft` runs in it).
//!
//! Teardown is [`remove_table`] and [`delete_link`] for the bridge and each
//! TAP. After a crash, [`tables_with_prefix`] and [`links_with_prefix`]
//! find what a previous run left.

mod config;
mod links;
mod rules;

use std::io;

pub use config::{EnvNet, Forward, ParseError, Proto, Subnet};
pub use links::{
    attach_to_bridge, create_bridge, create_tap, delete_link, enable_ip_forward, link_exists,
    links_with_prefix, set_link_up, validate_ifname,
};
pub use rules::{apply, remove_table, ruleset, tables_with_prefix, validate_table_name};

/// Why an environment's network could not be set up or torn down; each
/// names the interface or table concerned.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// An interface name the kernel (or the nft script) cannot take.
    #[error("interface name {name:?} is not valid: {why}")]
    InterfaceName { name: String, why: &'static str },
    /// A table name nft cannot take.
    #[error("nftables table name {name:?} is not valid: 1 to 64 ASCII letters, digits, '-' or '_', starting with a letter")]
    TableName { name: String },
    /// An environment description that makes no sense (a forward to an
    /// address outside the subnet, two forwards of one port, ...).
    #[error("environment network of table {table}: {why}")]
    Invalid { table: String, why: String },
    /// The `nft` program is not installed (or not in PATH, /usr/sbin or
    /// /sbin).
    #[error("cannot run nft to {what} table {table}: program not found; is nftables installed? (apt-get install nftables)")]
    NftMissing { what: &'static str, table: String },
    /// `nft` could not be started or waited for.
    #[error("cannot run nft to {what} table {table}: {source}")]
    NftSpawn {
        what: &'static str,
        table: String,
        #[source]
        source: io::Error,
    },
    /// `nft` refused; `stderr` is what it said.
    #[error("nft failed to {what} table {table} ({status}): {stderr}")]
    Nft {
        what: &'static str,
        table: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// An interface to be created exists already.
    #[error("interface {name} already exists (a leftover? delete it first)")]
    Exists { name: String },
    /// An interface to be used does not exist.
    #[error("interface {name} does not exist")]
    NoSuchLink { name: String },
    /// A system call on interface `name` failed; `source` has the errno.
    #[error("{op} {name}: {source}")]
    Link {
        /// What was being done ("create bridge", "bring up", ...).
        op: String,
        name: String,
        #[source]
        source: io::Error,
    },
    /// /proc/sys/net/ipv4/ip_forward could not be read or written.
    #[error("enable IPv4 forwarding (/proc/sys/net/ipv4/ip_forward): {source}")]
    IpForward {
        #[source]
        source: io::Error,
    },
}
