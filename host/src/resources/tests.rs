//! Property tests: [`Resources`] against a brute-force model.
//!
//! The model keeps a plain map of policies (labels -> policy) and a plain
//! list of running unikernels, and decides every launch and policy change
//! by scanning them: for each ancestor with a policy it sums over all
//! running unikernels whose name is below that path. Random sequences of
//! set_policy / remove_policy / launch / exit over a three-letter alphabet
//! (so paths and names collide) must get the same decision, the same
//! refusal, and the same usage at every path after every step. Policies
//! set only some of their fields; the model finds each field in force by
//! looking up the nearest policy that sets it. Some policies grant their
//! subtree to users or groups: after every step, the access decisions for
//! a few callers at every path must be those of a scan of all policies.

use super::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use std::collections::{BTreeMap, BTreeSet};

type Labels = Vec<String>;

const ALPHABET: [&str; 3] = ["a", "b", "c"];
/// Deepest path generated for a policy or a unikernel's path.
const MAX_GEN_DEPTH: usize = 3;

fn to_path(labels: &[String]) -> Path {
    labels
        .join(":")
        .parse()
        .expect("generated labels are valid")
}

fn to_name(path: &[String], label: &str) -> Name {
    Name::new(to_path(path), Label::new(label).expect("valid label"))
}

/// The independent model: lists and brute-force sums.
struct Model {
    /// What each policy sets; the root's unset fields are `default`'s.
    policies: BTreeMap<Labels, PartialPolicy>,
    default: Policy,
    /// (path, label, resources) of each running unikernel.
    running: Vec<(Labels, String, Unikernel)>,
}

fn full(path: &[String], label: &str) -> Labels {
    let mut f = path.to_vec();
    f.push(label.to_string());
    f
}

/// `a` is a strict prefix of `b`.
fn strictly_above(a: &[String], b: &[String]) -> bool {
    a.len() < b.len() && b.starts_with(a)
}

/// [`model_fits`] on the fields `inner` sets only.
fn model_fits_set(inner: &PartialPolicy, outer: &Policy) -> Result<(), FitError> {
    let mut full = outer.clone();
    if let Some(n) = inner.unikernels {
        full.unikernels = n;
    }
    if let Some(m) = inner.memory_mb {
        full.memory_mb = m;
    }
    if let Some(c) = &inner.cpus {
        full.cpus = c.clone();
    }
    if let Some(b) = inner.block_mb {
        full.block_mb = b;
    }
    if let Some(b) = &inner.bridges {
        full.bridges = b.clone();
    }
    model_fits(&full, outer)
}

fn model_fits(inner: &Policy, outer: &Policy) -> Result<(), FitError> {
    if inner.unikernels > outer.unikernels {
        return Err(FitError::Unikernels {
            inner: inner.unikernels,
            outer: outer.unikernels,
        });
    }
    if inner.memory_mb > outer.memory_mb {
        return Err(FitError::Memory {
            inner: inner.memory_mb,
            outer: outer.memory_mb,
        });
    }
    if let Some(i) = inner.block_mb {
        match outer.block_mb {
            None => return Err(FitError::NoBlock { inner: i }),
            Some(o) if i > o => return Err(FitError::Block { inner: i, outer: o }),
            Some(_) => {}
        }
    }
    if let Some(cpu) = inner.cpus.iter().find(|c| !outer.cpus.contains(c)) {
        return Err(FitError::Cpu {
            cpu: *cpu,
            outer: outer.cpus.clone(),
        });
    }
    if let Some(b) = inner.bridges.iter().find(|b| !outer.bridges.contains(*b)) {
        return Err(FitError::Bridge {
            bridge: b.clone(),
            outer: outer.bridges.clone(),
        });
    }
    Ok(())
}

impl Model {
    fn new(root: Policy) -> Model {
        Model {
            policies: BTreeMap::from([(Vec::new(), root.clone().into())]),
            default: root,
            running: Vec::new(),
        }
    }

    /// The policy in force at `path` if `path`'s policy were `at`: each
    /// field from the deepest policy at or above `path` that sets it.
    fn in_force_with(&self, path: &[String], at: Option<&PartialPolicy>) -> Policy {
        let mut p = self.default.clone();
        for depth in 0..=path.len() {
            let set = if depth == path.len() && at.is_some() {
                at
            } else {
                self.policies.get(&path[..depth])
            };
            let Some(set) = set else { continue };
            if let Some(n) = set.unikernels {
                p.unikernels = n;
            }
            if let Some(m) = set.memory_mb {
                p.memory_mb = m;
            }
            if let Some(c) = &set.cpus {
                p.cpus = c.clone();
            }
            if let Some(b) = set.block_mb {
                p.block_mb = b;
            }
            if let Some(b) = &set.bridges {
                p.bridges = b.clone();
            }
        }
        p
    }

