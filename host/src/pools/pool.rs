//! One pool: three counters of unit-seconds, the draw of its workloads, and
//! the instant they were last charged.
//!
//! A pool is charged lazily, as tfexplorer's `SyncCurrentCapacity` does:
//! nothing happens while time passes; [`Pool::sync`] deducts `draw x time
//! since the last sync` from each counter (never below 0) and moves the
//! sync instant to `now`. Every change (a workload added or removed, a
//! top-up) syncs first, so the draw that applied to a stretch of time is
//! the one that was running then.
//!
//! [`Pool::empty_at`] is when the first counter that something draws on
//! reaches 0. Counters are exact (µunit-nanoseconds, see
//! [`units`](super::units)), so syncing at any instant before `empty_at`
//! leaves `empty_at` unchanged: only a change of draw or a top-up moves it.
//!
//! Time is always a parameter (nanoseconds on whatever clock the caller
//! uses, e.g. `CLOCK_REALTIME` since the epoch, so that time passed while
//! the daemon was down is charged). A `now` before the last sync charges
//! nothing and never moves the sync instant back.

use super::units::{Draw, NANOS_PER_SECOND, PER_UNIT_SECOND};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The three kinds of capacity unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// Compute units.
    Cu,
    /// Storage units.
    Su,
    /// Public IPv4 units.
    Ipv4u,
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unit::Cu => "CU",
            Unit::Su => "SU",
            Unit::Ipv4u => "IPv4U",
        })
    }
}

/// What is wrong with a change to a pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Adding the workload would make the pool's draw overflow u64.
    #[error(
        "pool {pool}: adding a workload drawing {added} µ{unit}/s to the {draw} µ{unit}/s \
         it draws already overflows the draw; spread the workloads over several pools"
    )]
    DrawOverflow {
        /// The pool.
        pool: String,
        /// The counter.
        unit: Unit,
        /// The pool's draw before.
        draw: u64,
        /// The workload's draw.
        added: u64,
    },
    /// The workload removed draws more than the whole pool: it was never
    /// added to this pool (or was removed twice).
    #[error(
        "pool {pool}: removing a workload drawing {removed} µ{unit}/s, but the pool draws \
         only {draw} µ{unit}/s; remove a workload only from the pool it was added to, once"
    )]
    DrawUnderflow {
        /// The pool.
        pool: String,
        /// The counter.
        unit: Unit,
        /// The pool's draw.
        draw: u64,
        /// The workload's draw.
        removed: u64,
    },
    /// The top-up would overflow a counter.
    #[error(
        "pool {pool}: a top-up of {amount} {unit}-seconds overflows its counter; \
         top up a smaller amount"
    )]
    TopUpOverflow {
        /// The pool.
        pool: String,
        /// The counter.
        unit: Unit,
        /// The whole unit-seconds of the top-up.
        amount: u64,
    },
}

/// A pool of unit-seconds. Serialized as is (the daemon persists pools);
/// the counters are u128 numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    name: String,
    /// CU left, in µCU-nanoseconds ([`PER_UNIT_SECOND`] per CU-second).
    cu: u128,
    /// SU left, in µSU-nanoseconds.
    su: u128,
    /// IPv4U left, in µIPv4U-nanoseconds.
    ipv4u: u128,
    /// The sum of the draws of the pool's workloads.
    draw: Draw,
    /// When the counters were last charged.
    last_sync_ns: u64,
}

