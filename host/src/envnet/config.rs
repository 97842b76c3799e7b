//! What an environment's network is: its subnet, its port forwards and
//! its policy ([`EnvNet`]), and the parsers for the first two.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use super::NetError;

/// A subnet or port forward that does not parse; says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("subnet {input:?}: {why} (expected an IPv4 network and a prefix length from 8 to 30, e.g. 10.213.4.0/24)")]
    Subnet { input: String, why: String },
    #[error("port forward {input:?}: {why} (expected HOSTPORT:GUESTPORT[/tcp|/udp], e.g. 8080:80 or 5353:53/udp)")]
    Forward { input: String, why: String },
}

/// An IPv4 subnet of an environment: `net`/`prefix`, e.g. `10.213.4.0/24`.
///
/// Its first address after the network's is the host's, the gateway
/// ([`Subnet::gateway`]); the unikernels take the ones after it
/// ([`Subnet::host`]); the last is the broadcast address. Build one with
/// [`Subnet::new`] or by parsing, which check it; the fields are public
/// for matching and printing, and [`EnvNet::check`] checks them again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Subnet {
    /// The network address (no host bits set).
    pub net: Ipv4Addr,
    /// The prefix length, 8 to 30.
    pub prefix: u8,
}

impl Subnet {
    /// The subnet `net`/`prefix`, if the prefix is 8 to 30 (room for the
    /// gateway and at least one unikernel) and `net` has no host bits.
    pub fn new(net: Ipv4Addr, prefix: u8) -> Result<Subnet, ParseError> {
        let s = Subnet { net, prefix };
        s.problem().map_or(Ok(s), |why| {
            Err(ParseError::Subnet {
                input: format!("{net}/{prefix}"),
                why,
            })
        })
    }

    /// What is wrong with this subnet, if anything.
    fn problem(&self) -> Option<String> {
        if !(8..=30).contains(&self.prefix) {
            return Some(format!("prefix length {} is not from 8 to 30", self.prefix));
        }
        if u32::from(self.net) & !u32::from(self.mask()) != 0 {
            let net = Ipv4Addr::from(u32::from(self.net) & u32::from(self.mask()));
            return Some(format!(
                "host bits are set (did you mean {net}/{}?)",
                self.prefix
            ));
        }
        None
    }

    /// The netmask, e.g. 255.255.255.0 for /24.
    pub fn mask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix.min(32)))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }

    /// The host's address in the subnet, the unikernels' gateway: the
    /// first address after the network's (10.213.4.1 in 10.213.4.0/24).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net).wrapping_add(1))
    }

    /// How many unikernel addresses the subnet has: all but the
    /// network's, the gateway's and the broadcast address.
    pub fn hosts(&self) -> u32 {
        let size = 1u64 << (32 - u32::from(self.prefix.min(32)));
        size.saturating_sub(3).min(u64::from(u32::MAX)) as u32
    }

    /// The address of unikernel `n`, counting from 0: the `n`th address
    /// after the gateway (10.213.4.2 is `host(0)` in 10.213.4.0/24); None
    /// past the last one ([`Subnet::hosts`]).
    pub fn host(&self, n: u32) -> Option<Ipv4Addr> {
        (n < self.hosts()).then(|| Ipv4Addr::from(u32::from(self.net).wrapping_add(2 + n)))
    }

    /// Whether `addr` is in the subnet (network and broadcast addresses
    /// included).
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let mask = u32::from(self.mask());
        u32::from(addr) & mask == u32::from(self.net) & mask
    }

    /// Whether `addr` is one of the unikernels' addresses.
    fn is_host(&self, addr: Ipv4Addr) -> bool {
        let (a, net) = (u32::from(addr), u32::from(self.net));
        self.contains(addr) && a.wrapping_sub(net) >= 2 && a.wrapping_sub(net) - 2 < self.hosts()
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = ParseError;

    /// Parse `A.B.C.D/PREFIX`.
    fn from_str(s: &str) -> Result<Subnet, ParseError> {
        let err = |why: String| ParseError::Subnet {
            input: s.into(),
            why,
        };
        let (net, prefix) = s
            .split_once('/')
            .ok_or_else(|| err("no '/PREFIX'".into()))?;
        let net: Ipv4Addr = net
            .parse()
            .map_err(|_| err(format!("{net:?} is not an IPv4 address")))?;
        // u8's parser takes a leading '+'; a prefix is digits only.
        let prefix = match prefix.bytes().all(|b| b.is_ascii_digit()) {
            true => prefix.parse::<u8>().ok(),
            false => None,
        }
        .ok_or_else(|| {
            err(format!(
                "prefix length {prefix:?} is not a number from 8 to 30"
            ))
        })?;
        Subnet::new(net, prefix).map_err(|e| match e {
            ParseError::Subnet { why, .. } => err(why),
            other => other,
        })
    }
}

