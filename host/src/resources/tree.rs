//! The delegation tree: policies at paths, running unikernels at names,
//! and the usage below every path, kept up to date on every change.

use super::name::{Label, Name, Path};
use super::policy::{
    BridgeList, CpuList, FitError, PartialPolicy, Policy, Resource, Unikernel, Usage,
};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Why a launch ([`Resources::check`], [`Resources::insert_unikernel`]) or a
/// policy change ([`Resources::set_policy`]) was refused. Displays as one
/// line that starts with the path or name concerned.
///
/// The first four variants refuse a launch on a policy's limits, the next
/// four refuse a name or path for the tree's shape, and the last six refuse
/// a policy change. [`Refusal::policy_path`] and [`Refusal::resource`] give
/// the path and resource without matching on the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The unikernels running below `path` (`in_use`) plus the new one
    /// (`requested`) would exceed `path`'s `limit` on `resource`
    /// (unikernels, memory or block).
    #[error(
        "{path}: {resource}: limit {limit}{u}, in use {in_use}{u}, requested {requested}{u}",
        u = .resource.unit()
    )]
    Exceeded {
        path: Path,
        resource: Resource,
        limit: u64,
        in_use: u64,
        requested: u64,
    },
    /// The unikernel has block storage and `path`'s policy allows none.
    #[error("{path}: block: no block storage allowed, requested {requested} MB")]
    NoBlockAllowed { path: Path, requested: u64 },
    /// The unikernel may run on `cpu`, which `path`'s policy does not allow
    /// (the smallest such cpu).
    #[error("{path}: cpu {cpu} not in allowed cpus {}", CpuList(.allowed))]
    CpuNotAllowed {
        path: Path,
        cpu: u16,
        allowed: BTreeSet<u16>,
    },
    /// The unikernel attaches to `bridge`, which `path`'s policy does not
    /// allow (the first such bridge).
    #[error("{path}: bridge {bridge} not in allowed bridges {}", BridgeList(.allowed))]
    BridgeNotAllowed {
        path: Path,
        bridge: String,
        allowed: BTreeSet<String>,
    },
    /// A unikernel of this name is already running.
    #[error("{name}: already running")]
    AlreadyRunning { name: Name },
    /// The name, read as a path, has a policy or has something below it.
    #[error("{name}: the name is taken by a path with a policy or with something below it")]
    NameIsPath { name: Name },
    /// The name or path asked for lies below the running unikernel
    /// `unikernel`; nothing can be below a unikernel.
    #[error("{unikernel} is a running unikernel, nothing can be placed below it")]
    BelowUnikernel { unikernel: Name },
    /// A policy was asked for at a running unikernel's name.
    #[error("{path}: the path is a running unikernel's name, it cannot have a policy")]
    PathIsUnikernel { path: Path },
    /// The new policy at `path` does not fit in `ancestor`'s policy.
    #[error("{path}: policy does not fit in {ancestor}'s policy: {reason}")]
    ExceedsAncestor {
        path: Path,
        ancestor: Path,
        reason: FitError,
    },
    /// `descendant`'s policy would not fit in the new policy at `path`.
    #[error("{path}: policy would be narrower than {descendant}'s policy: {reason}")]
    NarrowerThanDescendant {
        path: Path,
        descendant: Path,
        reason: FitError,
    },
    /// The unikernels running below `path` use more of `resource`
    /// (unikernels, memory or block) than the new policy's `limit`.
    #[error(
        "{path}: {resource}: limit {limit}{u}, but {in_use}{u} in use by unikernels running below",
        u = .resource.unit()
    )]
    UsageExceeds {
        path: Path,
        resource: Resource,
        limit: u64,
        in_use: u64,
    },
    /// Unikernels running below `path` use block storage and the new policy
    /// allows none.
    #[error("{path}: block: no block storage allowed, but {in_use} MB in use by unikernels running below")]
    BlockInUse { path: Path, in_use: u64 },
    /// A unikernel running below `path` may run on `cpu`, which the new
    /// policy does not allow (the smallest such cpu).
    #[error("{path}: cpu {cpu} is used by a unikernel running below, not in cpus {}", CpuList(.allowed))]
    CpuInUse {
        path: Path,
        cpu: u16,
        allowed: BTreeSet<u16>,
    },
    /// A unikernel running below `path` attaches to `bridge`, which the new
    /// policy does not allow (the first such bridge).
    #[error("{path}: bridge {bridge} is used by a unikernel running below, not in bridges {}", BridgeList(.allowed))]
    BridgeInUse {
        path: Path,
        bridge: String,
        allowed: BTreeSet<String>,
    },
}

impl Refusal {
    /// The path whose policy refused: the ancestor for
    /// [`Refusal::ExceedsAncestor`], the path of the policy being set for
    /// the other policy-change refusals. `None` for the refusals of a name
    /// or path for the tree's shape.
    pub fn policy_path(&self) -> Option<&Path> {
        match self {
            Refusal::Exceeded { path, .. }
            | Refusal::NoBlockAllowed { path, .. }
            | Refusal::CpuNotAllowed { path, .. }
            | Refusal::BridgeNotAllowed { path, .. }
            | Refusal::NarrowerThanDescendant { path, .. }
            | Refusal::UsageExceeds { path, .. }
            | Refusal::BlockInUse { path, .. }
            | Refusal::CpuInUse { path, .. }
            | Refusal::BridgeInUse { path, .. } => Some(path),
            Refusal::ExceedsAncestor { ancestor, .. } => Some(ancestor),
            Refusal::AlreadyRunning { .. }
            | Refusal::NameIsPath { .. }
            | Refusal::BelowUnikernel { .. }
            | Refusal::PathIsUnikernel { .. } => None,
        }
    }

    /// The resource that does not fit; `None` for the refusals of a name or
    /// path for the tree's shape.
    pub fn resource(&self) -> Option<Resource> {
        match self {
            Refusal::Exceeded { resource, .. } | Refusal::UsageExceeds { resource, .. } => {
                Some(*resource)
            }
            Refusal::NoBlockAllowed { .. } | Refusal::BlockInUse { .. } => Some(Resource::Block),
            Refusal::CpuNotAllowed { .. } | Refusal::CpuInUse { .. } => Some(Resource::Cpus),
            Refusal::BridgeNotAllowed { .. } | Refusal::BridgeInUse { .. } => {
                Some(Resource::Bridges)
            }
            Refusal::ExceedsAncestor { reason, .. }
            | Refusal::NarrowerThanDescendant { reason, .. } => Some(reason.resource()),
            Refusal::AlreadyRunning { .. }
            | Refusal::NameIsPath { .. }
            | Refusal::BelowUnikernel { .. }
            | Refusal::PathIsUnikernel { .. } => None,
        }
    }
}

/// Why [`Resources::remove_policy`] removed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemovePolicyError {
    #[error("the root policy cannot be removed, only replaced with set_policy")]
    Root,
    #[error("{path}: there is no policy at this path")]
    NoPolicy { path: Path },
}

/// One position in the tree. A node is either a running unikernel (then it
/// has no policy and no children) or a path (policy optional). Nodes with
/// nothing at or below them are pruned, so a path node without a policy
/// always has children.
#[derive(Debug, Clone, Default)]
struct Node {
    /// The policy in force here: `set` over the policy in force above.
    policy: Option<Policy>,
    /// The fields set here (meaningful while `policy` is `Some`).
    set: PartialPolicy,
    unikernel: Option<Unikernel>,
    /// Sum over the unikernels strictly below this node.
    usage: Usage,
    children: BTreeMap<Label, Node>,
}

impl Node {
    fn child(&self, label: &Label) -> Option<&Node> {
        self.children.get(label.as_str())
    }

