//! Policies (what a path may use), running unikernels' resources, usage
//! sums, and how they are compared and displayed.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;

/// The resources delegated to a path: a ceiling on everything running
/// below it, all together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// How many unikernels may run below the path.
    pub unikernels: u32,
    /// Guest memory, in MB, of all unikernels below the path together.
    pub memory_mb: u64,
    /// CPUs a unikernel below the path may run on.
    pub cpus: BTreeSet<u16>,
    /// Block storage, in MB, of all unikernels below the path together;
    /// `None`: no block storage allowed (`Some(0)` allows devices of 0 MB).
    pub block_mb: Option<u64>,
    /// Bridges a unikernel below the path may attach to.
    pub bridges: BTreeSet<String>,
}

/// A policy as set at a path: a field that is `None` is not set there and
/// is inherited, when each launch is checked, from the nearest policy
/// above that sets it (at the root: from the host's resources). Stored in
/// `state.json` with the fields not set left out; a policy stored by an
/// older tt-host, with every field, reads as one with every field set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unikernels: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<BTreeSet<u16>>,
    /// `Some(None)`: no block storage allowed (stored as `null`, as an
    /// older tt-host stored a full policy's `None`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub block_mb: Option<Option<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridges: Option<BTreeSet<String>>,
    /// Unix users (uids) granted the subtree below this path (see
    /// [`super::access`]). Not a resource: never inherited nor compared,
    /// and absent from the file when not set, so a state file without
    /// grants reads as before and an older tt-host reads one with them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<BTreeSet<u32>>,
    /// Unix groups (gids) granted the subtree below this path, as `users`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<BTreeSet<u32>>,
}

/// A field that is present, `null` included, is set (`Some`); an absent
/// one is left to `#[serde(default)]` (`None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(d).map(Some)
}

impl From<Policy> for PartialPolicy {
    /// Every field set.
    fn from(p: Policy) -> PartialPolicy {
        PartialPolicy {
            unikernels: Some(p.unikernels),
            memory_mb: Some(p.memory_mb),
            cpus: Some(p.cpus),
            block_mb: Some(p.block_mb),
            bridges: Some(p.bridges),
            users: None,
            groups: None,
        }
    }
}

impl PartialPolicy {
    /// The policy in force: the fields set here, the others from `base`
    /// (the policy in force above).
    pub fn over(&self, base: &Policy) -> Policy {
        Policy {
            unikernels: self.unikernels.unwrap_or(base.unikernels),
            memory_mb: self.memory_mb.unwrap_or(base.memory_mb),
            cpus: self.cpus.clone().unwrap_or_else(|| base.cpus.clone()),
            block_mb: self.block_mb.unwrap_or(base.block_mb),
            bridges: self.bridges.clone().unwrap_or_else(|| base.bridges.clone()),
        }
    }

    /// Unset `resource`: inherit it from above.
    pub fn unset(&mut self, resource: Resource) {
        match resource {
            Resource::Unikernels => self.unikernels = None,
            Resource::Memory => self.memory_mb = None,
            Resource::Block => self.block_mb = None,
            Resource::Cpus => self.cpus = None,
            Resource::Bridges => self.bridges = None,
        }
    }

    /// Whether `resource` is set here (not inherited).
    pub fn is_set(&self, resource: Resource) -> bool {
        match resource {
            Resource::Unikernels => self.unikernels.is_some(),
            Resource::Memory => self.memory_mb.is_some(),
            Resource::Block => self.block_mb.is_some(),
            Resource::Cpus => self.cpus.is_some(),
            Resource::Bridges => self.bridges.is_some(),
        }
    }

    /// [`Policy::fits_in`] for the fields set here only: an inherited
    /// field is `outer`'s own (or narrower, from a policy in between).
    pub fn fits_in(&self, outer: &Policy) -> Result<(), FitError> {
        Fields {
            unikernels: self.unikernels,
            memory_mb: self.memory_mb,
            cpus: self.cpus.as_ref(),
            block_mb: self.block_mb,
            bridges: self.bridges.as_ref(),
        }
        .fits_in(outer)
    }
}