    fn in_force(&self, path: &[String]) -> Policy {
        self.in_force_with(path, None)
    }

    fn below<'a>(&'a self, path: &'a [String]) -> impl Iterator<Item = &'a Unikernel> + 'a {
        self.running
            .iter()
            .filter(move |(p, _, _)| p.starts_with(path))
            .map(|(_, _, uk)| uk)
    }

    /// Sums as u128, so they cannot overflow.
    fn sums(&self, path: &[String]) -> (u128, u128, u128) {
        self.below(path).fold((0, 0, 0), |(n, m, b), uk| {
            (
                n + 1,
                m + u128::from(uk.memory_mb),
                b + u128::from(uk.block_mb),
            )
        })
    }

    fn usage(&self, path: &[String]) -> Usage {
        let (n, m, b) = self.sums(path);
        Usage {
            unikernels: n as u64,
            memory_mb: m as u64,
            block_mb: b as u64,
        }
    }

    fn occupied_by_unikernel(&self, at: &[String]) -> Option<Name> {
        self.running
            .iter()
            .find(|(p, l, _)| at.starts_with(&full(p, l)))
            .map(|(p, l, _)| to_name(p, l))
    }

    fn launch(&mut self, path: &[String], label: &str, uk: &Unikernel) -> Result<(), Refusal> {
        let me = full(path, label);
        if let Some((p, l, _)) = self
            .running
            .iter()
            .find(|(p, l, _)| path.starts_with(&full(p, l)))
        {
            return Err(Refusal::BelowUnikernel {
                unikernel: to_name(p, l),
            });
        }
        if self.running.iter().any(|(p, l, _)| full(p, l) == me) {
            return Err(Refusal::AlreadyRunning {
                name: to_name(path, label),
            });
        }
        let path_like = self.policies.contains_key(&me)
            || self.policies.keys().any(|k| strictly_above(&me, k))
            || self
                .running
                .iter()
                .any(|(p, l, _)| strictly_above(&me, &full(p, l)));
        if path_like {
            return Err(Refusal::NameIsPath {
                name: to_name(path, label),
            });
        }
        for depth in 0..=path.len() {
            let anc = &path[..depth];
            if !self.policies.contains_key(anc) {
                continue;
            }
            let p = &self.in_force(anc);
            let at = to_path(anc);
            let (n, m, b) = self.sums(anc);
            if n + 1 > u128::from(p.unikernels) {
                return Err(Refusal::Exceeded {
                    path: at,
                    resource: Resource::Unikernels,
                    limit: u64::from(p.unikernels),
                    in_use: n as u64,
                    requested: 1,
                });
            }
            if m + u128::from(uk.memory_mb) > u128::from(p.memory_mb) {
                return Err(Refusal::Exceeded {
                    path: at,
                    resource: Resource::Memory,
                    limit: p.memory_mb,
                    in_use: m as u64,
                    requested: uk.memory_mb,
                });
            }
            if uk.block_mb > 0 {
                match p.block_mb {
                    None => {
                        return Err(Refusal::NoBlockAllowed {
                            path: at,
                            requested: uk.block_mb,
                        })
                    }
                    Some(limit) if b + u128::from(uk.block_mb) > u128::from(limit) => {
                        return Err(Refusal::Exceeded {
                            path: at,
                            resource: Resource::Block,
                            limit,
                            in_use: b as u64,
                            requested: uk.block_mb,
                        })
                    }
                    Some(_) => {}
                }
            }
            if let Some(cpu) = uk.cpus.iter().find(|c| !p.cpus.contains(c)) {
                return Err(Refusal::CpuNotAllowed {
                    path: at,
                    cpu: *cpu,
                    allowed: p.cpus.clone(),
                });
            }
            if let Some(b) = uk.bridges.iter().find(|b| !p.bridges.contains(*b)) {
                return Err(Refusal::BridgeNotAllowed {
                    path: at,
                    bridge: b.clone(),
                    allowed: p.bridges.clone(),
                });
            }
        }
        self.running
            .push((path.to_vec(), label.to_string(), uk.clone()));
        Ok(())
    }

    fn set_policy(&mut self, path: &[String], set: &PartialPolicy) -> Result<(), Refusal> {
        let policy = &self.in_force_with(path, Some(set));
        let at = to_path(path);
        if let Some(uk) = self.occupied_by_unikernel(path) {
            return Err(if uk.to_path() == at {
                Refusal::PathIsUnikernel { path: at }
            } else {
                Refusal::BelowUnikernel { unikernel: uk }
            });
        }
        for depth in 0..path.len() {
            if self.policies.contains_key(&path[..depth]) {
                model_fits(policy, &self.in_force(&path[..depth])).map_err(|reason| {
                    Refusal::ExceedsAncestor {
                        path: at.clone(),
                        ancestor: to_path(&path[..depth]),
                        reason,
                    }
                })?;
            }
        }
        for (k, inner) in &self.policies {
            if strictly_above(path, k) {
                model_fits_set(inner, policy).map_err(|reason| {
                    Refusal::NarrowerThanDescendant {
                        path: at.clone(),
                        descendant: to_path(k),
                        reason,
                    }
                })?;
            }
        }
        let (n, m, b) = self.sums(path);
        let over = |resource, limit: u64, in_use: u128| {
            (in_use > u128::from(limit)).then(|| Refusal::UsageExceeds {
                path: at.clone(),
                resource,
                limit,
                in_use: in_use as u64,
            })
        };
        if let Some(r) = over(Resource::Unikernels, u64::from(policy.unikernels), n) {
            return Err(r);
        }
        if let Some(r) = over(Resource::Memory, policy.memory_mb, m) {
            return Err(r);
        }
        match policy.block_mb {
            None if b > 0 => {
                return Err(Refusal::BlockInUse {
                    path: at,
                    in_use: b as u64,
                })
            }
            Some(limit) => {
                if let Some(r) = over(Resource::Block, limit, b) {
                    return Err(r);
                }
            }
            None => {}
        }
        let cpus: BTreeSet<u16> = self.below(path).flat_map(|uk| uk.cpus.clone()).collect();
        if let Some(cpu) = cpus.iter().find(|c| !policy.cpus.contains(c)) {
            return Err(Refusal::CpuInUse {
                path: at,
                cpu: *cpu,
                allowed: policy.cpus.clone(),
            });
        }
        let bridges: BTreeSet<String> =
            self.below(path).flat_map(|uk| uk.bridges.clone()).collect();
        if let Some(b) = bridges.iter().find(|b| !policy.bridges.contains(*b)) {
            return Err(Refusal::BridgeInUse {
                path: at,
                bridge: b.clone(),
                allowed: policy.bridges.clone(),
            });
        }
        self.policies.insert(path.to_vec(), set.clone());
        Ok(())
    }

    fn remove_policy(&mut self, path: &[String]) -> Result<Policy, RemovePolicyError> {
        if path.is_empty() {
            return Err(RemovePolicyError::Root);
        }
        let was = self.in_force(path);
        self.policies
            .remove(path)
            .map(|_| was)
            .ok_or_else(|| RemovePolicyError::NoPolicy {
                path: to_path(path),
            })
    }

    fn exit(&mut self, path: &[String], label: &str) -> Option<Unikernel> {
        let i = self
            .running
            .iter()
            .position(|(p, l, _)| p == path && l == label)?;
        Some(self.running.remove(i).2)
    }
}