    /// The child at `label`, created empty if missing.
    fn child_or_insert(&mut self, label: &Label) -> &mut Node {
        if !self.children.contains_key(label.as_str()) {
            self.children.insert(label.clone(), Node::default());
        }
        self.children
            .get_mut(label.as_str())
            .expect("inserted just above")
    }
}

/// The delegation tree of resource policies and the unikernels running in
/// it. See the [module documentation](super) for the model.
#[derive(Debug, Clone)]
pub struct Resources {
    /// Its `policy` is always `Some`.
    root: Node,
    /// What the root's fields not set are (the host's resources).
    default: Policy,
}

impl Resources {
    /// A tree with `root` as the root path's policy (at the command line,
    /// the host's resources) and nothing else.
    pub fn new(root: Policy) -> Resources {
        Resources {
            root: Node {
                policy: Some(root.clone()),
                set: root.clone().into(),
                ..Node::default()
            },
            default: root,
        }
    }

    /// A tree whose root policy sets nothing: every field is `default`'s
    /// (at the command line, the host's resources), until
    /// [`Resources::set_policy`] at the root sets it.
    pub fn with_default(default: Policy) -> Resources {
        Resources {
            root: Node {
                policy: Some(default.clone()),
                ..Node::default()
            },
            default,
        }
    }

    /// The root path's policy.
    pub fn root_policy(&self) -> &Policy {
        self.root
            .policy
            .as_ref()
            .expect("the root always has a policy")
    }

    fn node(&self, labels: &[Label]) -> Option<&Node> {
        labels.iter().try_fold(&self.root, |n, l| n.child(l))
    }

    /// The policy set at exactly `path`, if any (not an ancestor's).
    pub fn find_policy(&self, path: &Path) -> Option<&Policy> {
        self.node(path.labels())?.policy.as_ref()
    }

    /// The fields set at exactly `path`, if it has a policy: those that
    /// are `None` are inherited ([`Resources::find_policy`] has them).
    pub fn find_set_fields(&self, path: &Path) -> Option<&PartialPolicy> {
        let node = self.node(path.labels())?;
        node.policy.as_ref().map(|_| &node.set)
    }

