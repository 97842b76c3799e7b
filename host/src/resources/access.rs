//! Access by subtree: who may act where in the delegation tree.
//!
//! A policy may grant its subtree to Unix users and groups
//! ([`PartialPolicy::users`], [`PartialPolicy::groups`]; `tt-host policy
//! set alice --users 1000 --groups 100`). A grant at path `A` lets those
//! users, and the members of those groups, act on `A`'s subtree:
//! - create, destroy, restart, list, inspect, read the console and stats
//!   of the unikernels whose name is below `A`: the name's path is `A` or
//!   below it (`alice:web`, `alice:bob:web`; not `alice2:web`, nor
//!   `carol:web`);
//! - set and remove the policies at the paths **strictly** below `A`
//!   (`alice:bob`), never `A`'s own policy (which holds the grant and the
//!   limits it was given), nor any path above or beside `A`;
//! - see (`policy show`) the tree at `A` and below: its own limits are
//!   read-only to it, not hidden.
//!
//! Grants are not resources: they are not inherited the way a policy's
//! fields are ([`PartialPolicy::over`] ignores them), and a request is
//! allowed as soon as **any** policy above it grants it, whatever the
//! policies in between say. So a grant cannot be taken away from below:
//! the holder of `alice` who sets `alice:bob --users none` still acts on
//! `alice:bob`. root (uid 0) may do anything, with or without grants.
//!
//! The caller is identified by the daemon (SO_PEERCRED and the peer's
//! supplementary groups) as a [`Caller`]; each check costs O(depth of the
//! path) set lookups and reads nothing from the host.

use super::name::{Name, Path};
use super::policy::PartialPolicy;
use super::tree::Resources;
use std::fmt;

/// Who asks: a process's user, primary group and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Caller {
    /// root (uid 0), who may do anything.
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether `set` (the fields set at one path) grants that path's
    /// subtree to this caller: its uid is in `users`, or its gid or one of
    /// its supplementary groups is in `groups`.
    fn granted_by(&self, set: &PartialPolicy) -> bool {
        set.users.as_ref().is_some_and(|u| u.contains(&self.uid))
            || set
                .groups
                .as_ref()
                .is_some_and(|g| g.contains(&self.gid) || self.groups.iter().any(|x| g.contains(x)))
    }
}

impl fmt::Display for Caller {
    /// `uid 4242`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {}", self.uid)
    }
}

/// Why a caller may not make a request. Displays as one line that names
/// the caller and the path or name refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessRefusal {
    /// No policy at or above the unikernel's path grants the caller.
    #[error(
        "uid {uid} may not act on {name} (no policy at or above {} grants uid {uid} or its groups)",
        .name.path()
    )]
    Unikernel { uid: u32, name: Name },
    /// The root policy: only root may change it.
    #[error("uid {uid} may not change the root policy: only root (uid 0) may")]
    RootPolicy { uid: u32 },
    /// The caller's nearest grant is at `path` itself, which covers only
    /// the paths below it.
    #[error(
        "uid {uid} may not change the policy of {path}: its grant at {path} covers only the paths below it"
    )]
    OwnPolicy { uid: u32, path: Path },
    /// No policy strictly above `path` grants the caller.
    #[error(
        "uid {uid} may not change the policy of {path} (no policy above {path} grants uid {uid} or its groups)"
    )]
    Policy { uid: u32, path: Path },
    /// No policy at or above `path` grants the caller.
    #[error(
        "uid {uid} may not see the policies at {path} (no policy at or above {path} grants uid {uid} or its groups)"
    )]
    Show { uid: u32, path: Path },
}

impl AccessRefusal {
    /// The path refused: the unikernel's path for
    /// [`AccessRefusal::Unikernel`], the root for
    /// [`AccessRefusal::RootPolicy`].
    pub fn path(&self) -> Path {
        match self {
            AccessRefusal::Unikernel { name, .. } => name.path().clone(),
            AccessRefusal::RootPolicy { .. } => Path::root(),
            AccessRefusal::OwnPolicy { path, .. }
            | AccessRefusal::Policy { path, .. }
            | AccessRefusal::Show { path, .. } => path.clone(),
        }
    }
}