#[derive(Debug, Clone)]
enum Op {
    SetPolicy(Labels, PartialPolicy),
    RemovePolicy(Labels),
    Launch(Labels, String, Unikernel),
    /// Exit the `n`th running unikernel (mod their number), or, when none
    /// runs or `n` is odd, the given name, which may run or not.
    Exit(usize, Labels, String),
}

fn label() -> impl Strategy<Value = String> {
    proptest::sample::select(&ALPHABET[..]).prop_map(str::to_string)
}

fn labels() -> impl Strategy<Value = Labels> {
    proptest::collection::vec(label(), 0..=MAX_GEN_DEPTH)
}

fn cpus(mask: u8) -> BTreeSet<u16> {
    (0..5).filter(|i| mask >> i & 1 == 1).collect()
}

fn bridge_set(mask: u8) -> BTreeSet<String> {
    ["br0", "br1", "br2"]
        .iter()
        .enumerate()
        .filter(|(i, _)| mask >> i & 1 == 1)
        .map(|(_, b)| b.to_string())
        .collect()
}

/// Policies over cpus 0-3 and bridges br0, br1, mostly wide enough that
/// launches under them succeed, sometimes narrow.
fn policy() -> impl Strategy<Value = Policy> {
    (
        prop_oneof![1 => 0u32..=1, 3 => 2u32..=5],
        proptest::sample::select(vec![0u64, 64, 128, 256, 512, 1024]),
        prop_oneof![3 => Just(0b1111u8), 1 => 0u8..16],
        prop_oneof![
            1 => Just(None),
            1 => Just(Some(0)),
            2 => proptest::sample::select(vec![50u64, 100, 300]).prop_map(Some),
        ],
        prop_oneof![3 => Just(0b11u8), 1 => 0u8..4],
    )
        .prop_map(
            |(unikernels, memory_mb, cpu_mask, block_mb, bridge_mask)| Policy {
                unikernels,
                memory_mb,
                cpus: cpus(cpu_mask),
                block_mb,
                bridges: bridge_set(bridge_mask),
            },
        )
}