/// What `tt-host policy set` changes in the policy at a path: the fields
/// in `set` are set, the resources in `inherit` are unset (then inherited
/// from above), the grants in `unset_grants` are removed; the others stay
/// as they are (on a new policy: not set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyChange {
    pub set: PartialPolicy,
    pub inherit: BTreeSet<Resource>,
    pub unset_grants: BTreeSet<Grantee>,
}

/// Who a policy's access grant names: its `users` or its `groups`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Grantee {
    Users,
    Groups,
}

impl PolicyChange {
    /// `p` with this change made.
    pub fn apply(&self, p: &mut PartialPolicy) {
        let s = &self.set;
        if s.unikernels.is_some() {
            p.unikernels = s.unikernels;
        }
        if s.memory_mb.is_some() {
            p.memory_mb = s.memory_mb;
        }
        if s.cpus.is_some() {
            p.cpus.clone_from(&s.cpus);
        }
        if s.block_mb.is_some() {
            p.block_mb = s.block_mb;
        }
        if s.bridges.is_some() {
            p.bridges.clone_from(&s.bridges);
        }
        if s.users.is_some() {
            p.users.clone_from(&s.users);
        }
        if s.groups.is_some() {
            p.groups.clone_from(&s.groups);
        }
        for r in &self.inherit {
            p.unset(*r);
        }
        for g in &self.unset_grants {
            match g {
                Grantee::Users => p.users = None,
                Grantee::Groups => p.groups = None,
            }
        }
    }
}

/// A policy's fields, borrowed; `None`: not compared.
struct Fields<'a> {
    unikernels: Option<u32>,
    memory_mb: Option<u64>,
    cpus: Option<&'a BTreeSet<u16>>,
    block_mb: Option<Option<u64>>,
    bridges: Option<&'a BTreeSet<String>>,
}

impl Fields<'_> {
    fn fits_in(&self, outer: &Policy) -> Result<(), FitError> {
        if let Some(inner) = self.unikernels.filter(|&n| n > outer.unikernels) {
            return Err(FitError::Unikernels {
                inner,
                outer: outer.unikernels,
            });
        }
        if let Some(inner) = self.memory_mb.filter(|&m| m > outer.memory_mb) {
            return Err(FitError::Memory {
                inner,
                outer: outer.memory_mb,
            });
        }
        match (self.block_mb, outer.block_mb) {
            (Some(Some(inner)), None) => return Err(FitError::NoBlock { inner }),
            (Some(Some(inner)), Some(o)) if inner > o => {
                return Err(FitError::Block { inner, outer: o })
            }
            _ => {}
        }
        if let Some(&cpu) = self.cpus.and_then(|c| c.difference(&outer.cpus).next()) {
            return Err(FitError::Cpu {
                cpu,
                outer: outer.cpus.clone(),
            });
        }
        if let Some(bridge) = self
            .bridges
            .and_then(|b| b.difference(&outer.bridges).next())
        {
            return Err(FitError::Bridge {
                bridge: bridge.clone(),
                outer: outer.bridges.clone(),
            });
        }
        Ok(())
    }
}

/// The resources a running (or to be launched) unikernel takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unikernel {
    /// Guest memory in MB.
    pub memory_mb: u64,
    /// CPUs it may run on: `{N}` when pinned with `--cpu N`, all host CPUs
    /// otherwise.
    pub cpus: BTreeSet<u16>,
    /// Sum of its block devices' sizes, in MB rounded up; 0 = none.
    pub block_mb: u64,
    /// Bridges its network devices attach to.
    pub bridges: BTreeSet<String>,
}

/// What the unikernels running below a path use, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub unikernels: u64,
    pub memory_mb: u64,
    pub block_mb: u64,
}