impl Resources {
    /// The depth of the shallowest path from the root down to `path`
    /// (included) whose policy grants `caller`; `None`: none does.
    fn granted_at(&self, caller: &Caller, path: &Path) -> Option<usize> {
        self.set_fields_along(path)
            .find(|(_, set)| caller.granted_by(set))
            .map(|(depth, _)| depth)
    }

    /// Whether `caller` may create, destroy, restart, list, inspect, or
    /// read the console or stats of the unikernel `name`: it is root, or a
    /// policy at `name`'s path or above grants it.
    pub fn may_act_on_unikernel(&self, caller: &Caller, name: &Name) -> Result<(), AccessRefusal> {
        if caller.is_root() || self.granted_at(caller, name.path()).is_some() {
            return Ok(());
        }
        Err(AccessRefusal::Unikernel {
            uid: caller.uid,
            name: name.clone(),
        })
    }

    /// Whether `caller` may set or remove the policy at `path`: it is
    /// root, or a policy strictly above `path` grants it. A grant at
    /// `path` itself does not: [`AccessRefusal::OwnPolicy`].
    pub fn may_change_policy(&self, caller: &Caller, path: &Path) -> Result<(), AccessRefusal> {
        if caller.is_root() {
            return Ok(());
        }
        match self.granted_at(caller, path) {
            Some(depth) if depth < path.depth() => Ok(()),
            _ if path.is_root() => Err(AccessRefusal::RootPolicy { uid: caller.uid }),
            Some(_) => Err(AccessRefusal::OwnPolicy {
                uid: caller.uid,
                path: path.clone(),
            }),
            None => Err(AccessRefusal::Policy {
                uid: caller.uid,
                path: path.clone(),
            }),
        }
    }

    /// Whether `caller` may see the tree at `path` and below (`policy
    /// show PATH`): it is root, or a policy at `path` or above grants it.
    pub fn may_show(&self, caller: &Caller, path: &Path) -> Result<(), AccessRefusal> {
        if caller.is_root() || self.granted_at(caller, path).is_some() {
            return Ok(());
        }
        Err(AccessRefusal::Show {
            uid: caller.uid,
            path: path.clone(),
        })
    }

    /// Whether `caller` sees the unikernel `name` in a list: as
    /// [`Resources::may_act_on_unikernel`].
    pub fn visible_to(&self, caller: &Caller, name: &Name) -> bool {
        self.may_act_on_unikernel(caller, name).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Policy, PolicyChange};
    use super::*;
    use std::collections::BTreeSet;

    fn path(s: &str) -> Path {
        s.parse().unwrap()
    }

    fn name(s: &str) -> Name {
        s.parse().unwrap()
    }

    fn host() -> Policy {
        Policy {
            unikernels: 100,
            memory_mb: 8192,
            cpus: [0, 1].into(),
            block_mb: Some(1000),
            bridges: BTreeSet::new(),
        }
    }

    fn user(uid: u32) -> Caller {
        Caller {
            uid,
            gid: uid,
            groups: Vec::new(),
        }
    }

    fn grant(users: &[u32], groups: &[u32]) -> PartialPolicy {
        PartialPolicy {
            users: Some(users.iter().copied().collect()),
            groups: Some(groups.iter().copied().collect()),
            ..PartialPolicy::default()
        }
    }

    /// alice granted to uid 4242, carol to nobody.
    fn tree() -> Resources {
        let mut r = Resources::with_default(host());
        r.set_policy(&path("alice"), grant(&[4242], &[])).unwrap();
        r.set_policy(&path("carol"), PartialPolicy::default())
            .unwrap();
        r
    }