/// Grants of users 1, 2 and groups 10, 11: mostly none.
fn grant_ids(ids: [u32; 2]) -> impl Strategy<Value = Option<BTreeSet<u32>>> {
    prop_oneof![
        3 => Just(None),
        1 => (0u8..4).prop_map(move |m| Some(
            ids.iter()
                .enumerate()
                .filter(|(i, _)| m >> i & 1 == 1)
                .map(|(_, id)| *id)
                .collect()
        )),
    ]
}

/// A [`policy`] that sets some of its fields: mostly all, often some; some
/// grant their subtree.
fn partial_policy() -> impl Strategy<Value = PartialPolicy> {
    (
        policy(),
        prop_oneof![1 => Just(0b11111u8), 2 => 0u8..32],
        grant_ids([1, 2]),
        grant_ids([10, 11]),
    )
        .prop_map(|(p, mask, users, groups)| {
            let mut set = PartialPolicy::from(p);
            set.users = users;
            set.groups = groups;
            for (i, r) in [
                Resource::Unikernels,
                Resource::Memory,
                Resource::Block,
                Resource::Cpus,
                Resource::Bridges,
            ]
            .into_iter()
            .enumerate()
            {
                if mask >> i & 1 == 0 {
                    set.unset(r);
                }
            }
            set
        })
}

/// A generous root: every other generated policy may fit in it.
fn root_policy() -> impl Strategy<Value = Policy> {
    (
        4u32..=8,
        proptest::sample::select(vec![512u64, 1024, 2048]),
        prop_oneof![Just(None), Just(Some(300u64)), Just(Some(1000u64))],
    )
        .prop_map(|(unikernels, memory_mb, block_mb)| Policy {
            unikernels,
            memory_mb,
            cpus: cpus(0b1111),
            block_mb,
            bridges: bridge_set(0b11),
        })
}