impl Usage {
    /// `self` plus one unikernel `uk` (saturating; the admission check keeps
    /// real sums below the root policy's limits).
    pub(crate) fn add(&mut self, uk: &Unikernel) {
        self.unikernels = self.unikernels.saturating_add(1);
        self.memory_mb = self.memory_mb.saturating_add(uk.memory_mb);
        self.block_mb = self.block_mb.saturating_add(uk.block_mb);
    }

    /// `self` minus one unikernel `uk` that was added before.
    pub(crate) fn sub(&mut self, uk: &Unikernel) {
        self.unikernels = self.unikernels.saturating_sub(1);
        self.memory_mb = self.memory_mb.saturating_sub(uk.memory_mb);
        self.block_mb = self.block_mb.saturating_sub(uk.block_mb);
    }
}

/// A kind of resource a policy limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Unikernels,
    Memory,
    Block,
    Cpus,
    Bridges,
}

impl Resource {
    /// Unit suffix for amounts of this resource (`" MB"` or nothing).
    pub fn unit(self) -> &'static str {
        match self {
            Resource::Memory | Resource::Block => " MB",
            _ => "",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Unikernels => "unikernels",
            Resource::Memory => "memory",
            Resource::Block => "block",
            Resource::Cpus => "cpus",
            Resource::Bridges => "bridges",
        })
    }
}

/// Why a policy does not fit inside another (see [`Policy::fits_in`]).
/// "inner" is the policy that should fit, "outer" the one it should fit in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FitError {
    #[error("unikernels {inner} exceeds {outer}")]
    Unikernels { inner: u32, outer: u32 },
    #[error("memory {inner} MB exceeds {outer} MB")]
    Memory { inner: u64, outer: u64 },
    #[error("block {inner} MB exceeds {outer} MB")]
    Block { inner: u64, outer: u64 },
    /// The inner policy allows block storage, the outer one none.
    #[error("block {inner} MB where no block storage is allowed")]
    NoBlock { inner: u64 },
    /// The smallest CPU of the inner policy missing from the outer one.
    #[error("cpu {cpu} not in cpus {}", CpuList(.outer))]
    Cpu { cpu: u16, outer: BTreeSet<u16> },
    /// The first bridge of the inner policy missing from the outer one.
    #[error("bridge {bridge} not in bridges {}", BridgeList(.outer))]
    Bridge {
        bridge: String,
        outer: BTreeSet<String>,
    },
}

impl FitError {
    pub fn resource(&self) -> Resource {
        match self {
            FitError::Unikernels { .. } => Resource::Unikernels,
            FitError::Memory { .. } => Resource::Memory,
            FitError::Block { .. } | FitError::NoBlock { .. } => Resource::Block,
            FitError::Cpu { .. } => Resource::Cpus,
            FitError::Bridge { .. } => Resource::Bridges,
        }
    }
}

impl Policy {
    /// Whether everything `self` allows, `outer` allows too: counts, memory
    /// and block no larger, cpus and bridges subsets, and no block storage
    /// where `outer` allows none (`Some(_)` does not fit in `None`). The
    /// error names the first resource that does not fit, in the order
    /// unikernels, memory, block, cpus, bridges.
    pub fn fits_in(&self, outer: &Policy) -> Result<(), FitError> {
        Fields {
            unikernels: Some(self.unikernels),
            memory_mb: Some(self.memory_mb),
            cpus: Some(&self.cpus),
            block_mb: Some(self.block_mb),
            bridges: Some(&self.bridges),
        }
        .fits_in(outer)
    }
}

/// Displays a CPU set compactly: `0-3,6,8-9`; the empty set is `none`.
pub struct CpuList<'a>(pub &'a BTreeSet<u16>);