    /// The fields set (grants included) at every path from the root down
    /// to `path`, both included, that has a policy, each with its depth
    /// (0 for the root), root first. O(depth of `path`).
    pub(super) fn set_fields_along<'a>(
        &'a self,
        path: &'a Path,
    ) -> impl Iterator<Item = (usize, &'a PartialPolicy)> + 'a {
        let mut node = Some(&self.root);
        let mut depth = 0;
        std::iter::from_fn(move || loop {
            let n = node?;
            let at = depth;
            node = path.labels().get(depth).and_then(|l| n.child(l));
            depth += 1;
            if n.policy.is_some() {
                return Some((at, &n.set));
            }
        })
    }

    /// The policy in force just above `path`: that of the nearest path
    /// above with a policy; for the root, the default of its fields.
    fn inherited(&self, path: &Path) -> &Policy {
        if path.is_root() {
            return &self.default;
        }
        let mut node = &self.root;
        let mut nearest = self.root_policy();
        for label in &path.labels()[..path.labels().len() - 1] {
            match node.child(label) {
                Some(child) => node = child,
                None => break,
            }
            if let Some(p) = &node.policy {
                nearest = p;
            }
        }
        nearest
    }

    /// The running unikernel called `name`, if any.
    pub fn find_unikernel(&self, name: &Name) -> Option<&Unikernel> {
        self.node(name.path().labels())?
            .child(name.label())?
            .unikernel
            .as_ref()
    }

    /// What the unikernels running below `path` use together (all zero for
    /// a path with nothing below it). O(depth of `path`).
    pub fn usage(&self, path: &Path) -> Usage {
        self.node(path.labels())
            .map(|n| n.usage)
            .unwrap_or_default()
    }

    /// Dry run of a launch: whether `uk` may start as `name` now. Nothing
    /// changes. O(depth of `name`): it reads the usage kept at each path.
    ///
    /// `Ok(())`: [`Resources::insert_unikernel`] with the same arguments
    /// succeeds, unless the tree changes in between. Otherwise, in the order
    /// checked:
    /// - [`Refusal::BelowUnikernel`]: a prefix of `name` is a running
    ///   unikernel;
    /// - [`Refusal::AlreadyRunning`]: `name` runs already;
    /// - [`Refusal::NameIsPath`]: `name` read as a path has a policy or has
    ///   something below it;
    /// - then for every path from the root down to `name`'s path (root first)
    ///   that has a policy, the first of: [`Refusal::Exceeded`] when the
    ///   unikernels already below that path plus `uk` would exceed its
    ///   unikernel count, memory or block limit; [`Refusal::NoBlockAllowed`]
    ///   when `uk` has block storage and the policy allows none;
    ///   [`Refusal::CpuNotAllowed`] / [`Refusal::BridgeNotAllowed`] when
    ///   `uk`'s cpus / bridges are not a subset of the policy's.
    ///
    /// Every ancestor's policy is checked, so policies delegated to
    /// siblings can never together overcommit their parent.
    pub fn check(&self, name: &Name, uk: &Unikernel) -> Result<(), Refusal> {
        let path = name.path();
        let labels = path.labels();
        let mut parent = Some(&self.root);
        for (i, label) in labels.iter().enumerate() {
            let Some(n) = parent.and_then(|n| n.child(label)) else {
                parent = None;
                break;
            };
            if n.unikernel.is_some() {
                return Err(Refusal::BelowUnikernel {
                    unikernel: Name::new(path.prefix(i), label.clone()),
                });
            }
            parent = Some(n);
        }
        if let Some(at) = parent.and_then(|n| n.child(name.label())) {
            if at.unikernel.is_some() {
                return Err(Refusal::AlreadyRunning { name: name.clone() });
            }
            if at.policy.is_some() || !at.children.is_empty() {
                return Err(Refusal::NameIsPath { name: name.clone() });
            }
        }

        let mut node = &self.root;
        let mut depth = 0;
        loop {
            if let Some(policy) = &node.policy {
                admit(policy, &node.usage, uk).map_err(|e| e.at(path.prefix(depth)))?;
            }
            match labels.get(depth).and_then(|l| node.child(l)) {
                Some(child) => {
                    node = child;
                    depth += 1;
                }
                None => return Ok(()),
            }
        }
    }

    /// Launch: [`Resources::check`], then register `uk` as running under
    /// `name` and add it to the usage of every path above it.
    ///
    /// `Ok(())`: registered; call [`Resources::remove_unikernel`] when it
    /// exits. `Err`: as for `check`, nothing changed and `uk` is dropped.
    pub fn insert_unikernel(&mut self, name: &Name, uk: Unikernel) -> Result<(), Refusal> {
        self.check(name, &uk)?;
        let mut node = &mut self.root;
        node.usage.add(&uk);
        for label in name.path().labels() {
            node = node.child_or_insert(label);
            node.usage.add(&uk);
        }
        node.children.insert(
            name.label().clone(),
            Node {
                unikernel: Some(uk),
                ..Node::default()
            },
        );
        Ok(())
    }

    /// Exit: unregister the unikernel `name` and subtract it from the usage
    /// of every path above it. `Some`: what it used; `None`: nothing runs
    /// under that name, nothing changed. Paths left with no policy and
    /// nothing below are pruned.
    pub fn remove_unikernel(&mut self, name: &Name) -> Option<Unikernel> {
        let labels = name.path().labels();
        self.find_unikernel(name)?;
        let mut node = &mut self.root;
        for label in labels {
            node = node.children.get_mut(label.as_str())?;
        }
        let uk = node
            .children
            .get_mut(name.label().as_str())?
            .unikernel
            .take()?;
        let mut node = &mut self.root;
        node.usage.sub(&uk);
        for label in labels {
            node = node.children.get_mut(label.as_str())?;
            node.usage.sub(&uk);
        }
        self.prune(&name.to_path());
        Some(uk)
    }

    /// Set or replace the policy at `path` (the root included).
    ///
    /// `Ok(())`: `policy` is in force at `path`, replacing any policy there.
    /// Otherwise nothing changed; in the order checked:
    /// - [`Refusal::PathIsUnikernel`] / [`Refusal::BelowUnikernel`]: `path`
    ///   is, or is below, a running unikernel's name;
    /// - [`Refusal::ExceedsAncestor`]: `policy` does not fit
    ///   ([`Policy::fits_in`]) in the policy of a path above (root first);
    /// - [`Refusal::NarrowerThanDescendant`]: the policy of a path below
    ///   (first in path order) does not fit in `policy`;
    /// - [`Refusal::UsageExceeds`], [`Refusal::BlockInUse`],
    ///   [`Refusal::CpuInUse`], [`Refusal::BridgeInUse`]: the unikernels
    ///   running below `path` use more than `policy` allows.
    ///
    /// O(depth) when `policy` is at least as wide as the policy it replaces
    /// (or, for a new one, as the nearest policy above); narrowing also
    /// walks the subtree at `path` to check the policies and unikernels
    /// below.
    ///
    /// A field that `policy` does not set is inherited: it is that of the
    /// policy in force above (for the root: of the default given to
    /// [`Resources::with_default`]), now and whenever that one changes.
    /// Only the fields set are compared with the policies above and
    /// below: an inherited one fits by construction.
    pub fn set_policy(
        &mut self,
        path: &Path,
        policy: impl Into<PartialPolicy>,
    ) -> Result<(), Refusal> {
        let set = policy.into();
        let policy = set.over(self.inherited(path));
        self.check_policy(path, &policy)?;
        let mut node = &mut self.root;
        for label in path.labels() {
            node = node.child_or_insert(label);
        }
        let changed = node.policy.as_ref() != Some(&policy);
        node.set = set;
        node.policy = Some(policy);
        if changed {
            let now = node.policy.clone().expect("set just above");
            inherit_below(node, &now);
        }
        Ok(())
    }

    fn check_policy(&self, path: &Path, policy: &Policy) -> Result<(), Refusal> {
        let labels = path.labels();
        let mut node = Some(&self.root);
        for (i, label) in labels.iter().enumerate() {
            node = node.and_then(|n| n.child(label));
            match node {
                None => break,
                Some(n) if n.unikernel.is_some() => {
                    return Err(if i + 1 == labels.len() {
                        Refusal::PathIsUnikernel { path: path.clone() }
                    } else {
                        Refusal::BelowUnikernel {
                            unikernel: Name::new(path.prefix(i), label.clone()),
                        }
                    });
                }
                Some(_) => {}
            }
        }

        let mut node = &self.root;
        let mut nearest = self.root_policy();
        for (depth, label) in labels.iter().enumerate() {
            if let Some(outer) = &node.policy {
                nearest = outer;
                policy
                    .fits_in(outer)
                    .map_err(|reason| Refusal::ExceedsAncestor {
                        path: path.clone(),
                        ancestor: path.prefix(depth),
                        reason,
                    })?;
            }
            match node.child(label) {
                Some(child) => node = child,
                // Nothing below: no descendants, no usage.
                None => return Ok(()),
            }
        }

        // Every policy below `path`, and every unikernel running below it,
        // fits in `bound` (the policy at `path`, else the nearest above):
        // set_policy and check keep that invariant. So if `bound` fits in
        // the new policy, so does everything below, and the subtree walk
        // is needed only when narrowing.
        let bound = node.policy.as_ref().unwrap_or(nearest);
        let mut below = Below::default();
        if bound.fits_in(policy).is_err() {
            let mut at: Vec<&Label> = labels.iter().collect();
            scan_below(node, &mut at, policy, &mut below).map_err(|e| {
                let (descendant, reason) = *e;
                Refusal::NarrowerThanDescendant {
                    path: path.clone(),
                    descendant,
                    reason,
                }
            })?;
        }

        let usage = &node.usage;
        let over = |resource, limit: u64, in_use: u64| {
            (in_use > limit).then(|| Refusal::UsageExceeds {
                path: path.clone(),
                resource,
                limit,
                in_use,
            })
        };
        if let Some(r) = over(
            Resource::Unikernels,
            u64::from(policy.unikernels),
            usage.unikernels,
        ) {
            return Err(r);
        }
        if let Some(r) = over(Resource::Memory, policy.memory_mb, usage.memory_mb) {
            return Err(r);
        }
        match policy.block_mb {
            None if usage.block_mb > 0 => {
                return Err(Refusal::BlockInUse {
                    path: path.clone(),
                    in_use: usage.block_mb,
                })
            }
            Some(limit) => {
                if let Some(r) = over(Resource::Block, limit, usage.block_mb) {
                    return Err(r);
                }
            }
            None => {}
        }
        if let Some(cpu) = below.cpu {
            return Err(Refusal::CpuInUse {
                path: path.clone(),
                cpu,
                allowed: policy.cpus.clone(),
            });
        }
        if let Some(bridge) = below.bridge {
            return Err(Refusal::BridgeInUse {
                path: path.clone(),
                bridge,
                allowed: policy.bridges.clone(),
            });
        }
        Ok(())
    }

    /// Remove the policy at `path`, leaving what runs below it in place.
    ///
    /// `Ok`: the removed policy. This is always safe: every policy below
    /// still fits in the ancestors' policies and every usage still fits
    /// them, so nothing that runs now is over any remaining limit.
    /// Like albatross, a policy with unikernels or policies below is
    /// removed too (they stay constrained by the policies above).
    /// `Err(Root)`: the root policy can only be replaced with
    /// [`Resources::set_policy`]; `Err(NoPolicy)`: no policy at `path`.
    pub fn remove_policy(&mut self, path: &Path) -> Result<Policy, RemovePolicyError> {
        if path.is_root() {
            return Err(RemovePolicyError::Root);
        }
        let no_policy = || RemovePolicyError::NoPolicy { path: path.clone() };
        let mut node = &mut self.root;
        for label in path.labels() {
            node = node
                .children
                .get_mut(label.as_str())
                .ok_or_else(no_policy)?;
        }
        node.policy.as_ref().ok_or_else(no_policy)?;
        let above = self.inherited(path).clone();
        let mut node = &mut self.root;
        for label in path.labels() {
            node = node
                .children
                .get_mut(label.as_str())
                .expect("walked just above");
        }
        let old = node.policy.take().ok_or_else(no_policy)?;
        node.set = PartialPolicy::default();
        // What inherited from it now inherits from above.
        inherit_below(node, &above);
        self.prune(path);
        Ok(old)
    }

    /// Remove the deepest run of nodes along `labels` that, once the node
    /// at `labels` is empty, would hold nothing.
    fn prune(&mut self, labels: &Path) {
        let labels = labels.labels();
        let mut cut = None;
        let mut node = &self.root;
        for (i, label) in labels.iter().enumerate() {
            let Some(child) = node.child(label) else {
                return;
            };
            let bare = child.policy.is_none() && child.unikernel.is_none();
            let last = i + 1 == labels.len();
            let empty_but_path = if last {
                child.children.is_empty()
            } else {
                child.children.len() == 1
            };
            if bare && empty_but_path {
                cut.get_or_insert(i);
            } else {
                cut = None;
            }
            node = child;
        }
        let Some(cut) = cut else {
            return;
        };
        let mut node = &mut self.root;
        for label in &labels[..cut] {
            node = node
                .children
                .get_mut(label.as_str())
                .expect("walked just above");
        }
        node.children.remove(labels[cut].as_str());
    }

    /// Every path with a policy and its policy, in path order (each path
    /// before the paths below it), the root first.
    pub fn iter_policies(&self) -> impl Iterator<Item = (Path, &Policy)> + '_ {
        Walk::new(&self.root)
            .filter_map(|(labels, node)| node.policy.as_ref().map(|p| (Path::from_tree(labels), p)))
    }

    /// Every running unikernel and its name, in name order (the order of
    /// [`Name`]'s `Ord`: the tree's path order).
    pub fn iter_unikernels(&self) -> impl Iterator<Item = (Name, &Unikernel)> + '_ {
        Walk::new(&self.root).filter_map(|(mut labels, node)| {
            let uk = node.unikernel.as_ref()?;
            let label = labels.pop()?;
            Some((Name::new(Path::from_tree(labels), label), uk))
        })
    }

    /// The subtree at `subtree` as text, one line per path with a policy,
    /// per path between them, and per running unikernel, indented two
    /// spaces a level, names in one column and what they use in the next:
    ///
    /// ```text
    /// (root)   unikernels 2/16  memory 96/8192 MB  block 0/1000 MB  cpus 0-3  bridges br0,br1
    ///   alice  unikernels 1/2  memory 64/1024 MB  block 0/none  cpus 0-1  bridges br0
    ///     bob  unikernels 1/2  memory 64/512 MB  block 0/none  cpus 0-1  bridges br0
    ///       a  running  memory 64 MB  block 0 MB  cpus 0  bridges br0
    ///   dave   no policy  unikernels 1  memory 32 MB  block 0 MB
    ///     b    running  memory 32 MB  block 0 MB  cpus 1  bridges none
    /// ```
    ///
    /// The first line names `subtree` in full. A path with a policy shows
    /// usage/limit (`block 0/none`: no block storage allowed); a path
    /// without one shows its usage only.
    pub fn render(&self, subtree: &Path) -> String {
        let mut lines = Vec::new();
        // Where each field in force comes from, down to `subtree`.
        let mut from = Sources::default();
        from.note(&self.root, &Path::root());
        let mut node = Some(&self.root);
        for (i, label) in subtree.labels().iter().enumerate() {
            node = node.and_then(|n| n.child(label));
            if let Some(n) = node.filter(|_| i + 1 < subtree.labels().len()) {
                from.note(n, &subtree.prefix(i + 1));
            }
        }
        match node {
            Some(node) => {
                let mut at = subtree.labels().to_vec();
                render_node(node, &mut at, subtree.to_string(), 0, &from, &mut lines)
            }
            None => lines.push((
                subtree.to_string(),
                "no policy  unikernels 0  memory 0 MB  block 0 MB".to_string(),
            )),
        }
        let width = lines.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (left, detail) in lines {
            out.push_str(format!("{left:<width$}  {detail}").trim_end());
            out.push('\n');
        }
        out
    }
}