/// Unikernels: pinned to one of cpus 0-4 (4 is in no policy) or unpinned
/// (cpus 0-3), on bridges br0-br2 (br2 is in no policy), mostly without
/// block storage.
fn unikernel() -> impl Strategy<Value = Unikernel> {
    (
        proptest::sample::select(vec![16u64, 32, 64, 128]),
        prop_oneof![6 => (0u16..4).prop_map(|c| BTreeSet::from([c])), 2 => Just(cpus(0b1111)), 1 => Just(BTreeSet::from([4]))],
        proptest::sample::select(vec![0u64, 0, 0, 10, 60]),
        prop_oneof![4 => Just(0u8), 4 => Just(1u8), 1 => 0u8..8],
    )
        .prop_map(|(memory_mb, cpus, block_mb, bridge_mask)| Unikernel {
            memory_mb,
            cpus,
            block_mb,
            bridges: bridge_set(bridge_mask),
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (labels(), label(), unikernel()).prop_map(|(p, l, u)| Op::Launch(p, l, u)),
        3 => (labels(), partial_policy()).prop_map(|(p, pol)| Op::SetPolicy(p, pol)),
        1 => labels().prop_map(Op::RemovePolicy),
        2 => (any::<usize>(), labels(), label()).prop_map(|(n, p, l)| Op::Exit(n, p, l)),
    ]
}

fn scenario() -> impl Strategy<Value = (Policy, Vec<Op>)> {
    (root_policy(), proptest::collection::vec(op(), 1..80))
}

/// Every path of up to `MAX_GEN_DEPTH + 1` labels over the alphabet.
fn all_paths() -> Vec<Labels> {
    let mut out = vec![Vec::new()];
    let mut level = vec![Vec::new()];
    for _ in 0..=MAX_GEN_DEPTH {
        level = level
            .iter()
            .flat_map(|p: &Labels| {
                ALPHABET.iter().map(move |l| {
                    let mut q = p.clone();
                    q.push(l.to_string());
                    q
                })
            })
            .collect();
        out.extend(level.iter().cloned());
    }
    out
}

/// Decisions seen over a run.
#[derive(Debug, Default)]
struct Stats {
    launched: usize,
    launch_refused: usize,
    policy_set: usize,
    policy_refused: usize,
    /// Distinct refusal kinds seen (by resource or shape).
    kinds: BTreeSet<String>,
}

fn kind(r: &Refusal) -> String {
    let dbg = format!("{r:?}");
    let variant = dbg.split([' ', '{', '(']).next().unwrap_or("").to_string();
    match r.resource() {
        Some(res) => format!("{variant}/{res}"),
        None => variant,
    }
}

/// Run `ops` on a tree and on the model, comparing after every step.
fn run(root: Policy, ops: &[Op], paths: &[Labels], stats: &mut Stats) -> Result<(), TestCaseError> {
    let mut tree = Resources::new(root.clone());
    let mut model = Model::new(root);
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Launch(p, l, uk) => {
                let name = to_name(p, l);
                let dry = tree.check(&name, uk);
                let got = tree.insert_unikernel(&name, uk.clone());
                prop_assert_eq!(&dry, &got, "check and insert disagree on {}", name);
                let want = model.launch(p, l, uk);
                prop_assert_eq!(&got, &want, "launch {} {:?}", name, uk);
                match got {
                    Ok(()) => stats.launched += 1,
                    Err(r) => {
                        stats.launch_refused += 1;
                        stats.kinds.insert(kind(&r));
                    }
                }
            }
            Op::SetPolicy(p, pol) => {
                let got = tree.set_policy(&to_path(p), pol.clone());
                let want = model.set_policy(p, pol);
                prop_assert_eq!(&got, &want, "set_policy {} {:?}", to_path(p), pol);
                match got {
                    Ok(()) => stats.policy_set += 1,
                    Err(r) => {
                        stats.policy_refused += 1;
                        stats.kinds.insert(kind(&r));
                    }
                }
            }
            Op::RemovePolicy(p) => {
                let got = tree.remove_policy(&to_path(p));
                prop_assert_eq!(got, model.remove_policy(p), "remove_policy {}", to_path(p));
            }
            Op::Exit(n, p, l) => {
                let (p, l) = match model.running.len() {
                    len if len > 0 && n % 2 == 0 => {
                        let (p, l, _) = &model.running[n / 2 % len];
                        (p.clone(), l.clone())
                    }
                    _ => (p.clone(), l.clone()),
                };
                let got = tree.remove_unikernel(&to_name(&p, &l));
                prop_assert_eq!(got, model.exit(&p, &l), "exit {}", to_name(&p, &l));
            }
        }

        for p in paths {
            let path = to_path(p);
            prop_assert_eq!(tree.usage(&path), model.usage(p), "usage at {}", path);
            let in_force = model.policies.contains_key(p).then(|| model.in_force(p));
            prop_assert_eq!(
                tree.find_policy(&path),
                in_force.as_ref(),
                "policy at {}",
                path
            );
            prop_assert_eq!(
                tree.find_set_fields(&path),
                model.policies.get(p),
                "fields set at {}",
                path
            );
        }
        let policies: Vec<(Path, Policy)> = tree
            .iter_policies()
            .map(|(p, pol)| (p, pol.clone()))
            .collect();
        let want: Vec<(Path, Policy)> = model
            .policies
            .keys()
            .map(|k| (to_path(k), model.in_force(k)))
            .collect();
        prop_assert_eq!(policies, want);
        let mut running: Vec<(Name, Unikernel)> = model
            .running
            .iter()
            .map(|(p, l, uk)| (to_name(p, l), uk.clone()))
            .collect();
        running.sort_by_key(|a| a.0.to_path());
        let got: Vec<(Name, Unikernel)> = tree
            .iter_unikernels()
            .map(|(n, uk)| (n, uk.clone()))
            .collect();
        prop_assert_eq!(got, running);
        for (p, l, uk) in &model.running {
            prop_assert_eq!(tree.find_unikernel(&to_name(p, l)), Some(uk));
        }
        // Every few steps (a scan of every path is slow in a debug build).
        if step % 8 == 7 || step + 1 == ops.len() {
            check_access(&tree, &model, paths)?;
        }
        // The printout shows one line per node at least for each policy
        // and unikernel.
        let lines = tree.to_string().lines().count();
        prop_assert!(lines >= model.policies.len() + model.running.len());
    }
    Ok(())
}