impl fmt::Display for CpuList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut it = self.0.iter().copied().peekable();
        if it.peek().is_none() {
            return f.write_str("none");
        }
        let mut first = true;
        while let Some(start) = it.next() {
            let mut end = start;
            while it.peek().is_some_and(|&n| Some(n) == end.checked_add(1)) {
                end = it.next().expect("peeked");
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

/// Parses a CPU list as [`CpuList`] displays it: `0-3,6`, or `none` (or
/// nothing) for the empty set.
pub fn parse_cpu_list(s: &str) -> Result<BTreeSet<u16>, CpuListError> {
    let mut out = BTreeSet::new();
    if s == "none" || s.is_empty() {
        return Ok(out);
    }
    for part in s.split(',') {
        let num = |x: &str| {
            crate::text::number::<u16>(x.trim())
                .ok_or_else(|| CpuListError::NotANumber(crate::text::quote(x).into_owned()))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(CpuListError::Backwards(part.to_string()));
                }
                out.extend(a..=b);
            }
            None => {
                out.insert(num(part)?);
            }
        }
    }
    Ok(out)
}

/// Why [`parse_cpu_list`] refused a list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuListError {
    #[error("'{0}' is not a CPU number")]
    NotANumber(String),
    #[error("range '{0}' runs backwards")]
    Backwards(String),
}

/// Displays a bridge set joined by `,`; the empty set is `none`.
pub struct BridgeList<'a>(pub &'a BTreeSet<String>);

