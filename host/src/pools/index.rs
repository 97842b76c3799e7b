//! A set of named pools with an ordered index of their EmptyAt.
//!
//! [`Pools`] keeps a `BTreeSet<(empty_at_ns, name)>` in step with every
//! change, so the daemon's one expiry timer is set from
//! [`Pools::next_expiry`] (the set's first entry, O(log n)) and a workload
//! added or removed costs a map look-up plus at most one re-keying, O(log n)
//! whatever the number of pools. This is tfexplorer's
//! `GetNextExpiredPool`, with an index instead of a database query.
//!
//! [`ScanPools`] holds the same pools without the index and finds the next
//! expiry by scanning them all: the property tests use it as the model and
//! the benchmark (`host/benches/pools.rs`) as the baseline.
//!
//! Ties between pools that empty at the same instant go to the smaller
//! name, in both.

use super::pool::{Pool, PoolError};
use super::units::Draw;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What is wrong with a request about a set of pools.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolsError {
    /// No pool has this name.
    #[error("no pool named {pool:?}; `tt-host pool list` shows the pools")]
    Unknown {
        /// The name asked for.
        pool: String,
    },
    /// A pool with this name exists already.
    #[error("a pool named {pool:?} exists already; choose another name")]
    Exists {
        /// The name asked for.
        pool: String,
    },
    /// The pool refused the change.
    #[error(transparent)]
    Pool(#[from] PoolError),
}

/// Named pools, indexed by when they empty. Serialized as the list of its
/// pools; the index is rebuilt on load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<Pool>", into = "Vec<Pool>")]
pub struct Pools {
    pools: BTreeMap<String, Pool>,
    /// `(empty_at, name)` of every pool whose `empty_at()` is `Some`.
    expiry: BTreeSet<(u64, String)>,
}

impl Pools {
    /// No pools.
    pub fn new() -> Pools {
        Pools::default()
    }

    /// How many pools there are.
    pub fn len(&self) -> usize {
        self.pools.len()
    }

    /// Whether there are no pools.
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    /// The pool named `name`.
    pub fn get(&self, name: &str) -> Option<&Pool> {
        self.pools.get(name)
    }

    /// Every pool, in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Pool> {
        self.pools.values()
    }

    /// Create an empty pool, synced at `now_ns`.
    pub fn create(&mut self, name: &str, now_ns: u64) -> Result<&Pool, PoolsError> {
        self.insert(Pool::new(name, now_ns))?;
        Ok(&self.pools[name])
    }

    /// Add a pool as it is (e.g. one loaded from disk).
    pub fn insert(&mut self, pool: Pool) -> Result<(), PoolsError> {
        if self.pools.contains_key(pool.name()) {
            return Err(PoolsError::Exists {
                pool: pool.name().to_string(),
            });
        }
        if let Some(at) = pool.empty_at() {
            self.expiry.insert((at, pool.name().to_string()));
        }
        self.pools.insert(pool.name().to_string(), pool);
        Ok(())
    }

    /// Take a pool out of the set.
    pub fn remove(&mut self, name: &str) -> Result<Pool, PoolsError> {
        let pool = self.pools.remove(name).ok_or_else(|| unknown(name))?;
        if let Some(at) = pool.empty_at() {
            self.expiry.remove(&(at, name.to_string()));
        }
        Ok(pool)
    }

    /// [`Pool::sync`] one pool.
    pub fn sync(&mut self, name: &str, now_ns: u64) -> Result<(), PoolsError> {
        self.change(name, |p| {
            p.sync(now_ns);
            Ok(())
        })
    }

    /// [`Pool::sync`] every pool (before persisting them): O(n log n).
    pub fn sync_all(&mut self, now_ns: u64) {
        for (name, pool) in self.pools.iter_mut() {
            let before = pool.empty_at();
            pool.sync(now_ns);
            rekey(&mut self.expiry, name, before, pool.empty_at());
        }
    }

    /// [`Pool::add_workload`]; returns the pool's new EmptyAt.
    pub fn add_workload(
        &mut self,
        name: &str,
        draw: Draw,
        now_ns: u64,
    ) -> Result<Option<u64>, PoolsError> {
        self.change(name, |p| p.add_workload(draw, now_ns))?;
        Ok(self.pools[name].empty_at())
    }

    /// [`Pool::remove_workload`]; returns the pool's new EmptyAt.
    pub fn remove_workload(
        &mut self,
        name: &str,
        draw: Draw,
        now_ns: u64,
    ) -> Result<Option<u64>, PoolsError> {
        self.change(name, |p| p.remove_workload(draw, now_ns))?;
        Ok(self.pools[name].empty_at())
    }

    /// [`Pool::top_up`] with whole unit-seconds; returns the new EmptyAt.
    pub fn top_up(
        &mut self,
        name: &str,
        cu: u64,
        su: u64,
        ipv4u: u64,
        now_ns: u64,
    ) -> Result<Option<u64>, PoolsError> {
        self.change(name, |p| p.top_up(cu, su, ipv4u, now_ns))?;
        Ok(self.pools[name].empty_at())
    }

    /// [`Pool::would_be_empty_within`] of the pool named `name`.
    pub fn would_be_empty_within(
        &self,
        name: &str,
        extra: Draw,
        now_ns: u64,
        min_run_ns: u64,
    ) -> Result<Option<u64>, PoolsError> {
        let pool = self.pools.get(name).ok_or_else(|| unknown(name))?;
        Ok(pool.would_be_empty_within(extra, now_ns, min_run_ns))
    }

    /// The pool that empties first, and when: O(log n).
    pub fn next_expiry(&self) -> Option<(u64, &str)> {
        self.expiry.first().map(|(at, name)| (*at, name.as_str()))
    }

    /// The pools empty at or before `now_ns`, soonest first: the ones whose
    /// unikernels must stop.
    pub fn due(&self, now_ns: u64) -> impl Iterator<Item = (u64, &str)> {
        self.expiry
            .iter()
            .take_while(move |(at, _)| *at <= now_ns)
            .map(|(at, name)| (*at, name.as_str()))
    }

    /// Apply `f` to the pool named `name`, keeping its index entry in step
    /// whether `f` succeeds or not (a failed change may still have synced).
    fn change(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut Pool) -> Result<(), PoolError>,
    ) -> Result<(), PoolsError> {
        let pool = self.pools.get_mut(name).ok_or_else(|| unknown(name))?;
        let before = pool.empty_at();
        let out = f(pool);
        rekey(&mut self.expiry, name, before, pool.empty_at());
        Ok(out?)
    }

    /// The index is exactly `(empty_at, name)` of every pool that has one.
    #[cfg(test)]
    pub(crate) fn assert_index_in_step(&self) {
        let want: BTreeSet<(u64, String)> = self
            .pools
            .values()
            .filter_map(|p| Some((p.empty_at()?, p.name().to_string())))
            .collect();
        assert_eq!(self.expiry, want, "the EmptyAt index is out of step");
    }
}