    #[test]
    fn a_grant_covers_its_subtree_and_nothing_beside() {
        let r = tree();
        let u = user(4242);
        for ok in ["alice:web", "alice:bob:web", "alice:bob:x:y:web"] {
            assert_eq!(r.may_act_on_unikernel(&u, &name(ok)), Ok(()), "{ok}");
            assert!(r.visible_to(&u, &name(ok)), "{ok}");
        }
        // The name `alice` itself is at the root, not below alice.
        for refused in ["carol:web", "web", "alice", "alice2:web", "alic:web"] {
            assert!(
                r.may_act_on_unikernel(&u, &name(refused)).is_err(),
                "{refused}"
            );
            assert!(!r.visible_to(&u, &name(refused)), "{refused}");
        }
        assert_eq!(
            r.may_act_on_unikernel(&u, &name("carol:web"))
                .unwrap_err()
                .to_string(),
            "uid 4242 may not act on carol:web (no policy at or above carol grants uid 4242 or its groups)"
        );
        assert_eq!(
            r.may_act_on_unikernel(&u, &name("alice2:web"))
                .unwrap_err()
                .path(),
            path("alice2")
        );
        // Another user gets nothing from alice's grant.
        assert!(r
            .may_act_on_unikernel(&user(4243), &name("alice:web"))
            .is_err());
    }

    #[test]
    fn the_holder_changes_the_policies_strictly_below_its_grant() {
        let mut r = tree();
        let u = user(4242);
        assert_eq!(r.may_change_policy(&u, &path("alice:bob")), Ok(()));
        assert_eq!(r.may_change_policy(&u, &path("alice:bob:x")), Ok(()));
        let e = r.may_change_policy(&u, &path("alice")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "uid 4242 may not change the policy of alice: its grant at alice covers only the paths below it"
        );
        assert_eq!(
            r.may_change_policy(&u, &path("carol")).unwrap_err().to_string(),
            "uid 4242 may not change the policy of carol (no policy above carol grants uid 4242 or its groups)"
        );
        assert!(r.may_change_policy(&u, &path("alice2:bob")).is_err());
        assert_eq!(
            r.may_change_policy(&u, &Path::root())
                .unwrap_err()
                .to_string(),
            "uid 4242 may not change the root policy: only root (uid 0) may"
        );
        // A policy below, even one that grants nobody or the holder itself,
        // can be set and removed by the holder; it never narrows the grant.
        r.set_policy(&path("alice:bob"), grant(&[], &[])).unwrap();
        assert_eq!(r.may_act_on_unikernel(&u, &name("alice:bob:web")), Ok(()));
        assert_eq!(r.may_change_policy(&u, &path("alice:bob")), Ok(()));
        r.remove_policy(&path("alice:bob")).unwrap();
        assert_eq!(r.may_change_policy(&u, &path("alice:bob")), Ok(()));
        // bob granted alice:bob may change alice:bob:x but not alice:bob.
        r.set_policy(&path("alice:bob"), grant(&[5000], &[]))
            .unwrap();
        let bob = user(5000);
        assert_eq!(r.may_change_policy(&bob, &path("alice:bob:x")), Ok(()));
        assert!(matches!(
            r.may_change_policy(&bob, &path("alice:bob")),
            Err(AccessRefusal::OwnPolicy { .. })
        ));
        assert!(r.may_change_policy(&bob, &path("alice:carl")).is_err());
        // Removing alice's policy removes her grant.
        r.remove_policy(&path("alice")).unwrap();
        assert!(r.may_change_policy(&u, &path("alice:bob")).is_err());
        assert!(r.may_act_on_unikernel(&u, &name("alice:web")).is_err());
    }

