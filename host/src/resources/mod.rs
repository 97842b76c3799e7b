//! The admission model: which unikernels may run, given delegated policies.
//!
//! Resources are delegated down a tree of paths. A [`Path`] is a sequence
//! of labels written joined by `:` (`alice:bob`); the root path has none
//! and is written `(root)`. A unikernel's [`Name`] is a path and its own
//! label: `alice:bob:web` is the unikernel `web` running under `alice:bob`,
//! and `web` runs at the root. A name occupies its position in the tree: it
//! cannot also be a path with a policy or with anything below it.
//!
//! A [`Policy`] at a path caps everything that runs below that path, all
//! together: how many unikernels, how much memory and block storage (or no
//! block storage at all), and which cpus and bridges they may use. The root
//! always has a policy (the host's resources). A policy set below another
//! must fit inside it ([`Policy::fits_in`]), but siblings may each be given
//! as much as their parent: if alice may run 2 unikernels and gives 2 each
//! to alice:bob and alice:charlie, the three of them can still run only 2
//! in total. A launch ([`Resources::check`]) is therefore checked against
//! the policy of **every** path above the name, the root included, with the
//! usage of all unikernels below that path plus the new one. (albatross,
//! whose model this follows, checks only the policy at the unikernel's own
//! path, so there sibling delegations can together exceed an ancestor.)
//!
//! [`Resources`] keeps, at every path, the summed [`Usage`] of what runs
//! below it, updated on each launch and exit along the name's ancestors, so
//! a check costs O(depth), whatever the number of running unikernels. A
//! refusal is a [`Refusal`] that names the path whose policy refuses, the
//! resource, the limit and the usage, in one line such as
//! `alice: unikernels: limit 2, in use 2, requested 1`.
//!
//! A policy need not set every resource: a [`PartialPolicy`] leaves out
//! what it does not set, and each such field is inherited from the nearest
//! policy above that sets it, at the root from a default (the host's
//! resources, [`Resources::with_default`]). The tree keeps at each path the
//! policy in force ([`Resources::find_policy`]) and the fields set there
//! ([`Resources::find_set_fields`]); when a policy changes, those below
//! that inherit from it change with it. Only the fields a policy sets are
//! compared with the policies above and below it: what it inherits fits by
//! construction. A [`PolicyChange`] sets some fields and unsets others.
//!
//! Changing policies keeps the tree consistent: [`Resources::set_policy`]
//! refuses a policy that does not fit in its ancestors', that a policy below
//! does not fit in, or that the unikernels already running below exceed.
//! [`Resources::remove_policy`] removes any policy but the root's, even with
//! things below it, which stay bounded by the policies above.
//!
//! A policy may also grant its subtree to Unix users and groups, who may
//! then act on the unikernels below it and change the policies strictly
//! below it ([`Resources::may_act_on_unikernel`],
//! [`Resources::may_change_policy`]; module `access` has the rules).
//! Grants are not resources: they are not inherited, and any policy above
//! a request that grants it allows it.
//!
//! This module is pure bookkeeping: it starts nothing and reads nothing from
//! the host. Sums use checked arithmetic, so an absurd request is refused,
//! never wrapped.

mod access;
mod name;
mod policy;
mod tree;

#[cfg(test)]
mod tests;

pub use access::{AccessRefusal, Caller};
pub use name::{Label, Name, NameError, Path, MAX_DEPTH, MAX_LABEL_LEN};
pub use policy::{
    parse_cpu_list, BridgeList, CpuList, CpuListError, FitError, Grantee, PartialPolicy, Policy,
    PolicyChange, Resource, Unikernel, Usage,
};
pub use tree::{Refusal, RemovePolicyError, Resources};