/// The transport protocol of a port forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The name nft (and the parser) use: `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A port forward: what reaches one of the host's addresses on
/// `host_port` (`proto`) goes to `guest`:`guest_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Forward {
    pub proto: Proto,
    pub host_port: u16,
    /// The unikernel's address; 0.0.0.0 ([`Ipv4Addr::UNSPECIFIED`]) until
    /// the caller knows it (the parser leaves it so).
    pub guest: Ipv4Addr,
    pub guest_port: u16,
}

impl Forward {
    /// Parse `HOSTPORT:GUESTPORT[/tcp|/udp]` (TCP unless `/udp`); the
    /// guest's address is left unspecified, for [`Forward::to`].
    pub fn parse(s: &str) -> Result<Forward, ParseError> {
        let err = |why: String| ParseError::Forward {
            input: s.into(),
            why,
        };
        let (ports, proto) = match s.split_once('/') {
            None => (s, Proto::Tcp),
            Some((ports, "tcp")) => (ports, Proto::Tcp),
            Some((ports, "udp")) => (ports, Proto::Udp),
            Some((_, other)) => {
                return Err(err(format!("protocol {other:?} is neither tcp nor udp")))
            }
        };
        let (host, guest) = ports
            .split_once(':')
            .ok_or_else(|| err("no ':' between the host port and the guest port".into()))?;
        let port = |what: &str, p: &str| {
            let n = match p.bytes().all(|b| b.is_ascii_digit()) {
                true => p.parse::<u16>().ok().filter(|&n| n != 0),
                false => None,
            };
            n.ok_or_else(|| err(format!("{what} port {p:?} is not a number from 1 to 65535")))
        };
        Ok(Forward {
            proto,
            host_port: port("host", host)?,
            guest: Ipv4Addr::UNSPECIFIED,
            guest_port: port("guest", guest)?,
        })
    }

    /// This forward, to unikernel `guest`.
    pub fn to(self, guest: Ipv4Addr) -> Forward {
        Forward { guest, ..self }
    }
}

impl FromStr for Forward {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Forward, ParseError> {
        Forward::parse(s)
    }
}

impl fmt::Display for Forward {
    /// `8080 -> 10.213.4.2:80/tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {}:{}/{}",
            self.host_port, self.guest, self.guest_port, self.proto
        )
    }
}

/// One environment's network, as the host sets it up: the nftables
/// `table` (which [`super::ruleset`] writes from the rest), the `bridge`
/// the unikernels' TAPs are ports of, the `subnet`, and the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvNet {
    /// The nftables table (family `inet`) that holds every rule of the
    /// environment, e.g. `tt-env-7`.
    pub table: String,
    /// The environment's bridge, e.g. `ttbr7`.
    pub bridge: String,
    pub subnet: Subnet,
    /// Unikernels reach each other and nothing else (neither other
    /// networks nor the host); answers to connections made to them (port
    /// forwards) still pass.
    pub deny_outgoing: bool,
    /// Addresses nothing in the environment may send to.
    pub blacklist: Vec<Ipv4Addr>,
    pub forwards: Vec<Forward>,
}