impl fmt::Display for Resources {
    /// The whole tree, as [`Resources::render`] of the root.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(&Path::root()))
    }
}

/// For each resource, the path whose policy sets the value in force at a
/// node; `None`: the root's default (the host's resources).
#[derive(Clone, Default)]
struct Sources {
    from: [Option<Path>; 5],
}

const FIELDS: [Resource; 5] = [
    Resource::Unikernels,
    Resource::Memory,
    Resource::Block,
    Resource::Cpus,
    Resource::Bridges,
];

impl Sources {
    /// Take the fields `node` (at `path`) sets.
    fn note(&mut self, node: &Node, path: &Path) {
        if node.policy.is_none() {
            return;
        }
        for (i, r) in FIELDS.iter().enumerate() {
            if node.set.is_set(*r) {
                self.from[i] = Some(path.clone());
            }
        }
    }

    /// How a field of the policy at `path` shows where it comes from:
    /// nothing when `path` sets it, `(host)` for the root's default, or
    /// `(inherited from P)`.
    fn mark(&self, r: Resource, path: &Path) -> String {
        let i = FIELDS.iter().position(|f| *f == r).expect("every resource");
        match &self.from[i] {
            Some(p) if p == path => String::new(),
            Some(p) if p.is_root() => " (inherited from the root)".into(),
            Some(p) => format!(" (inherited from {p})"),
            None if path.is_root() => " (host)".into(),
            None => " (inherited from the host)".into(),
        }
    }
}

/// `n`, or `unlimited` for `max` (the host default's "no limit").
fn limit<T: PartialEq + fmt::Display>(n: T, max: T) -> String {
    if n == max {
        "unlimited".to_string()
    } else {
        n.to_string()
    }
}

fn render_node(
    node: &Node,
    at: &mut Vec<Label>,
    label: String,
    indent: usize,
    from: &Sources,
    lines: &mut Vec<(String, String)>,
) {
    let u = &node.usage;
    let mut from = from.clone();
    let detail = if let Some(uk) = &node.unikernel {
        format!(
            "running  memory {} MB  block {} MB  cpus {}  bridges {}",
            uk.memory_mb,
            uk.block_mb,
            CpuList(&uk.cpus),
            BridgeList(&uk.bridges)
        )
    } else if let Some(p) = &node.policy {
        let path = Path::from_tree(at.clone());
        from.note(node, &path);
        let m = |r| from.mark(r, &path);
        let block = match p.block_mb {
            Some(l) => format!("{}/{} MB", u.block_mb, limit(l, u64::MAX)),
            None => format!("{}/none", u.block_mb),
        };
        format!(
            "unikernels {}/{}{}  memory {}/{} MB{}  block {block}{}  cpus {}{}  bridges {}{}",
            u.unikernels,
            limit(p.unikernels, u32::MAX),
            m(Resource::Unikernels),
            u.memory_mb,
            p.memory_mb,
            m(Resource::Memory),
            m(Resource::Block),
            CpuList(&p.cpus),
            m(Resource::Cpus),
            BridgeList(&p.bridges),
            m(Resource::Bridges),
        ) + &grants(&node.set)
    } else {
        format!(
            "no policy  unikernels {}  memory {} MB  block {} MB",
            u.unikernels, u.memory_mb, u.block_mb
        )
    };
    lines.push((format!("{:indent$}{label}", ""), detail));
    for (l, child) in &node.children {
        at.push(l.clone());
        render_node(child, at, l.to_string(), indent + 2, &from, lines);
        at.pop();
    }
}

/// A policy's access grants as `policy show` appends them to its line:
/// `  users 1000,1001  groups 100`, `none` for a list set empty, nothing
/// for one not set.
fn grants(set: &PartialPolicy) -> String {
    let mut out = String::new();
    for (what, ids) in [("users", &set.users), ("groups", &set.groups)] {
        if let Some(ids) = ids {
            let list: Vec<String> = ids.iter().map(u32::to_string).collect();
            let list = if list.is_empty() {
                "none".to_string()
            } else {
                list.join(",")
            };
            out.push_str(&format!("  {what} {list}"));
        }
    }
    out
}

/// Make every policy below `node` (whose policy in force is `above`)
/// inherit its fields not set from the nearest policy above it. Recursion
/// depth is bounded by [`super::MAX_DEPTH`].
fn inherit_below(node: &mut Node, above: &Policy) {
    for child in node.children.values_mut() {
        match &child.policy {
            Some(_) => {
                let now = child.set.over(above);
                child.policy = Some(now.clone());
                inherit_below(child, &now);
            }
            None => inherit_below(child, above),
        }
    }
}

/// A launch refusal before the path is known.
enum Over {
    Exceeded(Resource, u64, u64, u64),
    NoBlock(u64),
    Cpu(u16, BTreeSet<u16>),
    Bridge(String, BTreeSet<String>),
}

impl Over {
    fn at(self, path: Path) -> Refusal {
        match self {
            Over::Exceeded(resource, limit, in_use, requested) => Refusal::Exceeded {
                path,
                resource,
                limit,
                in_use,
                requested,
            },
            Over::NoBlock(requested) => Refusal::NoBlockAllowed { path, requested },
            Over::Cpu(cpu, allowed) => Refusal::CpuNotAllowed { path, cpu, allowed },
            Over::Bridge(bridge, allowed) => Refusal::BridgeNotAllowed {
                path,
                bridge,
                allowed,
            },
        }
    }
}