/// Whether the fields set at one path grant `c`.
fn model_grants(set: &PartialPolicy, c: &Caller) -> bool {
    set.users.as_ref().is_some_and(|u| u.contains(&c.uid))
        || set
            .groups
            .as_ref()
            .is_some_and(|g| g.contains(&c.gid) || c.groups.iter().any(|x| g.contains(x)))
}

/// The tree's access decisions at every path in `paths`, for a few
/// callers, against a scan of every policy in the model: acting on a
/// unikernel and showing need a grant at or above the path, changing a
/// policy one strictly above it; root needs none.
fn check_access(tree: &Resources, model: &Model, paths: &[Labels]) -> Result<(), TestCaseError> {
    let callers = [
        Caller {
            uid: 0,
            gid: 0,
            groups: vec![],
        },
        Caller {
            uid: 1,
            gid: 100,
            groups: vec![],
        },
        Caller {
            uid: 3,
            gid: 10,
            groups: vec![],
        },
        Caller {
            uid: 4,
            gid: 4,
            groups: vec![5, 11],
        },
    ];
    for c in &callers {
        for p in paths {
            let granted = |strict: bool| {
                c.uid == 0
                    || model.policies.iter().any(|(k, set)| {
                        p.starts_with(k) && (!strict || k.len() < p.len()) && model_grants(set, c)
                    })
            };
            let path = to_path(p);
            let name = to_name(p, "a");
            prop_assert_eq!(
                tree.may_act_on_unikernel(c, &name).is_ok(),
                granted(false),
                "uid {} acts on {}",
                c.uid,
                name
            );
            prop_assert_eq!(tree.visible_to(c, &name), granted(false));
            prop_assert_eq!(
                tree.may_show(c, &path).is_ok(),
                granted(false),
                "uid {} shows {}",
                c.uid,
                path
            );
            prop_assert_eq!(
                tree.may_change_policy(c, &path).is_ok(),
                granted(true),
                "uid {} changes {}",
                c.uid,
                path
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(Config { cases: 300, ..Config::default() })]

    #[test]
    fn tree_decides_like_the_brute_force_model((root, ops) in scenario()) {
        let paths = all_paths();
        run(root, &ops, &paths, &mut Stats::default())?;
    }
}

/// The generator must exercise both outcomes of launches and policy
/// changes, and most kinds of refusal, or the property above proves little.
#[test]
fn generated_scenarios_mix_admissions_and_refusals() {
    let mut runner = TestRunner::deterministic();
    let strategy = scenario();
    let paths = all_paths();
    let mut stats = Stats::default();
    for _ in 0..200 {
        let (root, ops) = strategy
            .new_tree(&mut runner)
            .expect("strategy generates")
            .current();
        run(root, &ops, &paths, &mut stats).expect("tree agrees with the model");
    }
    eprintln!("{stats:?}");
    let launches = stats.launched + stats.launch_refused;
    let policies = stats.policy_set + stats.policy_refused;
    assert!(
        stats.launched * 5 >= launches && stats.launch_refused * 5 >= launches,
        "launches need both outcomes, at least 20% each: {stats:?}"
    );
    assert!(
        stats.policy_set * 5 >= policies && stats.policy_refused * 5 >= policies,
        "set_policy needs both outcomes, at least 20% each: {stats:?}"
    );
    for k in [
        "Exceeded/unikernels",
        "Exceeded/memory",
        "Exceeded/block",
        "NoBlockAllowed/block",
        "CpuNotAllowed/cpus",
        "BridgeNotAllowed/bridges",
        "AlreadyRunning",
        "NameIsPath",
        "BelowUnikernel",
        "PathIsUnikernel",
        "ExceedsAncestor/unikernels",
        "NarrowerThanDescendant/unikernels",
        "UsageExceeds/unikernels",
        "UsageExceeds/memory",
        "BlockInUse/block",
        "CpuInUse/cpus",
        "BridgeInUse/bridges",
    ] {
        assert!(
            stats.kinds.contains(k),
            "no {k} refusal generated: {stats:?}"
        );
    }
}
