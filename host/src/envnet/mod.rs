//! TEMPORARY stub: replaced by the real module (helper branch wip-envnet).
#![allow(missing_docs, dead_code, unused_variables)]
use std::net::Ipv4Addr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub net: Ipv4Addr,
    pub prefix: u8,
}
impl Subnet {
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net) + 1)
    }
    pub fn host(&self, n: u32) -> Option<Ipv4Addr> {
        Some(Ipv4Addr::from(u32::from(self.net) + 1 + n))
    }
}
impl std::str::FromStr for Subnet {
    type Err = String;
    fn from_str(s: &str) -> Result<Subnet, String> {
        let (a, p) = s.split_once('/').ok_or("A.B.C.D/N")?;
        Ok(Subnet {
            net: a.parse().map_err(|_| "addr")?,
            prefix: p.parse().map_err(|_| "prefix")?,
        })
    }
}
impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub proto: Proto,
    pub host_port: u16,
    pub guest: Ipv4Addr,
    pub guest_port: u16,
}
impl Forward {
    pub fn parse(s: &str) -> Result<Forward, String> {
        let (ports, proto) = match s.split_once('/') {
            Some((p, "udp")) => (p, Proto::Udp),
            Some((p, "tcp")) | Some((p, "")) => (p, Proto::Tcp),
            None => (s, Proto::Tcp),
            _ => return Err("proto".into()),
        };
        let (h, g) = ports.split_once(':').ok_or("HOST:GUEST")?;
        Ok(Forward {
            proto,
            host_port: h.parse().map_err(|_| "port")?,
            guest: Ipv4Addr::UNSPECIFIED,
            guest_port: g.parse().map_err(|_| "port")?,
        })
    }
}
#[derive(Debug, Clone)]
pub struct EnvNet {
    pub table: String,
    pub bridge: String,
    pub subnet: Subnet,
    pub deny_outgoing: bool,
    pub blacklist: Vec<Ipv4Addr>,
    pub forwards: Vec<Forward>,
}
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NetError(String);
pub fn apply(n: &EnvNet) -> Result<(), NetError> {
    Ok(())
}
pub fn remove_table(n: &str) -> Result<(), NetError> {
    Ok(())
}
pub fn create_bridge(n: &str, gw: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
    Ok(())
}
pub fn create_tap(n: &str, br: &str, uid: u32) -> Result<(), NetError> {
    Ok(())
}
pub fn delete_link(n: &str) -> Result<(), NetError> {
    Ok(())
}
pub fn link_exists(n: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(n).exists()
}
pub fn enable_ip_forward() -> Result<bool, NetError> {
    Ok(false)
}