impl EnvNet {
    /// An environment with no forwards, no blacklist, outgoing allowed.
    pub fn new(table: impl Into<String>, bridge: impl Into<String>, subnet: Subnet) -> EnvNet {
        EnvNet {
            table: table.into(),
            bridge: bridge.into(),
            subnet,
            deny_outgoing: false,
            blacklist: Vec::new(),
            forwards: Vec::new(),
        }
    }

    /// Check the names, the subnet, and that each forward goes to a
    /// unikernel address of the subnet on a port no other forward of the
    /// same protocol takes.
    pub fn check(&self) -> Result<(), NetError> {
        super::validate_table_name(&self.table)?;
        super::validate_ifname(&self.bridge)?;
        let invalid = |why: String| NetError::Invalid {
            table: self.table.clone(),
            why,
        };
        if let Some(why) = self.subnet.problem() {
            return Err(invalid(format!("subnet {}: {why}", self.subnet)));
        }
        for (i, f) in self.forwards.iter().enumerate() {
            if f.host_port == 0 || f.guest_port == 0 {
                return Err(invalid(format!("port forward {f}: port 0")));
            }
            if f.guest.is_unspecified() {
                return Err(invalid(format!(
                    "port forward {f}: no unikernel address given"
                )));
            }
            if !self.subnet.is_host(f.guest) {
                return Err(invalid(format!(
                    "port forward {f}: {} is not a unikernel address of {} ({} to {})",
                    f.guest,
                    self.subnet,
                    self.subnet.host(0).unwrap_or(self.subnet.net),
                    self.subnet
                        .host(self.subnet.hosts().saturating_sub(1))
                        .unwrap_or(self.subnet.net),
                )));
            }
            if let Some(g) = self.forwards[..i]
                .iter()
                .find(|g| g.proto == f.proto && g.host_port == f.host_port)
            {
                return Err(invalid(format!(
                    "port forwards {g} and {f} take the same host port"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn subnet_addresses() {
        let s: Subnet = "10.213.4.0/24".parse().unwrap();
        assert_eq!(s.to_string(), "10.213.4.0/24");
        assert_eq!(s.mask(), ip("255.255.255.0"));
        assert_eq!(s.gateway(), ip("10.213.4.1"));
        assert_eq!(s.host(0), Some(ip("10.213.4.2")));
        assert_eq!(s.hosts(), 253);
        assert_eq!(s.host(252), Some(ip("10.213.4.254")));
        assert_eq!(s.host(253), None, "the broadcast address is nobody's");
        assert_eq!(s.host(u32::MAX), None);
        assert!(s.contains(ip("10.213.4.77")));
        assert!(!s.contains(ip("10.213.5.1")));
        let small = Subnet::new(ip("192.168.9.4"), 30).unwrap();
        assert_eq!(small.gateway(), ip("192.168.9.5"));
        assert_eq!(small.host(0), Some(ip("192.168.9.6")));
        assert_eq!(small.host(1), None);
        let big = Subnet::new(ip("10.0.0.0"), 8).unwrap();
        assert_eq!(big.hosts(), (1 << 24) - 3);
        assert!(big.contains(ip("10.255.255.255")));
    }

    #[test]
    fn subnet_errors_say_what_is_wrong() {
        let err = |s: &str| s.parse::<Subnet>().unwrap_err().to_string();
        assert!(
            err("10.213.4.0").contains("no '/PREFIX'"),
            "{}",
            err("10.213.4.0")
        );
        assert!(err("10.213.4/24").contains("not an IPv4 address"));
        assert!(err("10.213.4.0/+24").contains("not a number"));
        assert!(err("10.213.4.0/300").contains("not a number"));
        assert!(err("10.213.4.0/31").contains("prefix length 31 is not from 8 to 30"));
        assert!(err("10.0.0.0/7").contains("not from 8 to 30"));
        assert!(
            err("10.213.4.9/24").contains("did you mean 10.213.4.0/24?"),
            "{}",
            err("10.213.4.9/24")
        );
        assert!(err("x").contains("e.g. 10.213.4.0/24"));
    }

    #[test]
    fn forward_parses() {
        let f = Forward::parse("8080:80").unwrap();
        assert_eq!(
            f,
            Forward {
                proto: Proto::Tcp,
                host_port: 8080,
                guest: Ipv4Addr::UNSPECIFIED,
                guest_port: 80
            }
        );
        assert_eq!(Forward::parse("8080:80/tcp").unwrap(), f);
        let u: Forward = "5353:53/udp".parse().unwrap();
        assert_eq!((u.proto, u.host_port, u.guest_port), (Proto::Udp, 5353, 53));
        let f = f.to(ip("10.213.4.2"));
        assert_eq!(f.to_string(), "8080 -> 10.213.4.2:80/tcp");
        assert_eq!(Forward::parse("65535:1").unwrap().host_port, 65535);
    }

    #[test]
    fn forward_errors_say_what_is_wrong() {
        let err = |s: &str| Forward::parse(s).unwrap_err().to_string();
        for (input, says) in [
            ("8080", "no ':'"),
            ("8080:80/sctp", "protocol \"sctp\" is neither tcp nor udp"),
            ("8080:80/TCP", "neither tcp nor udp"),
            ("0:80", "host port \"0\" is not a number from 1 to 65535"),
            ("80:65536", "guest port \"65536\""),
            ("+80:80", "host port \"+80\""),
            (":80", "host port \"\""),
            ("80:", "guest port \"\""),
            ("1:2:3", "guest port \"2:3\""),
        ] {
            let e = err(input);
            assert!(e.contains(says), "{input}: {e}");
            assert!(e.contains("HOSTPORT:GUESTPORT[/tcp|/udp]"), "{e}");
        }
    }

    #[test]
    fn check_refuses_what_cannot_work() {
        let s: Subnet = "10.213.4.0/24".parse().unwrap();
        let mut env = EnvNet::new("tt-env-1", "ttbr1", s);
        env.check().unwrap();
        let fwd = Forward::parse("8080:80").unwrap();
        let with = |f: Forward| {
            let mut e = env.clone();
            e.forwards = vec![f];
            e.check().map_err(|e| e.to_string())
        };
        assert!(with(fwd).unwrap_err().contains("no unikernel address"));
        for bad in ["10.213.4.0", "10.213.4.1", "10.213.4.255", "10.9.9.9"] {
            let e = with(fwd.to(ip(bad))).unwrap_err();
            assert!(
                e.contains("is not a unikernel address of 10.213.4.0/24"),
                "{e}"
            );
        }
        with(fwd.to(ip("10.213.4.254"))).unwrap();
        env.forwards = vec![
            fwd.to(ip("10.213.4.2")),
            Forward::parse("8080:81/udp").unwrap().to(ip("10.213.4.3")),
            Forward::parse("8080:82").unwrap().to(ip("10.213.4.3")),
        ];
        let e = env.check().unwrap_err().to_string();
        assert!(e.contains("take the same host port"), "{e}");
        env.forwards.pop();
        env.check().unwrap();
        env.subnet = Subnet {
            net: ip("10.213.4.0"),
            prefix: 31,
        };
        assert!(env
            .check()
            .unwrap_err()
            .to_string()
            .contains("prefix length 31"));
        env.subnet = s;
        env.bridge = "br:0".into();
        assert!(env.check().is_err());
        env.bridge = "ttbr1".into();
        env.table = "1table".into();
        assert!(env.check().is_err());
    }
}
