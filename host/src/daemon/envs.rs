//! Environments as the daemon keeps them: `STATE/daemon/envs.json`.
//!
//! An environment (TTstack's Env) is a named group of unikernels with an
//! end time, its own bridge, subnet and nftables table. The file holds
//! every environment, rewritten whole and crash-safely on each change
//! (temporary file, `fdatasync`, rename, directory `fsync`), so it always
//! says either the old or the new. Which unikernels belong to one is said
//! by their own records in the desired state (`Spec::env`), not here.
//!
//! Creation is made all-or-nothing with the [`EnvState::Creating`]
//! state: the record is written first, then the bridge, the rules, the
//! images and the unikernels are made, and only then is it marked
//! [`EnvState::Running`]. A daemon that starts and finds an environment
//! still `Creating` (its predecessor died in the middle) removes all of
//! it: there is no half-made environment after a restart.

use super::desired::Owner;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Where an environment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnvState {
    /// Being made: after a crash, undone.
    Creating,
    Running,
    /// Its unikernels are saved and stopped.
    Stopped,
}

impl EnvState {
    pub fn name(self) -> &'static str {
        match self {
            EnvState::Creating => "creating",
            EnvState::Running => "running",
            EnvState::Stopped => "stopped",
        }
    }
}

/// One environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Env {
    /// Its name, a name in the policy tree (`alice:lab`).
    pub name: String,
    pub owner: Owner,
    /// A number unique among the daemon's environments: its table is
    /// `tt-env-<id>`, its TAPs `tte<id>u<n>`.
    pub id: u32,
    pub created_ns: u64,
    /// When it is destroyed (Unix ns).
    pub end_ns: u64,
    pub state: EnvState,
    pub deny_outgoing: bool,
    pub blacklist: Vec<Ipv4Addr>,
    pub bridge: String,
    /// `A.B.C.D/N`.
    pub subnet: String,
    /// The last management operation's time (Unix ns), for the rate
    /// limit.
    pub last_mgmt_ns: u64,
    /// The host number in the subnet the next unikernel gets (2 is the
    /// first after the gateway's 1); numbers are not reused while the
    /// environment lives.
    pub next_host: u32,
    /// The next TAP number.
    pub next_tap: u32,
}

impl Env {
    /// The nftables table of environment `id`.
    pub fn table_of(id: u32) -> String {
        format!("tt-env-{id}")
    }
    pub fn table(&self) -> String {
        Env::table_of(self.id)
    }
    /// The prefix of every TAP of environment `id`.
    pub fn tap_prefix(id: u32) -> String {
        format!("tte{id}u")
    }
    /// Its directory for saved unikernels (`STATE/envs/e<ID>`: outside
    /// the daemon's private directory, since each unikernel's owner opens
    /// its own saved guest).
    pub fn dir(&self, state_dir: &Path) -> PathBuf {
        state_dir.join("envs").join(format!("e{}", self.id))
    }
}

#[derive(Default, Serialize, Deserialize)]
struct File {
    envs: Vec<Env>,
}

/// Every environment, as the file says.
pub struct EnvStore {
    path: PathBuf,
    envs: BTreeMap<String, Env>,
}

impl EnvStore {
    /// Read `path` (none yet: no environment).
    pub fn open(path: &Path) -> Result<EnvStore, String> {
        let envs = match std::fs::read(path) {
            Ok(b) => {
                serde_json::from_slice::<File>(&b)
                    .map_err(|e| format!("{}: {e}", path.display()))?
                    .envs
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Ok(EnvStore {
            path: path.to_path_buf(),
            envs: envs.into_iter().map(|e| (e.name.clone(), e)).collect(),
        })
    }

    fn save(&self) -> Result<(), String> {
        let f = File {
            envs: self.envs.values().cloned().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&f).expect("environments always encode");
        super::sys::write_atomic(&self.path, &bytes)
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }

    pub fn get(&self, name: &str) -> Option<&Env> {
        self.envs.get(name)
    }

    pub fn all(&self) -> impl Iterator<Item = &Env> {
        self.envs.values()
    }

    /// Record `env` (new or changed); durable when this returns. On an
    /// error nothing changed.
    pub fn put(&mut self, env: Env) -> Result<(), String> {
        let old = self.envs.insert(env.name.clone(), env.clone());
        if let Err(e) = self.save() {
            match old {
                Some(o) => self.envs.insert(env.name.clone(), o),
                None => self.envs.remove(&env.name),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Forget `name`; durable when this returns.
    pub fn remove(&mut self, name: &str) -> Result<(), String> {
        if let Some(old) = self.envs.remove(name) {
            if let Err(e) = self.save() {
                self.envs.insert(name.to_string(), old);
                return Err(e);
            }
        }
        Ok(())
    }

    /// The smallest id no environment has.
    pub fn free_id(&self) -> u32 {
        let used: std::collections::BTreeSet<u32> = self.envs.values().map(|e| e.id).collect();
        (0..)
            .find(|i| !used.contains(i))
            .expect("fewer than 2^32 envs")
    }

    /// The environment that ends first (not counting those being made).
    pub fn next_end(&self) -> Option<(u64, String)> {
        self.envs
            .values()
            .filter(|e| e.state != EnvState::Creating)
            .map(|e| (e.end_ns, e.name.clone()))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str, id: u32, end: u64, state: EnvState) -> Env {
        Env {
            name: name.into(),
            owner: Owner {
                uid: 0,
                gid: 0,
                groups: vec![],
            },
            id,
            created_ns: 1,
            end_ns: end,
            state,
            deny_outgoing: false,
            blacklist: vec![],
            bridge: format!("tte{id}"),
            subnet: format!("10.213.{id}.0/24"),
            last_mgmt_ns: 0,
            next_host: 2,
            next_tap: 0,
        }
    }

    #[test]
    fn environments_survive_reopening_and_the_first_end_is_known() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("envs.json");
        let mut s = EnvStore::open(&path).unwrap();
        assert_eq!(s.free_id(), 0);
        s.put(env("a", 0, 50, EnvState::Running)).unwrap();
        s.put(env("b", 1, 30, EnvState::Stopped)).unwrap();
        s.put(env("c", 2, 10, EnvState::Creating)).unwrap();
        assert_eq!(s.next_end(), Some((30, "b".into())), "creating ones wait");
        s.remove("b").unwrap();
        assert_eq!(s.free_id(), 1);
        let s = EnvStore::open(&path).unwrap();
        assert_eq!(
            s.all().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!(s.get("c").unwrap().state, EnvState::Creating);
        std::fs::write(&path, b"{not json").unwrap();
        let e = EnvStore::open(&path).err().unwrap();
        assert!(e.contains("envs.json"), "{e}");
    }
}