impl fmt::Display for BridgeList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(b)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpus(c: &[u16]) -> BTreeSet<u16> {
        c.iter().copied().collect()
    }

    fn bridges(b: &[&str]) -> BTreeSet<String> {
        b.iter().map(|s| s.to_string()).collect()
    }

    fn policy(unikernels: u32, memory_mb: u64, block_mb: Option<u64>) -> Policy {
        Policy {
            unikernels,
            memory_mb,
            cpus: cpus(&[0, 1]),
            block_mb,
            bridges: bridges(&["br0"]),
        }
    }

    #[test]
    fn fits_in_compares_every_resource() {
        let outer = policy(2, 1024, Some(100));
        assert_eq!(policy(2, 1024, Some(100)).fits_in(&outer), Ok(()));
        assert_eq!(policy(1, 10, None).fits_in(&outer), Ok(()));
        assert_eq!(
            policy(3, 10, None).fits_in(&outer),
            Err(FitError::Unikernels { inner: 3, outer: 2 })
        );
        assert_eq!(
            policy(1, 2048, None).fits_in(&outer),
            Err(FitError::Memory {
                inner: 2048,
                outer: 1024
            })
        );
        assert_eq!(
            policy(1, 10, Some(101)).fits_in(&outer),
            Err(FitError::Block {
                inner: 101,
                outer: 100
            })
        );
        assert_eq!(
            policy(1, 10, Some(0)).fits_in(&policy(2, 1024, None)),
            Err(FitError::NoBlock { inner: 0 })
        );
        let mut p = policy(1, 10, None);
        p.cpus = cpus(&[1, 3]);
        let e = p.fits_in(&outer).unwrap_err();
        assert_eq!(e.to_string(), "cpu 3 not in cpus 0-1");
        assert_eq!(e.resource(), Resource::Cpus);
        let mut p = policy(1, 10, None);
        p.bridges = bridges(&["br0", "br9"]);
        assert_eq!(
            p.fits_in(&outer).unwrap_err().to_string(),
            "bridge br9 not in bridges br0"
        );
    }

    /// A policy stored by an older tt-host has every field (copied from
    /// above): it reads as one that sets every field, `null` block as no
    /// block storage. A new one leaves out what it does not set.
    #[test]
    fn partial_policies_store_only_what_is_set_and_read_old_full_ones() {
        let old = r#"{"unikernels":2,"memory_mb":1024,"cpus":[0,1],"block_mb":null,"bridges":[]}"#;
        let p: PartialPolicy = serde_json::from_str(old).unwrap();
        assert_eq!(
            p,
            PartialPolicy::from(Policy {
                bridges: bridges(&[]),
                ..policy(2, 1024, None)
            })
        );
        assert_eq!(p.block_mb, Some(None));
        let p = PartialPolicy {
            memory_mb: Some(64),
            ..PartialPolicy::default()
        };
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, r#"{"memory_mb":64}"#);
        assert_eq!(serde_json::from_str::<PartialPolicy>(&json).unwrap(), p);
        let none = PartialPolicy {
            block_mb: Some(None),
            ..PartialPolicy::default()
        };
        let json = serde_json::to_string(&none).unwrap();
        assert_eq!(serde_json::from_str::<PartialPolicy>(&json).unwrap(), none);
    }

    /// Grants are stored only when set, as lists of ids.
    #[test]
    fn grants_are_stored_only_when_set() {
        let p = PartialPolicy {
            users: Some([1000, 7].into()),
            groups: Some(BTreeSet::new()),
            ..PartialPolicy::default()
        };
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, r#"{"users":[7,1000],"groups":[]}"#);
        assert_eq!(serde_json::from_str::<PartialPolicy>(&json).unwrap(), p);
        let p = PartialPolicy::from(policy(2, 1024, None));
        let json = serde_json::to_string(&p).unwrap();
        assert!(
            !json.contains("users") && !json.contains("groups"),
            "{json}"
        );
    }

    #[test]
    fn a_change_sets_unsets_and_keeps() {
        let mut p = PartialPolicy::from(policy(2, 1024, Some(10)));
        let change = PolicyChange {
            set: PartialPolicy {
                memory_mb: Some(64),
                ..PartialPolicy::default()
            },
            inherit: [Resource::Block, Resource::Bridges].into(),
            ..PolicyChange::default()
        };
        change.apply(&mut p);
        assert_eq!(p.unikernels, Some(2), "kept");
        assert_eq!(p.memory_mb, Some(64), "set");
        assert_eq!((p.block_mb, p.bridges.clone()), (None, None), "unset");
        let base = policy(9, 9, None);
        let now = p.over(&base);
        assert_eq!((now.unikernels, now.memory_mb), (2, 64));
        assert_eq!((now.block_mb, now.bridges), (None, base.bridges));
    }

    #[test]
    fn cpu_lists_parse_what_they_display() {
        for set in [cpus(&[]), cpus(&[3]), cpus(&[0, 1, 2, 3, 6, 8, 9])] {
            assert_eq!(parse_cpu_list(&CpuList(&set).to_string()), Ok(set));
        }
        assert_eq!(
            parse_cpu_list("3-1").unwrap_err().to_string(),
            "range '3-1' runs backwards"
        );
        assert_eq!(
            parse_cpu_list("0,x").unwrap_err().to_string(),
            "'x' is not a CPU number"
        );
    }

    #[test]
    fn lists_display_compactly() {
        assert_eq!(CpuList(&cpus(&[])).to_string(), "none");
        assert_eq!(CpuList(&cpus(&[0])).to_string(), "0");
        assert_eq!(
            CpuList(&cpus(&[0, 1, 2, 3, 6, 8, 9])).to_string(),
            "0-3,6,8-9"
        );
        assert_eq!(CpuList(&cpus(&[65534, 65535])).to_string(), "65534-65535");
        assert_eq!(BridgeList(&bridges(&[])).to_string(), "none");
        assert_eq!(BridgeList(&bridges(&["br1", "br0"])).to_string(), "br0,br1");
    }

    #[test]
    fn usage_saturates() {
        let huge = Unikernel {
            memory_mb: u64::MAX,
            cpus: cpus(&[0]),
            block_mb: u64::MAX,
            bridges: bridges(&[]),
        };
        let mut u = Usage::default();
        u.add(&huge);
        u.add(&huge);
        assert_eq!(u.memory_mb, u64::MAX);
        u.sub(&huge);
        u.sub(&huge);
        u.sub(&huge);
        assert_eq!(u, Usage::default());
    }
}