/// Whether `uk` may join the unikernels (using `usage`) below a path with
/// `policy`. Sums are checked: one that overflows is over any limit.
fn admit(policy: &Policy, usage: &Usage, uk: &Unikernel) -> Result<(), Over> {
    let fits = |in_use: u64, requested: u64, limit: u64| {
        in_use.checked_add(requested).is_some_and(|t| t <= limit)
    };
    let limit = u64::from(policy.unikernels);
    if !fits(usage.unikernels, 1, limit) {
        return Err(Over::Exceeded(
            Resource::Unikernels,
            limit,
            usage.unikernels,
            1,
        ));
    }
    if !fits(usage.memory_mb, uk.memory_mb, policy.memory_mb) {
        return Err(Over::Exceeded(
            Resource::Memory,
            policy.memory_mb,
            usage.memory_mb,
            uk.memory_mb,
        ));
    }
    if uk.block_mb > 0 {
        match policy.block_mb {
            None => return Err(Over::NoBlock(uk.block_mb)),
            Some(limit) if !fits(usage.block_mb, uk.block_mb, limit) => {
                return Err(Over::Exceeded(
                    Resource::Block,
                    limit,
                    usage.block_mb,
                    uk.block_mb,
                ))
            }
            Some(_) => {}
        }
    }
    if let Some(&cpu) = uk.cpus.difference(&policy.cpus).next() {
        return Err(Over::Cpu(cpu, policy.cpus.clone()));
    }
    if let Some(bridge) = uk.bridges.difference(&policy.bridges).next() {
        return Err(Over::Bridge(bridge.clone(), policy.bridges.clone()));
    }
    Ok(())
}

/// What unikernels below a path use that a new policy there does not allow.
#[derive(Default)]
struct Below {
    /// The smallest such cpu.
    cpu: Option<u16>,
    /// The smallest such bridge.
    bridge: Option<String>,
}

/// Walk the subtree below `node` (whose labels are `at`) in path order:
/// the first policy that does not fit in `policy` is an error; the cpus and
/// bridges of unikernels that `policy` does not allow are noted in `below`.
/// Recursion depth is bounded by [`super::MAX_DEPTH`].
fn scan_below<'a>(
    node: &'a Node,
    at: &mut Vec<&'a Label>,
    policy: &Policy,
    below: &mut Below,
) -> Result<(), Box<(Path, FitError)>> {
    for (label, child) in &node.children {
        if let Some(uk) = &child.unikernel {
            if !uk.cpus.is_subset(&policy.cpus) {
                if let Some(&cpu) = uk.cpus.difference(&policy.cpus).next() {
                    below.cpu = Some(below.cpu.map_or(cpu, |c| c.min(cpu)));
                }
            }
            if !uk.bridges.is_subset(&policy.bridges) {
                if let Some(bridge) = uk.bridges.difference(&policy.bridges).next() {
                    if below.bridge.as_ref().is_none_or(|b| bridge < b) {
                        below.bridge = Some(bridge.clone());
                    }
                }
            }
            // A unikernel has nothing below it.
            continue;
        }
        at.push(label);
        if child.policy.is_some() {
            // Its inherited fields will follow `policy`.
            if let Err(e) = child.set.fits_in(policy) {
                let path = Path::from_tree(at.iter().map(|l| (*l).clone()).collect());
                return Err(Box::new((path, e)));
            }
        }
        scan_below(child, at, policy, below)?;
        at.pop();
    }
    Ok(())
}

/// Pre-order walk of the tree in path order, yielding each node with its
/// labels from the root.
struct Walk<'a> {
    /// Nodes to visit, the next on top, each with its depth.
    stack: Vec<(usize, Option<&'a Label>, &'a Node)>,
    labels: Vec<Label>,
}