    #[test]
    fn show_covers_the_grant_and_below() {
        let r = tree();
        let u = user(4242);
        assert_eq!(r.may_show(&u, &path("alice")), Ok(()));
        assert_eq!(r.may_show(&u, &path("alice:bob")), Ok(()));
        for refused in ["(root)", "carol", "alice2"] {
            let p: Path = if refused == "(root)" {
                Path::root()
            } else {
                path(refused)
            };
            assert!(r.may_show(&u, &p).is_err(), "{refused}");
        }
        assert_eq!(
            r.may_show(&u, &path("carol")).unwrap_err().to_string(),
            "uid 4242 may not see the policies at carol (no policy at or above carol grants uid 4242 or its groups)"
        );
    }

    #[test]
    fn a_grant_at_the_root_covers_everything_but_the_root_policy() {
        let mut r = tree();
        r.set_policy(&Path::root(), grant(&[7], &[])).unwrap();
        let u = user(7);
        assert_eq!(r.may_act_on_unikernel(&u, &name("web")), Ok(()));
        assert_eq!(r.may_act_on_unikernel(&u, &name("carol:web")), Ok(()));
        assert_eq!(r.may_change_policy(&u, &path("alice")), Ok(()));
        assert_eq!(r.may_show(&u, &Path::root()), Ok(()));
        assert_eq!(
            r.may_change_policy(&u, &Path::root()),
            Err(AccessRefusal::RootPolicy { uid: 7 })
        );
        // The root grant leaves the root's limits inherited from the host.
        assert_eq!(r.root_policy(), &host());
    }

    #[test]
    fn groups_grant_by_primary_or_supplementary_group() {
        let mut r = Resources::with_default(host());
        r.set_policy(&path("ops"), grant(&[], &[100])).unwrap();
        let primary = Caller {
            uid: 1,
            gid: 100,
            groups: vec![],
        };
        let supplementary = Caller {
            uid: 2,
            gid: 2,
            groups: vec![27, 100],
        };
        let outsider = Caller {
            uid: 3,
            gid: 3,
            groups: vec![27],
        };
        for c in [&primary, &supplementary] {
            assert_eq!(r.may_act_on_unikernel(c, &name("ops:web")), Ok(()));
            assert_eq!(r.may_change_policy(c, &path("ops:team")), Ok(()));
        }
        assert!(r.may_act_on_unikernel(&outsider, &name("ops:web")).is_err());
        // A uid equal to the granted gid is not a member.
        let not_member = Caller {
            uid: 100,
            gid: 5,
            groups: vec![],
        };
        assert!(r
            .may_act_on_unikernel(&not_member, &name("ops:web"))
            .is_err());
    }

    #[test]
    fn root_may_do_anything() {
        let r = Resources::with_default(host());
        let root = user(0);
        assert_eq!(r.may_act_on_unikernel(&root, &name("x:y:web")), Ok(()));
        assert_eq!(r.may_change_policy(&root, &Path::root()), Ok(()));
        assert_eq!(r.may_show(&root, &Path::root()), Ok(()));
        // Without any grant, nobody else may.
        assert!(r.may_act_on_unikernel(&user(1), &name("web")).is_err());
    }

    /// Grants are no resource: a grant alone leaves every limit inherited,
    /// and changing it does not touch them.
    #[test]
    fn grants_are_not_inherited_resources() {
        let mut r = Resources::with_default(host());
        r.set_policy(
            &path("alice"),
            PartialPolicy {
                unikernels: Some(2),
                ..grant(&[4242], &[])
            },
        )
        .unwrap();
        assert_eq!(r.find_policy(&path("alice")).unwrap().unikernels, 2);
        let mut set = r.find_set_fields(&path("alice")).unwrap().clone();
        PolicyChange {
            unset_grants: [super::super::Grantee::Users].into(),
            ..PolicyChange::default()
        }
        .apply(&mut set);
        assert_eq!(set.users, None);
        assert_eq!(set.unikernels, Some(2));
        r.set_policy(&path("alice"), set).unwrap();
        assert!(r
            .may_act_on_unikernel(&user(4242), &name("alice:web"))
            .is_err());
        assert_eq!(r.find_policy(&path("alice")).unwrap().unikernels, 2);
    }
}