fn rekey(
    expiry: &mut BTreeSet<(u64, String)>,
    name: &str,
    before: Option<u64>,
    after: Option<u64>,
) {
    if before == after {
        return;
    }
    if let Some(at) = before {
        expiry.remove(&(at, name.to_string()));
    }
    if let Some(at) = after {
        expiry.insert((at, name.to_string()));
    }
}

fn unknown(name: &str) -> PoolsError {
    PoolsError::Unknown {
        pool: name.to_string(),
    }
}

impl TryFrom<Vec<Pool>> for Pools {
    type Error = PoolsError;

    fn try_from(list: Vec<Pool>) -> Result<Pools, PoolsError> {
        let mut pools = Pools::new();
        for pool in list {
            pools.insert(pool)?;
        }
        Ok(pools)
    }
}

impl From<Pools> for Vec<Pool> {
    fn from(pools: Pools) -> Vec<Pool> {
        pools.pools.into_values().collect()
    }
}

/// The same pools without an index: [`ScanPools::next_expiry`] scans them
/// all, O(n). The reference for tests and the benchmark's baseline.
#[derive(Debug, Clone, Default)]
pub struct ScanPools {
    pools: BTreeMap<String, Pool>,
}

impl ScanPools {
    /// No pools.
    pub fn new() -> ScanPools {
        ScanPools::default()
    }

    /// The pool named `name`.
    pub fn get(&self, name: &str) -> Option<&Pool> {
        self.pools.get(name)
    }

    /// Add a pool; refused if the name is taken.
    pub fn insert(&mut self, pool: Pool) -> Result<(), PoolsError> {
        if self.pools.contains_key(pool.name()) {
            return Err(PoolsError::Exists {
                pool: pool.name().to_string(),
            });
        }
        self.pools.insert(pool.name().to_string(), pool);
        Ok(())
    }

    /// Take a pool out.
    pub fn remove(&mut self, name: &str) -> Result<Pool, PoolsError> {
        self.pools.remove(name).ok_or_else(|| unknown(name))
    }

    /// [`Pool::sync`] one pool.
    pub fn sync(&mut self, name: &str, now_ns: u64) -> Result<(), PoolsError> {
        self.get_mut(name)?.sync(now_ns);
        Ok(())
    }

    /// [`Pool::sync`] every pool.
    pub fn sync_all(&mut self, now_ns: u64) {
        self.pools.values_mut().for_each(|p| p.sync(now_ns));
    }

    /// [`Pool::add_workload`].
    pub fn add_workload(
        &mut self,
        name: &str,
        draw: Draw,
        now_ns: u64,
    ) -> Result<Option<u64>, PoolsError> {
        let pool = self.get_mut(name)?;
        pool.add_workload(draw, now_ns)?;
        Ok(pool.empty_at())
    }

    /// [`Pool::remove_workload`].
    pub fn remove_workload(
        &mut self,
        name: &str,
        draw: Draw,
        now_ns: u64,
    ) -> Result<Option<u64>, PoolsError> {
        let pool = self.get_mut(name)?;
        pool.remove_workload(draw, now_ns)?;
        Ok(pool.empty_at())
    }

    /// [`Pool::top_up`].
    pub fn top_up(
        &mut self,
        name: &str,
        cu: u64,
        su: u64,
        ipv4u: u64,
        now_ns: u64,
    ) -> Result<Option<u64>, PoolsError> {
        let pool = self.get_mut(name)?;
        pool.top_up(cu, su, ipv4u, now_ns)?;
        Ok(pool.empty_at())
    }

    /// The pool that empties first (ties to the smaller name), by scanning
    /// every pool.
    pub fn next_expiry(&self) -> Option<(u64, &str)> {
        self.pools
            .values()
            .filter_map(|p| Some((p.empty_at()?, p.name())))
            .min()
    }

    fn get_mut(&mut self, name: &str) -> Result<&mut Pool, PoolsError> {
        self.pools.get_mut(name).ok_or_else(|| unknown(name))
    }
}