impl<'a> Walk<'a> {
    fn new(root: &'a Node) -> Walk<'a> {
        Walk {
            stack: vec![(0, None, root)],
            labels: Vec::new(),
        }
    }
}

impl<'a> Iterator for Walk<'a> {
    type Item = (Vec<Label>, &'a Node);

    fn next(&mut self) -> Option<Self::Item> {
        let (depth, label, node) = self.stack.pop()?;
        // `depth` is at least 1 for every node but the root.
        self.labels.truncate(depth.saturating_sub(1));
        if let Some(label) = label {
            self.labels.push(label.clone());
        }
        for (l, child) in node.children.iter().rev() {
            self.stack.push((depth + 1, Some(l), child));
        }
        Some((self.labels.clone(), node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> Path {
        s.parse().unwrap()
    }

    fn name(s: &str) -> Name {
        s.parse().unwrap()
    }

    fn set<T: Ord + Clone>(items: &[T]) -> BTreeSet<T> {
        items.iter().cloned().collect()
    }

    fn bridges(b: &[&str]) -> BTreeSet<String> {
        b.iter().map(|s| s.to_string()).collect()
    }

    /// A policy for `unikernels` unikernels of up to 1024 MB in all, cpus
    /// 0-1, bridge br0, no block storage.
    fn policy(unikernels: u32) -> Policy {
        Policy {
            unikernels,
            memory_mb: 1024,
            cpus: set(&[0, 1]),
            block_mb: None,
            bridges: bridges(&["br0"]),
        }
    }

    fn host() -> Policy {
        Policy {
            unikernels: 100,
            memory_mb: 8192,
            cpus: set(&[0, 1, 2, 3]),
            block_mb: Some(1000),
            bridges: bridges(&["br0", "br1"]),
        }
    }

    /// 32 MB on cpu 0, no block, bridge br0.
    fn uk() -> Unikernel {
        Unikernel {
            memory_mb: 32,
            cpus: set(&[0]),
            block_mb: 0,
            bridges: bridges(&["br0"]),
        }
    }

    #[test]
    fn siblings_cannot_overcommit_their_parent() {
        let mut r = Resources::new(host());
        r.set_policy(&path("alice"), policy(2)).unwrap();
        // Each delegation fits in alice's on its own.
        r.set_policy(&path("alice:bob"), policy(2)).unwrap();
        r.set_policy(&path("alice:charlie"), policy(2)).unwrap();
        r.insert_unikernel(&name("alice:bob:a"), uk()).unwrap();
        r.insert_unikernel(&name("alice:charlie:b"), uk()).unwrap();
        let refusal = r.insert_unikernel(&name("alice:bob:c"), uk()).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::Exceeded {
                path: path("alice"),
                resource: Resource::Unikernels,
                limit: 2,
                in_use: 2,
                requested: 1,
            }
        );
        assert_eq!(refusal.policy_path(), Some(&path("alice")));
        assert_eq!(refusal.resource(), Some(Resource::Unikernels));
        assert_eq!(
            refusal.to_string(),
            "alice: unikernels: limit 2, in use 2, requested 1"
        );
        assert_eq!(r.usage(&path("alice:bob")).unikernels, 1);
        assert_eq!(r.usage(&path("alice")).unikernels, 2);
        assert_eq!(r.usage(&Path::root()).memory_mb, 64);

        assert_eq!(r.remove_unikernel(&name("alice:charlie:b")), Some(uk()));
        assert_eq!(r.remove_unikernel(&name("alice:charlie:b")), None);
        r.insert_unikernel(&name("alice:bob:c"), uk()).unwrap();
        assert_eq!(r.usage(&path("alice:bob")).unikernels, 2);
        assert!(r.find_unikernel(&name("alice:bob:c")).is_some());
    }

    #[test]
    fn launch_refusals_name_path_resource_limit_and_usage() {
        let mut r = Resources::new(host());
        let mut alice = policy(4);
        alice.memory_mb = 100;
        alice.block_mb = Some(10);
        alice.cpus = set(&[0, 1, 2, 3]);
        r.set_policy(&path("alice"), alice).unwrap();
        r.set_policy(&path("alice:bob"), policy(4)).unwrap_err();
        let mut bob = policy(4);
        bob.memory_mb = 100;
        bob.cpus = set(&[0, 1]);
        r.set_policy(&path("alice:bob"), bob).unwrap();
        r.insert_unikernel(&name("alice:web"), uk()).unwrap();

        let mut big = uk();
        big.memory_mb = 80;
        let e = r.check(&name("alice:bob:x"), &big).unwrap_err();
        assert_eq!(
            e.to_string(),
            "alice: memory: limit 100 MB, in use 32 MB, requested 80 MB"
        );

        let mut pinned = uk();
        pinned.cpus = set(&[3]);
        let e = r.check(&name("alice:bob:x"), &pinned).unwrap_err();
        assert_eq!(e.to_string(), "alice:bob: cpu 3 not in allowed cpus 0-1");
        assert_eq!(e.resource(), Some(Resource::Cpus));

        // Unpinned, it may run on every host cpu; bob allows two.
        let mut unpinned = uk();
        unpinned.cpus = set(&[0, 1, 2, 3]);
        r.check(&name("alice:web2"), &unpinned).unwrap();
        let e = r.check(&name("alice:bob:x"), &unpinned).unwrap_err();
        assert_eq!(e.to_string(), "alice:bob: cpu 2 not in allowed cpus 0-1");
        // Policies are checked root first.
        unpinned.cpus = set(&[0, 4, 5]);
        let e = r.check(&name("alice:bob:x"), &unpinned).unwrap_err();
        assert_eq!(e.to_string(), "(root): cpu 4 not in allowed cpus 0-3");

        let mut net = uk();
        net.bridges = bridges(&["br0", "br1"]);
        let e = r.check(&name("alice:x"), &net).unwrap_err();
        assert_eq!(
            e.to_string(),
            "alice: bridge br1 not in allowed bridges br0"
        );
        assert_eq!(e.resource(), Some(Resource::Bridges));

        // alice allows 10 MB of block storage; bob allows none.
        let mut disk = uk();
        disk.block_mb = 8;
        r.check(&name("alice:x"), &disk).unwrap();
        let e = r.check(&name("alice:bob:x"), &disk).unwrap_err();
        assert_eq!(
            e,
            Refusal::NoBlockAllowed {
                path: path("alice:bob"),
                requested: 8
            }
        );
        assert_eq!(
            e.to_string(),
            "alice:bob: block: no block storage allowed, requested 8 MB"
        );
        r.insert_unikernel(&name("alice:x"), disk.clone()).unwrap();
        let e = r.check(&name("alice:y"), &disk).unwrap_err();
        assert_eq!(
            e.to_string(),
            "alice: block: limit 10 MB, in use 8 MB, requested 8 MB"
        );
        // A unikernel without block storage is fine under block None.
        r.check(&name("alice:bob:x"), &uk()).unwrap();
    }

    #[test]
    fn the_root_policy_is_checked_too() {
        let mut r = Resources::new(Policy {
            unikernels: 1,
            ..host()
        });
        r.set_policy(&path("alice"), policy(1)).unwrap();
        r.insert_unikernel(&name("web"), uk()).unwrap();
        let e = r.check(&name("alice:web"), &uk()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "(root): unikernels: limit 1, in use 1, requested 1"
        );
        assert_eq!(e.policy_path(), Some(&Path::root()));
    }

    #[test]
    fn huge_requests_are_refused_not_wrapped() {
        let mut r = Resources::new(Policy {
            unikernels: u32::MAX,
            memory_mb: u64::MAX,
            block_mb: Some(u64::MAX),
            ..host()
        });
        let mut huge = uk();
        huge.memory_mb = u64::MAX;
        huge.block_mb = u64::MAX;
        r.insert_unikernel(&name("a"), huge.clone()).unwrap();
        let e = r.check(&name("b"), &huge).unwrap_err();
        assert_eq!(
            e,
            Refusal::Exceeded {
                path: Path::root(),
                resource: Resource::Memory,
                limit: u64::MAX,
                in_use: u64::MAX,
                requested: u64::MAX,
            }
        );
        let mut one = uk();
        one.memory_mb = 0;
        one.block_mb = 1;
        let e = r.check(&name("b"), &one).unwrap_err();
        assert_eq!(e.resource(), Some(Resource::Block));
        one.block_mb = 0;
        r.insert_unikernel(&name("b"), one).unwrap();
        assert_eq!(r.usage(&Path::root()).memory_mb, u64::MAX);
        r.remove_unikernel(&name("a")).unwrap();
        assert_eq!(
            r.usage(&Path::root()),
            Usage {
                unikernels: 1,
                memory_mb: 0,
                block_mb: 0
            }
        );
    }

    #[test]
    fn names_and_paths_do_not_overlap() {
        let mut r = Resources::new(host());
        r.set_policy(&path("alice"), policy(4)).unwrap();
        r.insert_unikernel(&name("alice:web"), uk()).unwrap();

        let e = r.check(&name("alice:web"), &uk()).unwrap_err();
        assert_eq!(
            e,
            Refusal::AlreadyRunning {
                name: name("alice:web")
            }
        );
        assert_eq!(e.to_string(), "alice:web: already running");
        assert_eq!(e.policy_path(), None);

        // A name that is a path with a policy, or with something below it.
        let e = r.check(&name("alice"), &uk()).unwrap_err();
        assert_eq!(
            e,
            Refusal::NameIsPath {
                name: name("alice")
            }
        );
        r.insert_unikernel(&name("bob:web"), uk()).unwrap();
        let e = r.check(&name("bob"), &uk()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "bob: the name is taken by a path with a policy or with something below it"
        );

        // Nothing below a running unikernel.
        let e = r.check(&name("alice:web:x"), &uk()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "alice:web is a running unikernel, nothing can be placed below it"
        );
        let e = r.set_policy(&path("alice:web:x:y"), policy(1)).unwrap_err();
        assert_eq!(
            e,
            Refusal::BelowUnikernel {
                unikernel: name("alice:web")
            }
        );
        let e = r.set_policy(&path("alice:web"), policy(1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "alice:web: the path is a running unikernel's name, it cannot have a policy"
        );
        // Once it exits, the name is free to become a path.
        r.remove_unikernel(&name("alice:web")).unwrap();
        r.set_policy(&path("alice:web"), policy(1)).unwrap();
    }

    #[test]
    fn set_policy_refusals() {
        let mut r = Resources::new(host());
        r.set_policy(&path("alice"), policy(2)).unwrap();

        // Too big for the parent.
        let e = r.set_policy(&path("alice:bob"), policy(3)).unwrap_err();
        assert_eq!(
            e,
            Refusal::ExceedsAncestor {
                path: path("alice:bob"),
                ancestor: path("alice"),
                reason: FitError::Unikernels { inner: 3, outer: 2 },
            }
        );
        assert_eq!(
            e.to_string(),
            "alice:bob: policy does not fit in alice's policy: unikernels 3 exceeds 2"
        );
        assert_eq!(e.policy_path(), Some(&path("alice")));
        let mut wide = policy(1);
        wide.cpus = set(&[0, 1, 2]);
        let e = r.set_policy(&path("alice:bob"), wide).unwrap_err();
        assert_eq!(
            e.to_string(),
            "alice:bob: policy does not fit in alice's policy: cpu 2 not in cpus 0-1"
        );
        let e = r.set_policy(
            &path("x"),
            Policy {
                block_mb: Some(1001),
                ..host()
            },
        );
        assert_eq!(
            e.unwrap_err().to_string(),
            "x: policy does not fit in (root)'s policy: block 1001 MB exceeds 1000 MB"
        );

        // Smaller than a child.
        r.set_policy(&path("alice:bob"), policy(2)).unwrap();
        let e = r.set_policy(&path("alice"), policy(1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "alice: policy would be narrower than alice:bob's policy: unikernels 2 exceeds 1"
        );
        assert_eq!(e.resource(), Some(Resource::Unikernels));
        let e = r.set_policy(&Path::root(), policy(1)).unwrap_err();
        assert!(matches!(
            e,
            Refusal::NarrowerThanDescendant { ref descendant, .. } if *descendant == path("alice")
        ));

        // Smaller than what runs below.
        r.remove_policy(&path("alice:bob")).unwrap();
        let mut a = uk();
        a.cpus = set(&[1]);
        r.insert_unikernel(&name("alice:bob:a"), a).unwrap();
        r.insert_unikernel(&name("alice:b"), uk()).unwrap();
        let e = r.set_policy(&path("alice"), policy(1)).unwrap_err();
        assert_eq!(
            e,
            Refusal::UsageExceeds {
                path: path("alice"),
                resource: Resource::Unikernels,
                limit: 1,
                in_use: 2,
            }
        );
        assert_eq!(
            e.to_string(),
            "alice: unikernels: limit 1, but 2 in use by unikernels running below"
        );
        let e = r.set_policy(
            &path("alice"),
            Policy {
                memory_mb: 63,
                ..policy(2)
            },
        );
        assert_eq!(
            e.unwrap_err().to_string(),
            "alice: memory: limit 63 MB, but 64 MB in use by unikernels running below"
        );
        let e = r.set_policy(
            &path("alice:bob"),
            Policy {
                cpus: set(&[0]),
                ..policy(2)
            },
        );
        assert_eq!(
            e.unwrap_err().to_string(),
            "alice:bob: cpu 1 is used by a unikernel running below, not in cpus 0"
        );
        let e = r.set_policy(
            &path("alice"),
            Policy {
                bridges: bridges(&["br2"]),
                ..policy(2)
            },
        );
        assert_eq!(
            e.unwrap_err(),
            Refusal::ExceedsAncestor {
                path: path("alice"),
                ancestor: Path::root(),
                reason: FitError::Bridge {
                    bridge: "br2".into(),
                    outer: bridges(&["br0", "br1"])
                },
            }
        );
        let e = r.set_policy(
            &path("alice"),
            Policy {
                bridges: bridges(&["br1"]),
                ..policy(2)
            },
        );
        assert_eq!(
            e.unwrap_err().to_string(),
            "alice: bridge br0 is used by a unikernel running below, not in bridges br1"
        );
        let e = r.set_policy(
            &path("alice:bob"),
            Policy {
                bridges: bridges(&[]),
                ..policy(2)
            },
        );
        assert_eq!(
            e.unwrap_err().to_string(),
            "alice:bob: bridge br0 is used by a unikernel running below, not in bridges none"
        );
        // Replacing with one that fits everything works.
        r.set_policy(
            &path("alice"),
            Policy {
                memory_mb: 64,
                ..policy(2)
            },
        )
        .unwrap();
        assert_eq!(r.find_policy(&path("alice")).unwrap().memory_mb, 64);
    }

    #[test]
    fn set_policy_refuses_block_in_use() {
        let mut r = Resources::new(host());
        let mut disk = uk();
        disk.block_mb = 5;
        r.insert_unikernel(&name("alice:a"), disk).unwrap();
        let e = r.set_policy(&path("alice"), policy(2)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "alice: block: no block storage allowed, but 5 MB in use by unikernels running below"
        );
        let e = r.set_policy(
            &path("alice"),
            Policy {
                block_mb: Some(4),
                ..policy(2)
            },
        );
        assert_eq!(
            e.unwrap_err().to_string(),
            "alice: block: limit 4 MB, but 5 MB in use by unikernels running below"
        );
        r.set_policy(
            &path("alice"),
            Policy {
                block_mb: Some(5),
                ..policy(2)
            },
        )
        .unwrap();
    }

    #[test]
    fn remove_policy_keeps_the_ancestors_in_force() {
        let mut r = Resources::new(host());
        assert_eq!(r.remove_policy(&Path::root()), Err(RemovePolicyError::Root));
        assert_eq!(
            r.remove_policy(&path("alice")).unwrap_err().to_string(),
            "alice: there is no policy at this path"
        );
        r.set_policy(&path("alice"), policy(1)).unwrap();
        r.set_policy(&path("alice:bob"), policy(1)).unwrap();
        r.insert_unikernel(&name("alice:bob:a"), uk()).unwrap();
        // Allowed with a policy and a unikernel below.
        assert_eq!(r.remove_policy(&path("alice")), Ok(policy(1)));
        assert_eq!(r.find_policy(&path("alice")), None);
        assert!(r.find_policy(&path("alice:bob")).is_some());
        assert_eq!(r.usage(&path("alice")).unikernels, 1);
        let e = r.check(&name("alice:bob:b"), &uk()).unwrap_err();
        assert_eq!(e.policy_path(), Some(&path("alice:bob")));
        r.insert_unikernel(&name("alice:c"), uk()).unwrap();
        // The root can be narrowed, not below what runs.
        assert!(r.set_policy(&Path::root(), policy(1)).is_err());
        r.set_policy(&Path::root(), policy(2)).unwrap();
    }

    #[test]
    fn empty_paths_are_pruned() {
        let mut r = Resources::new(host());
        r.set_policy(&path("a:b:c"), policy(1)).unwrap();
        r.insert_unikernel(&name("a:b:c:d:e"), uk()).unwrap();
        r.insert_unikernel(&name("a:x"), uk()).unwrap();
        r.remove_policy(&path("a:b:c")).unwrap();
        // a:b still has a:b:c:d:e below: not a free name.
        assert!(r.check(&name("a:b"), &uk()).is_err());
        r.remove_unikernel(&name("a:b:c:d:e")).unwrap();
        r.check(&name("a:b"), &uk()).unwrap();
        r.check(&name("a:b:c:d"), &uk()).unwrap();
        assert!(r.check(&name("a"), &uk()).is_err());
        r.remove_unikernel(&name("a:x")).unwrap();
        r.check(&name("a"), &uk()).unwrap();
        assert_eq!(r.render(&Path::root()).lines().count(), 1);
        assert_eq!(r.iter_policies().count(), 1);
    }

    #[test]
    fn iterates_in_path_order() {
        let mut r = Resources::new(host());
        r.set_policy(&path("b"), policy(3)).unwrap();
        r.set_policy(&path("a:z"), policy(3)).unwrap();
        r.set_policy(&path("a"), policy(3)).unwrap();
        r.insert_unikernel(&name("b:web"), uk()).unwrap();
        r.insert_unikernel(&name("a:z:web"), uk()).unwrap();
        r.insert_unikernel(&name("web"), uk()).unwrap();
        let policies: Vec<String> = r.iter_policies().map(|(p, _)| p.to_string()).collect();
        assert_eq!(policies, ["(root)", "a", "a:z", "b"]);
        let names: Vec<String> = r.iter_unikernels().map(|(n, _)| n.to_string()).collect();
        assert_eq!(names, ["a:z:web", "b:web", "web"]);
        assert_eq!(r.root_policy(), &host());
    }

    /// Only `bridges`, or only the fields given.
    fn only_bridges(b: &[&str]) -> PartialPolicy {
        PartialPolicy {
            bridges: Some(bridges(b)),
            ..PartialPolicy::default()
        }
    }

    fn only_unikernels(n: u32) -> PartialPolicy {
        PartialPolicy {
            unikernels: Some(n),
            ..PartialPolicy::default()
        }
    }

    /// A field a policy does not set is the one in force above it, and
    /// follows it when that one changes: a TAP the host gains after alice's
    /// policy was set is open to alice's unikernels (it froze at "none").
    #[test]
    fn a_field_not_set_follows_the_policy_above() {
        let mut r = Resources::with_default(Policy {
            bridges: bridges(&["br0"]),
            ..host()
        });
        r.set_policy(&path("alice"), only_unikernels(2)).unwrap();
        assert_eq!(r.find_set_fields(&path("alice")), Some(&only_unikernels(2)));
        let on_tap1 = Unikernel {
            bridges: bridges(&["tap1"]),
            ..uk()
        };
        assert_eq!(
            r.check(&name("alice:web"), &on_tap1)
                .unwrap_err()
                .to_string(),
            "(root): bridge tap1 not in allowed bridges br0"
        );
        // The root's bridges widen (the host has a new TAP): alice's follow.
        r.set_policy(&Path::root(), only_bridges(&["br0", "tap1"]))
            .unwrap();
        assert_eq!(
            r.find_policy(&path("alice")).unwrap().bridges,
            bridges(&["br0", "tap1"])
        );
        r.insert_unikernel(&name("alice:web"), on_tap1).unwrap();
        // What alice sets stays hers: her limit of 2, not the root's 100.
        assert_eq!(r.find_policy(&path("alice")).unwrap().unikernels, 2);
        // Narrowing the root below what runs is refused at the root, not
        // blamed on alice, who sets no bridges.
        assert_eq!(
            r.set_policy(&Path::root(), only_bridges(&["br0"]))
                .unwrap_err()
                .to_string(),
            "(root): bridge tap1 is used by a unikernel running below, not in bridges br0"
        );
    }

    /// What a policy sets must still fit in the policy in force above, and
    /// a policy above cannot shrink below what a policy below sets; only
    /// the fields set are compared.
    #[test]
    fn explicit_fields_must_fit_in_the_parent_inherited_ones_follow_it() {
        let mut r = Resources::with_default(host());
        r.set_policy(&path("alice"), only_bridges(&["br0"]))
            .unwrap();
        let e = r
            .set_policy(&path("alice:bob"), only_bridges(&["br1"]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "alice:bob: policy does not fit in alice's policy: bridge br1 not in bridges br0"
        );
        r.set_policy(&path("alice:bob"), only_unikernels(3))
            .unwrap();
        r.set_policy(&path("alice:carol"), only_bridges(&["br0"]))
            .unwrap();
        // bob inherits alice's bridges: narrowing alice's narrows bob's.
        // carol sets br0 herself: alice cannot drop it.
        let e = r
            .set_policy(&path("alice"), only_bridges(&["br1"]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "alice: policy would be narrower than alice:carol's policy: bridge br0 not in bridges br1"
        );
        r.remove_policy(&path("alice:carol")).unwrap();
        r.set_policy(&path("alice"), only_bridges(&["br1"]))
            .unwrap();
        assert_eq!(
            r.find_policy(&path("alice:bob")).unwrap().bridges,
            bridges(&["br1"])
        );
        // bob's own limit of 3 must fit in alice's, inherited from the root.
        let e = r.set_policy(&Path::root(), only_unikernels(2)).unwrap_err();
        assert!(
            e.to_string().contains("narrower than alice:bob's policy"),
            "{e}"
        );
    }

    /// Removing a policy makes those below that inherited from it inherit
    /// from the policy above it instead.
    #[test]
    fn removing_a_policy_makes_those_below_inherit_from_above() {
        let mut r = Resources::with_default(host());
        r.set_policy(&path("alice"), only_bridges(&["br0"]))
            .unwrap();
        r.set_policy(&path("alice:bob"), only_unikernels(3))
            .unwrap();
        r.remove_policy(&path("alice")).unwrap();
        assert_eq!(
            r.find_policy(&path("alice:bob")).unwrap().bridges,
            bridges(&["br0", "br1"])
        );
    }

    /// `policy show` tells a field set at a path from one inherited, and
    /// names where it comes from.
    #[test]
    fn render_marks_inherited_fields_and_their_source() {
        let mut r = Resources::with_default(Policy {
            unikernels: u32::MAX,
            block_mb: Some(u64::MAX),
            ..host()
        });
        r.set_policy(
            &Path::root(),
            PartialPolicy {
                memory_mb: Some(4096),
                ..PartialPolicy::default()
            },
        )
        .unwrap();
        r.set_policy(
            &path("alice"),
            PartialPolicy {
                unikernels: Some(2),
                block_mb: Some(None),
                ..PartialPolicy::default()
            },
        )
        .unwrap();
        r.set_policy(&path("alice:bob"), only_bridges(&["br0"]))
            .unwrap();
        let expected = "\
(root)   unikernels 0/unlimited (host)  memory 0/4096 MB  block 0/unlimited MB (host)  cpus 0-3 (host)  bridges br0,br1 (host)
  alice  unikernels 0/2  memory 0/4096 MB (inherited from the root)  block 0/none  cpus 0-3 (inherited from the host)  bridges br0,br1 (inherited from the host)
    bob  unikernels 0/2 (inherited from alice)  memory 0/4096 MB (inherited from the root)  block 0/none (inherited from alice)  cpus 0-3 (inherited from the host)  bridges br0
";
        assert_eq!(r.to_string(), expected);
        assert_eq!(
            r.render(&path("alice:bob")),
            "alice:bob  unikernels 0/2 (inherited from alice)  memory 0/4096 MB (inherited from the root)  block 0/none (inherited from alice)  cpus 0-3 (inherited from the host)  bridges br0\n"
        );
    }

    #[test]
    fn renders_usage_against_limits() {
        let mut r = Resources::new(Policy {
            unikernels: 16,
            ..host()
        });
        r.set_policy(&path("alice"), policy(2)).unwrap();
        r.set_policy(
            &path("alice:bob"),
            Policy {
                memory_mb: 512,
                ..policy(2)
            },
        )
        .unwrap();
        r.insert_unikernel(
            &name("alice:bob:a"),
            Unikernel {
                memory_mb: 64,
                ..uk()
            },
        )
        .unwrap();
        r.insert_unikernel(
            &name("dave:b"),
            Unikernel {
                cpus: set(&[1]),
                bridges: bridges(&[]),
                ..uk()
            },
        )
        .unwrap();
        let expected = "\
(root)   unikernels 2/16  memory 96/8192 MB  block 0/1000 MB  cpus 0-3  bridges br0,br1
  alice  unikernels 1/2  memory 64/1024 MB  block 0/none  cpus 0-1  bridges br0
    bob  unikernels 1/2  memory 64/512 MB  block 0/none  cpus 0-1  bridges br0
      a  running  memory 64 MB  block 0 MB  cpus 0  bridges br0
  dave   no policy  unikernels 1  memory 32 MB  block 0 MB
    b    running  memory 32 MB  block 0 MB  cpus 1  bridges none
";
        assert_eq!(r.to_string(), expected);
        assert_eq!(
            r.render(&path("alice:bob")),
            "\
alice:bob  unikernels 1/2  memory 64/512 MB  block 0/none  cpus 0-1  bridges br0
  a        running  memory 64 MB  block 0 MB  cpus 0  bridges br0
"
        );
        assert_eq!(
            r.render(&path("nobody")),
            "nobody  no policy  unikernels 0  memory 0 MB  block 0 MB\n"
        );
    }

    #[test]
    fn the_host_default_unikernel_limit_shows_as_unlimited() {
        let mut r = Resources::new(Policy {
            unikernels: u32::MAX,
            ..host()
        });
        r.insert_unikernel(&name("a"), uk()).unwrap();
        let shown = r.render(&Path::root());
        assert!(shown.contains("unikernels 1/unlimited "), "{shown}");
        assert!(!shown.contains(&u32::MAX.to_string()), "{shown}");
    }
}