impl Pool {
    /// An empty pool (no unit-seconds, no workloads), synced at `now_ns`.
    pub fn new(name: impl Into<String>, now_ns: u64) -> Pool {
        Pool {
            name: name.into(),
            cu: 0,
            su: 0,
            ipv4u: 0,
            draw: Draw::ZERO,
            last_sync_ns: now_ns,
        }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What is left of `unit`, in µunit-nanoseconds, as of the last sync
    /// (divide by [`PER_UNIT_SECOND`] for unit-seconds).
    pub fn left(&self, unit: Unit) -> u128 {
        match unit {
            Unit::Cu => self.cu,
            Unit::Su => self.su,
            Unit::Ipv4u => self.ipv4u,
        }
    }

    /// The sum of its workloads' draws, in µunits per second.
    pub fn draw(&self) -> Draw {
        self.draw
    }

    /// When the counters were last charged.
    pub fn last_sync_ns(&self) -> u64 {
        self.last_sync_ns
    }

    /// Charge the draw for the time since the last sync, down to 0, and
    /// make `now_ns` the last sync. A `now_ns` at or before the last sync
    /// changes nothing.
    pub fn sync(&mut self, now_ns: u64) {
        let Some(elapsed) = now_ns.checked_sub(self.last_sync_ns) else {
            return;
        };
        let elapsed = elapsed as u128;
        let charge = |left: u128, draw: u64| left.saturating_sub((draw as u128) * elapsed);
        self.cu = charge(self.cu, self.draw.cu);
        self.su = charge(self.su, self.draw.su);
        self.ipv4u = charge(self.ipv4u, self.draw.ipv4u);
        self.last_sync_ns = now_ns;
    }

    /// The first instant at which a counter that something draws on is 0:
    /// the last sync if one already is, `None` if nothing draws. Saturates
    /// at `u64::MAX` (beyond the year 2500 on an epoch clock).
    pub fn empty_at(&self) -> Option<u64> {
        empty_at([self.cu, self.su, self.ipv4u], self.draw, self.last_sync_ns)
    }

    /// Sync, then add a workload's draw.
    pub fn add_workload(&mut self, draw: Draw, now_ns: u64) -> Result<(), PoolError> {
        self.sync(now_ns);
        self.draw = self.draw.checked_add(&draw).ok_or_else(|| {
            let (unit, have, added) = first_failing(self.draw, draw, |a, b| a.checked_add(b));
            PoolError::DrawOverflow {
                pool: self.name.clone(),
                unit,
                draw: have,
                added,
            }
        })?;
        Ok(())
    }

    /// Sync, then take a workload's draw away.
    pub fn remove_workload(&mut self, draw: Draw, now_ns: u64) -> Result<(), PoolError> {
        self.sync(now_ns);
        self.draw = self.draw.checked_sub(&draw).ok_or_else(|| {
            let (unit, have, removed) = first_failing(self.draw, draw, |a, b| a.checked_sub(b));
            PoolError::DrawUnderflow {
                pool: self.name.clone(),
                unit,
                draw: have,
                removed,
            }
        })?;
        Ok(())
    }

    /// Sync, then add whole unit-seconds to each counter (a reservation's
    /// amounts). Nothing is added if any counter would overflow.
    pub fn top_up(&mut self, cu: u64, su: u64, ipv4u: u64, now_ns: u64) -> Result<(), PoolError> {
        self.sync(now_ns);
        let add = |left: u128, unit: Unit, amount: u64| {
            left.checked_add(amount as u128 * PER_UNIT_SECOND)
                .ok_or_else(|| PoolError::TopUpOverflow {
                    pool: self.name.clone(),
                    unit,
                    amount,
                })
        };
        let (c, s, i) = (
            add(self.cu, Unit::Cu, cu)?,
            add(self.su, Unit::Su, su)?,
            add(self.ipv4u, Unit::Ipv4u, ipv4u)?,
        );
        (self.cu, self.su, self.ipv4u) = (c, s, i);
        Ok(())
    }

    /// Admission: if the pool, synced to `now_ns` and drawing `extra` as
    /// well, would be empty before `now_ns + min_run_ns`, the instant it
    /// would be (its would-be EmptyAt); `None` if it would last at least
    /// `min_run_ns`. Changes nothing.
    pub fn would_be_empty_within(&self, extra: Draw, now_ns: u64, min_run_ns: u64) -> Option<u64> {
        let mut synced = [self.cu, self.su, self.ipv4u];
        let at = now_ns.max(self.last_sync_ns);
        let elapsed = (at - self.last_sync_ns) as u128;
        let draws = [self.draw.cu, self.draw.su, self.draw.ipv4u];
        for (left, d) in synced.iter_mut().zip(draws) {
            *left = left.saturating_sub(d as u128 * elapsed);
        }
        let total = Draw {
            cu: self.draw.cu.saturating_add(extra.cu),
            su: self.draw.su.saturating_add(extra.su),
            ipv4u: self.draw.ipv4u.saturating_add(extra.ipv4u),
        };
        let empty = empty_at(synced, total, at)?;
        (empty < now_ns.saturating_add(min_run_ns)).then_some(empty)
    }
}

/// Nanoseconds for `seconds` whole seconds (saturating): for callers that
/// configure a minimum run time or a warning in seconds.
pub fn seconds_to_ns(seconds: u64) -> u64 {
    seconds.saturating_mul(NANOS_PER_SECOND)
}

/// The first instant at or after `at` where a counter with a non-zero draw
/// is 0, given the counters' values at `at`.
fn empty_at(left: [u128; 3], draw: Draw, at: u64) -> Option<u64> {
    let draws = [draw.cu, draw.su, draw.ipv4u];
    left.into_iter()
        .zip(draws)
        .filter(|&(_, d)| d != 0)
        .map(|(l, d)| {
            // The counter is 0 once d * t >= l: t = ceil(l / d).
            let t = l.div_ceil(d as u128);
            u64::try_from(t)
                .ok()
                .and_then(|t| at.checked_add(t))
                .unwrap_or(u64::MAX)
        })
        .min()
}

/// The first unit for which `op(have, change)` fails, for error messages.
fn first_failing(
    have: Draw,
    change: Draw,
    op: impl Fn(u64, u64) -> Option<u64>,
) -> (Unit, u64, u64) {
    [
        (Unit::Cu, have.cu, change.cu),
        (Unit::Su, have.su, change.su),
        (Unit::Ipv4u, have.ipv4u, change.ipv4u),
    ]
    .into_iter()
    .find(|&(_, a, b)| op(a, b).is_none())
    .unwrap_or((Unit::Cu, have.cu, change.cu))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pools::units::MICRO;

    const S: u64 = NANOS_PER_SECOND;

    fn cu(micro: u64) -> Draw {
        Draw {
            cu: micro,
            ..Draw::ZERO
        }
    }

    fn pool(cu_s: u64, su_s: u64, ipv4u_s: u64) -> Pool {
        let mut p = Pool::new("p", 0);
        p.top_up(cu_s, su_s, ipv4u_s, 0).expect("fits");
        p
    }

    #[test]
    fn sync_charges_draw_times_elapsed() {
        let mut p = pool(10, 0, 0);
        p.add_workload(cu(MICRO / 2), 0).unwrap();
        p.sync(4 * S);
        // Half a CU for 4 s: 2 CU-seconds spent, 8 left.
        assert_eq!(p.left(Unit::Cu), 8 * PER_UNIT_SECOND);
        assert_eq!(p.last_sync_ns(), 4 * S);
    }

    #[test]
    fn sync_clamps_at_zero_and_never_goes_back_in_time() {
        let mut p = pool(1, 5, 0);
        p.add_workload(cu(MICRO), 0).unwrap();
        p.sync(100 * S);
        assert_eq!(p.left(Unit::Cu), 0);
        assert_eq!(p.left(Unit::Su), 5 * PER_UNIT_SECOND, "SU is not drawn");
        p.sync(50 * S);
        assert_eq!(
            p.last_sync_ns(),
            100 * S,
            "an earlier now does not move the sync back"
        );
    }

    #[test]
    fn empty_at_is_the_first_drawn_counter_to_run_out() {
        let mut p = pool(10, 3, 100);
        assert_eq!(p.empty_at(), None, "nothing draws");
        p.add_workload(
            Draw {
                cu: MICRO,
                su: MICRO,
                ipv4u: 0,
            },
            0,
        )
        .unwrap();
        assert_eq!(p.empty_at(), Some(3 * S), "SU runs out first");
        // Syncing before EmptyAt does not move it.
        p.sync(S + 7);
        assert_eq!(p.empty_at(), Some(3 * S));
    }

    #[test]
    fn empty_at_rounds_up_to_the_first_nanosecond_at_zero() {
        // 1 CU-second drawn at 3 µCU/s: 333333.33.. s.
        let mut p = pool(1, 0, 0);
        p.add_workload(cu(3), 0).unwrap();
        let at = p.empty_at().unwrap();
        assert_eq!(at, (PER_UNIT_SECOND).div_ceil(3) as u64);
        let mut before = p.clone();
        before.sync(at - 1);
        assert!(before.left(Unit::Cu) > 0, "not empty a nanosecond before");
        p.sync(at);
        assert_eq!(p.left(Unit::Cu), 0, "empty at EmptyAt");
    }

    #[test]
    fn a_drawn_counter_already_at_zero_is_empty_at_the_last_sync() {
        let mut p = Pool::new("p", 5 * S);
        assert_eq!(p.empty_at(), None);
        p.add_workload(cu(1), 6 * S).unwrap();
        assert_eq!(p.empty_at(), Some(6 * S));
    }

    #[test]
    fn a_top_up_before_expiry_extends_it() {
        let mut p = pool(10, 0, 0);
        p.add_workload(cu(MICRO), 0).unwrap();
        assert_eq!(p.empty_at(), Some(10 * S));
        p.top_up(5, 0, 0, 4 * S).unwrap();
        assert_eq!(p.empty_at(), Some(15 * S));
        // After expiry a top-up starts from 0, not from a debt.
        p.sync(20 * S);
        p.top_up(5, 0, 0, 20 * S).unwrap();
        assert_eq!(p.empty_at(), Some(25 * S));
    }

    #[test]
    fn removing_a_workload_stops_its_draw_from_that_instant() {
        let mut p = pool(10, 0, 0);
        p.add_workload(cu(MICRO), 0).unwrap();
        p.add_workload(cu(MICRO), 2 * S).unwrap();
        p.remove_workload(cu(MICRO), 4 * S).unwrap();
        // 0..2 s at 1 CU, 2..4 s at 2 CU: 6 spent, 4 left at 1 CU.
        assert_eq!(p.left(Unit::Cu), 4 * PER_UNIT_SECOND);
        assert_eq!(p.empty_at(), Some(8 * S));
    }

    #[test]
    fn removing_more_than_was_added_is_refused_and_names_the_pool() {
        let mut p = pool(10, 0, 0);
        p.add_workload(cu(5), 0).unwrap();
        let err = p.remove_workload(cu(6), S).unwrap_err();
        assert!(matches!(
            err,
            PoolError::DrawUnderflow {
                unit: Unit::Cu,
                draw: 5,
                removed: 6,
                ..
            }
        ));
        assert!(err.to_string().contains("pool p"), "{err}");
        assert_eq!(p.draw(), cu(5), "the draw is unchanged");
    }

    #[test]
    fn overflowing_draws_and_top_ups_are_refused_without_change() {
        let mut p = pool(1, 1, 1);
        p.add_workload(cu(u64::MAX), 0).unwrap();
        assert!(matches!(
            p.add_workload(cu(1), 0),
            Err(PoolError::DrawOverflow { unit: Unit::Cu, .. })
        ));
        let mut q = pool(0, 0, 0);
        for _ in 0..20_000 {
            if q.top_up(0, u64::MAX, 0, 0).is_err() {
                break;
            }
        }
        let before = q.clone();
        let err = q.top_up(1, u64::MAX, 0, 0).unwrap_err();
        assert!(
            matches!(err, PoolError::TopUpOverflow { unit: Unit::Su, .. }),
            "{err}"
        );
        assert_eq!(q, before, "no counter changed, not even CU");
    }

    #[test]
    fn admission_refuses_a_workload_that_would_empty_the_pool_too_soon() {
        let mut p = pool(120, 0, 0);
        p.add_workload(cu(MICRO / 2), 0).unwrap();
        // At 10 s: 115 CU-s left; alone it lasts to 240 s.
        let now = 10 * S;
        assert_eq!(p.would_be_empty_within(Draw::ZERO, now, 120 * S), None);
        // Adding 1 CU: 1.5 CU/s from 115 -> empty at 10 + 76.67 s.
        let e = p.would_be_empty_within(cu(MICRO), now, 120 * S);
        assert_eq!(
            e,
            Some(now + (115 * PER_UNIT_SECOND).div_ceil(1_500_000) as u64)
        );
        // With a 60 s minimum it is admitted.
        assert_eq!(p.would_be_empty_within(cu(MICRO), now, 60 * S), None);
        // Nothing changed.
        assert_eq!(p.last_sync_ns(), 0);
        assert_eq!(p.draw(), cu(MICRO / 2));
        // A workload that draws nothing the pool lacks is always admitted.
        let empty = Pool::new("e", 0);
        assert_eq!(empty.would_be_empty_within(Draw::ZERO, now, 120 * S), None);
        assert_eq!(empty.would_be_empty_within(cu(1), now, 120 * S), Some(now));
    }

    #[test]
    fn pools_round_trip_through_json_with_large_counters() {
        let mut p = pool(u64::MAX, 3, 0);
        p.add_workload(cu(7), 11).unwrap();
        let json = serde_json::to_string(&p).unwrap();
        let back: Pool = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        let bytes = postcard::to_stdvec(&p).unwrap();
        assert_eq!(postcard::from_bytes::<Pool>(&bytes).unwrap(), p);
    }
}
