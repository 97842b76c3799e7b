//! Environments, runtime images and disk snapshots: the supervisor's side
//! (docs/ENVIRONMENTS.md).
//!
//! - An environment's record ([`super::super::envs`]) is written before
//!   anything is made for it, in the `creating` state, and marked
//!   `running` only when its bridge, rules, images and unikernels are all
//!   there; [`Supervisor::recover_envs`] undoes one found `creating`.
//! - A unikernel of an environment carries in its desired-state record
//!   what the daemon made for it (runtime images, TAP, address, port
//!   forwards), so that whoever forgets it releases exactly that.
//! - Stopping an environment saves each guest (`tt-host snapshot --stop`)
//!   into `STATE/envs/e<ID>/u-NAME/`; starting it resumes them
//!   from there (`tt-host restore`). A stopped unikernel has no process,
//!   so it holds nothing in admission.
//! - One timer destroys environments at their end and removes disk
//!   snapshots at theirs, sleeping until the first of those.

use super::super::desired::{Owner, RuntimeImage, Spec, UnitNet};
use super::super::envs::{Env, EnvState, EnvStore};
use super::super::proto::NewUnit;
use super::super::sys::now_ns;
use super::{Started, State, Supervisor};
use crate::envnet::{self, EnvNet, Forward, Subnet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

mod cluster;

/// Make `dir` (and what is missing above it) and let anyone traverse it
/// (mode 0711: no listing, no writing), so that a unikernel's owner, whose
/// identity tt-host run opens its files with, reaches the file of its own
/// made below it (a runtime image, a saved guest: each the owner's, 0600
/// or 0700). Directories above `dir` up to `top` get the search bit too.
pub fn make_traversable(top: &Path, dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut d = Some(dir);
    while let Some(p) = d {
        let mode = std::fs::metadata(p)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .permissions()
            .mode();
        if mode & 0o011 != 0o011 {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode((mode & 0o7777) | 0o011))
                .map_err(|e| format!("{}: {e}", p.display()))?;
        }
        if p == top {
            break;
        }
        d = p.parent().filter(|q| q.starts_with(top));
    }
    Ok(())
}

/// What an environment's creation asks (also as another cluster node
/// asks it of this one: `env create --anywhere`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvRequest {
    pub name: String,
    pub owner: Owner,
    pub lifetime: Duration,
    pub deny_outgoing: bool,
    pub blacklist: Vec<String>,
    pub bridge: Option<String>,
    pub subnet: Option<String>,
    pub units: Vec<NewUnit>,
}

/// The default guest arguments that give a unikernel its address: as
/// MirageOS takes them.
const DEFAULT_IP_ARGS: [&str; 2] = ["--ipv4={ip}/{prefix}", "--ipv4-gateway={gateway}"];

/// Fill `{ip}`, `{prefix}`, `{netmask}` and `{gateway}` in `template`.
pub fn ip_arg(template: &str, ip: Ipv4Addr, subnet: &Subnet) -> String {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(subnet.prefix))
        .unwrap_or(0);
    template
        .replace("{ip}", &ip.to_string())
        .replace("{prefix}", &subnet.prefix.to_string())
        .replace("{netmask}", &Ipv4Addr::from(mask).to_string())
        .replace("{gateway}", &subnet.gateway().to_string())
}

/// The subnet environment `env` records.
fn subnet_of(env: &Env) -> Result<Subnet, String> {
    env.subnet
        .parse::<Subnet>()
        .map_err(|e| format!("environment {}: subnet {}: {e}", env.name, env.subnet))
}

fn chown(path: &Path, owner: &Owner) -> Result<(), String> {
    std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid))
        .map_err(|e| format!("cannot give {} to uid {}: {e}", path.display(), owner.uid))
}

/// `chown -R` of a saved guest's directory (the owner's `tt-host restore`
/// opens its files).
fn chown_tree(dir: &Path, owner: &Owner) -> Result<(), String> {
    chown(dir, owner)?;
    for e in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let e = e.map_err(|e| format!("{}: {e}", dir.display()))?;
        chown(&e.path(), owner)?;
    }
    Ok(())
}

impl Supervisor {
    pub(super) fn envs(&self) -> MutexGuard<'_, EnvStore> {
        self.envs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn runtime_image_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("images").join("runtime")
    }

    /// Where a unikernel of environment `env` is saved while it is
    /// stopped (its owner's, 0700, below directories anyone may traverse).
    fn save_dir(&self, env: &Env, unit: &str) -> PathBuf {
        env.dir(&self.cfg.state_dir).join(format!("u-{unit}"))
    }

    /// The saved guest `spec`'s unikernel resumes from, if there is one.
    pub(super) fn saved_guest(&self, spec: &Spec) -> Option<PathBuf> {
        let envs = self.envs();
        let env = envs.get(spec.env.as_deref()?)?;
        let dir = self.save_dir(env, &spec.name);
        dir.join("state").exists().then_some(dir)
    }

    /// The rules of environment `env`, with the forwards of `members`.
    fn env_net<'a>(env: &Env, members: impl Iterator<Item = &'a Spec>) -> Result<EnvNet, String> {
        let subnet = subnet_of(env)?;
        let mut forwards = Vec::new();
        for spec in members.filter(|s| s.env.as_deref() == Some(env.name.as_str())) {
            if let Some(net) = &spec.net {
                for p in &net.ports {
                    let mut f =
                        Forward::parse(p).map_err(|e| format!("{}: {p}: {e}", spec.name))?;
                    f.guest = net.ip;
                    forwards.push(f);
                }
            }
        }
        Ok(EnvNet {
            table: env.table(),
            bridge: env.bridge.clone(),
            subnet,
            deny_outgoing: env.deny_outgoing,
            blacklist: env.blacklist.clone(),
            forwards,
        })
    }

    /// Write environment `name`'s rules as its unikernels now need them.
    fn apply_net(&self, name: &str) -> Result<(), String> {
        let net = {
            let inner = self.lock();
            let envs = self.envs();
            let Some(env) = envs.get(name) else {
                return Ok(());
            };
            Self::env_net(env, inner.units.values().map(|u| &u.spec))?
        };
        envnet::apply(&net).map_err(|e| format!("environment {name}: {e}"))
    }

    /// At the daemon's start: make again the bridges, TAPs and rules that
    /// a reboot removed, for every environment that is not being undone.
    pub(super) fn restore_networks(&self, specs: &std::collections::BTreeMap<String, Spec>) {
        let envs: Vec<Env> = self
            .envs()
            .all()
            .filter(|e| e.state != EnvState::Creating)
            .cloned()
            .collect();
        for env in envs {
            let r = (|| {
                let subnet = subnet_of(&env)?;
                if !envnet::link_exists(&env.bridge).map_err(|e| e.to_string())? {
                    envnet::create_bridge(&env.bridge, subnet.gateway(), subnet.prefix)
                        .map_err(|e| e.to_string())?;
                    let _ = envnet::enable_ip_forward();
                }
                for spec in specs.values() {
                    if spec.env.as_deref() != Some(env.name.as_str()) {
                        continue;
                    }
                    if let Some(net) = &spec.net {
                        if !envnet::link_exists(&net.tap).map_err(|e| e.to_string())? {
                            envnet::create_tap(&net.tap, &env.bridge, Some(spec.owner.uid))
                                .map_err(|e| e.to_string())?;
                        }
                    }
                }
                let net = Self::env_net(&env, specs.values())?;
                envnet::apply(&net).map_err(|e| e.to_string())
            })();
            if let Err(e) = r {
                log::warn!("environment {}: cannot restore its network: {e}", env.name);
            }
        }
    }

    /// Release what the daemon made for `spec`'s unikernel: its TAP, its
    /// port forwards, its runtime images (kept ones only if `drop_kept`).
    pub(super) fn release(&self, spec: &Spec, drop_kept: bool) {
        for img in &spec.images {
            if img.keep && !drop_kept {
                log::info!("{}: runtime image kept: {}", spec.name, img.path.display());
                continue;
            }
            if let Err(e) = std::fs::remove_file(&img.path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("{}: cannot remove {}: {e}", spec.name, img.path.display());
                }
            }
        }
        if let Some(net) = &spec.net {
            if let Err(e) = envnet::delete_link(&net.tap) {
                log::warn!("{}: {e}", spec.name);
            }
            if let Some(env) = &spec.env {
                if !net.ports.is_empty() {
                    if let Err(e) = self.apply_net(env) {
                        log::warn!("{}: {e}", spec.name);
                    }
                }
            }
        }
        if let Some(env) = spec.env.as_ref().and_then(|e| self.envs().get(e).cloned()) {
            let _ = std::fs::remove_dir_all(self.save_dir(&env, &spec.name));
        }
    }

    /// Make what `unit` needs beyond its command line: runtime images from
    /// templates, a TAP and an address on its environment's network (whose
    /// record `env` is, counters advanced), and return its spec. On an
    /// error, nothing made is left.
    fn prepare(
        &self,
        unit: NewUnit,
        owner: Owner,
        mut env: Option<&mut Env>,
    ) -> Result<Spec, String> {
        let name = unit.name.clone();
        let mut spec = Spec {
            name: unit.name,
            args: unit.args,
            restart_on_fail: unit.restart_on_fail,
            owner,
            created_ns: now_ns(),
            pool: unit.pool,
            env: unit.env,
            images: vec![],
            net: None,
        };
        let made = (|| {
            for (dev, template) in &unit.disk_from {
                let given = format!("--block:{dev}=");
                if spec.args.iter().any(|a| a.starts_with(&given)) {
                    return Err(format!(
                        "create {name}: block device {dev} is given by --block and --disk-from"
                    ));
                }
                let file = match env.as_deref() {
                    Some(e) => format!("e{}-{:x}.r{:x}.img", e.id, e.created_ns, now_ns()),
                    None => format!("r{:x}.img", now_ns()),
                };
                let path = self.runtime_image_dir().join(file);
                self.templates
                    .instantiate(template, &path)
                    .map_err(|e| format!("create {name}: --disk-from:{dev}={template}: {e}"))?;
                spec.images.push(RuntimeImage {
                    device: dev.clone(),
                    template: template.clone(),
                    path: path.clone(),
                    keep: unit.keep_image,
                });
                chown(&path, &spec.owner)?;
                spec.args
                    .insert(0, format!("--block:{dev}={}", path.display()));
            }
            if let Some(dev) = &unit.env_net {
                let env = env
                    .as_deref_mut()
                    .ok_or_else(|| format!("create {name}: --env-net needs --env"))?;
                let given = format!("--net:{dev}=");
                if spec.args.iter().any(|a| a.starts_with(&given)) {
                    return Err(format!(
                        "create {name}: net device {dev} is given by --net and --env-net"
                    ));
                }
                let subnet = subnet_of(env)?;
                let ip = subnet.host(env.next_host).ok_or_else(|| {
                    format!(
                        "create {name}: environment {}'s subnet {} is full",
                        env.name, env.subnet
                    )
                })?;
                let tap = format!("{}{}", Env::tap_prefix(env.id), env.next_tap);
                env.next_host += 1;
                env.next_tap += 1;
                let templates: Vec<String> = if unit.ip_args.is_empty() {
                    DEFAULT_IP_ARGS.iter().map(|s| s.to_string()).collect()
                } else {
                    unit.ip_args.clone()
                };
                if !spec.args.iter().any(|a| a == "--") {
                    spec.args.push("--".into());
                }
                spec.args
                    .extend(templates.iter().map(|t| ip_arg(t, ip, &subnet)));
                for p in &unit.ports {
                    Forward::parse(p).map_err(|e| format!("create {name}: --port={p}: {e}"))?;
                }
                spec.net = Some(UnitNet {
                    device: dev.clone(),
                    tap: tap.clone(),
                    ip,
                    ports: unit.ports.clone(),
                });
                envnet::create_tap(&tap, &env.bridge, Some(spec.owner.uid))
                    .map_err(|e| format!("create {name}: {e}"))?;
                spec.args.insert(0, format!("--net:{dev}={tap}"));
            }
            Ok(())
        })();
        if let Err(e) = made {
            self.release(&spec, true);
            return Err(e);
        }
        Ok(spec)
    }

    /// A host port forwarded by another unikernel, if one of `ports` is.
    fn port_taken(&self, ports: &[String]) -> Option<String> {
        let wanted: Vec<Forward> = ports
            .iter()
            .filter_map(|p| Forward::parse(p).ok())
            .collect();
        let inner = self.lock();
        for u in inner.units.values() {
            for p in u.spec.net.iter().flat_map(|n| &n.ports) {
                if let Ok(f) = Forward::parse(p) {
                    if wanted
                        .iter()
                        .any(|w| w.host_port == f.host_port && w.proto == f.proto)
                    {
                        return Some(format!(
                            "host port {} ({:?}) is forwarded to {} already",
                            f.host_port, f.proto, u.spec.name
                        ));
                    }
                }
            }
        }
        None
    }

    /// `create`: a unikernel, in an environment or not, with the images and
    /// network it asks for.
    pub async fn create_unit(
        self: &Arc<Self>,
        unit: NewUnit,
        owner: Owner,
        received: Instant,
    ) -> Result<Started, String> {
        let _ops = match unit.env {
            Some(_) => Some(self.env_ops.lock().await),
            None => None,
        };
        let joins = unit.env.is_some();
        let r = self.create_in_env(unit, owner, received, false).await;
        if joins {
            // Its environment's record counts it.
            self.cluster_sync().await;
        }
        r
    }

    /// Create `unit`; in its environment, which must be running (or being
    /// created, with `creating`). The caller holds `env_ops` if it names
    /// an environment.
    async fn create_in_env(
        self: &Arc<Self>,
        unit: NewUnit,
        owner: Owner,
        received: Instant,
        creating: bool,
    ) -> Result<Started, String> {
        let spec = self.prepare_in_env(unit, owner, creating)?;
        self.create_prepared(spec, received, true).await
    }

    /// Check `unit` against the unikernels and its environment, and make
    /// what it needs ([`Supervisor::prepare`]), its environment's counters
    /// advanced and recorded.
    fn prepare_in_env(&self, unit: NewUnit, owner: Owner, creating: bool) -> Result<Spec, String> {
        let name = unit.name.clone();
        if self.exists(&name) {
            return Err(format!("{name} exists (destroy it first, or restart it)"));
        }
        if let Some(why) = self.port_taken(&unit.ports) {
            return Err(format!("create {name}: {why}"));
        }
        let Some(env_name) = unit.env.clone() else {
            return self.prepare(unit, owner, None);
        };
        let mut env = self
            .envs()
            .get(&env_name)
            .cloned()
            .ok_or_else(|| format!("create {name}: {}", self.no_env(&env_name)))?;
        let ok = match env.state {
            EnvState::Running => true,
            EnvState::Creating => creating,
            EnvState::Stopped => false,
        };
        if !ok {
            return Err(format!(
                "create {name}: environment {env_name} is {} (start it first)",
                env.state.name()
            ));
        }
        let spec = self.prepare(unit, owner, Some(&mut env))?;
        let recorded = self.envs().put(env);
        if let Err(e) = recorded {
            self.release(&spec, true);
            return Err(e);
        }
        Ok(spec)
    }

    /// Record and start the unikernel `spec` describes, then (with
    /// `forward`) load its environment's rules with its ports.
    async fn create_prepared(
        self: &Arc<Self>,
        spec: Spec,
        received: Instant,
        forward: bool,
    ) -> Result<Started, String> {
        let name = spec.name.clone();
        let forwards = spec.net.as_ref().is_some_and(|n| !n.ports.is_empty());
        let env = spec.env.clone();
        let started = match self.create(spec.clone(), received).await {
            Ok(s) => s,
            Err(e) => {
                // A create refused before it recorded the unikernel
                // forgot nothing: release what prepare made here.
                if !self.exists(&spec.name) {
                    self.release(&spec, true);
                }
                return Err(e);
            }
        };
        if let (true, true, Some(env)) = (forward, forwards, env) {
            // nft takes milliseconds: not on the daemon's one thread.
            let sup = self.clone();
            let applied = tokio::task::spawn_blocking(move || sup.apply_net(&env))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
            if let Err(e) = applied {
                let _ = self.destroy(&name).await;
                return Err(e);
            }
        }
        Ok(started)
    }

    /// Refuse a management operation on `env` within the interval after
    /// the last one (TTstack's `last_mgmt_timestamp`), else note it.
    fn rate_limit(&self, env: &mut Env) -> Result<(), String> {
        let now = now_ns();
        let since = Duration::from_nanos(now.saturating_sub(env.last_mgmt_ns));
        let min = self.cfg.env_mgmt_interval;
        if since < min {
            return Err(format!(
                "environment {}: managed {} ms ago; one management operation per {} ms \
                 (try again in {} ms)",
                env.name,
                since.as_millis(),
                min.as_millis(),
                (min - since).as_millis().max(1)
            ));
        }
        env.last_mgmt_ns = now;
        Ok(())
    }

    fn env_or_err(&self, name: &str) -> Result<Env, String> {
        self.envs()
            .get(name)
            .cloned()
            .ok_or_else(|| self.no_env(name))
    }

    /// The unikernels of environment `env`.
    fn members(&self, env: &str) -> Vec<String> {
        self.lock()
            .units
            .iter()
            .filter(|(_, u)| u.spec.env.as_deref() == Some(env))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// `env create`: the environment and its unikernels, all or nothing.
    pub async fn env_create(self: &Arc<Self>, req: EnvRequest) -> Result<String, String> {
        let _ops = self.env_ops.lock().await;
        let name = req.name.clone();
        let env = {
            let envs = self.envs();
            if envs.get(&name).is_some() {
                return Err(format!("environment {name} exists"));
            }
            let id = envs.free_id();
            let subnet: Subnet = match &req.subnet {
                Some(s) => s.parse().map_err(|e| format!("--subnet={s}: {e}"))?,
                None if id < 256 => format!("10.213.{id}.0/24")
                    .parse::<Subnet>()
                    .map_err(|e| e.to_string())?,
                None => return Err("more than 256 environments: give --subnet".into()),
            };
            let bridge = req.bridge.clone().unwrap_or_else(|| format!("tte{id}"));
            for other in envs.all() {
                if other.bridge == bridge {
                    return Err(format!("bridge {bridge} is environment {}'s", other.name));
                }
                if other.subnet == subnet.to_string() {
                    return Err(format!("subnet {subnet} is environment {}'s", other.name));
                }
            }
            if envnet::link_exists(&bridge).map_err(|e| e.to_string())? {
                return Err(format!(
                    "a network interface named {bridge} exists already (choose --bridge)"
                ));
            }
            let mut blacklist = Vec::new();
            for a in &req.blacklist {
                blacklist.push(
                    a.parse::<Ipv4Addr>()
                        .map_err(|_| format!("--blacklist: '{a}' is not an IPv4 address"))?,
                );
            }
            let now = now_ns();
            Env {
                name: name.clone(),
                owner: req.owner.clone(),
                id,
                created_ns: now,
                end_ns: now.saturating_add(req.lifetime.as_nanos() as u64),
                state: EnvState::Creating,
                deny_outgoing: req.deny_outgoing,
                blacklist,
                bridge,
                subnet: subnet.to_string(),
                last_mgmt_ns: 0,
                next_host: 0,
                next_tap: 0,
            }
        };
        for u in &req.units {
            if self.exists(&u.name) {
                return Err(format!("{} exists", u.name));
            }
        }
        // On a cluster node, the name is claimed in the cluster before
        // anything is made; the claim stands until the record is here.
        #[cfg(feature = "cluster")]
        let claim = match self.cluster.get() {
            Some(node) => {
                let rec = cluster::record(&env, &node.cluster.cfg.node, std::iter::empty());
                Some(node.claim_env(&rec).await?)
            }
            None => None,
        };
        // The record first: whatever follows, a daemon that dies now
        // finds it 'creating' and undoes it.
        let recorded = self.envs().put(env.clone());
        #[cfg(feature = "cluster")]
        drop(claim);
        if let Err(e) = recorded {
            // The claim goes with it.
            self.cluster_sync().await;
            return Err(e);
        }
        let made = self.make_env(&env, req.units).await;
        if let Err(e) = made {
            self.undo_env(&name, true).await;
            return Err(e);
        }
        let mut env = self.env_or_err(&name)?;
        env.state = EnvState::Running;
        let marked = self.envs().put(env.clone());
        if let Err(e) = marked {
            self.undo_env(&name, true).await;
            return Err(e);
        }
        self.envs_changed.notify_one();
        self.cluster_sync().await;
        let n = self.members(&name).len();
        Ok(format!(
            "environment {name} created: {n} unikernel(s), bridge {}, subnet {}, ends {}",
            env.bridge,
            env.subnet,
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_nanos(env.end_ns)
            )
        ))
    }

    /// The bridge, the rules, and the unikernels (started together) of the
    /// environment `env`, recorded as `creating`.
    async fn make_env(self: &Arc<Self>, env: &Env, units: Vec<NewUnit>) -> Result<(), String> {
        let subnet = subnet_of(env)?;
        envnet::create_bridge(&env.bridge, subnet.gateway(), subnet.prefix)
            .map_err(|e| format!("environment {}: {e}", env.name))?;
        envnet::enable_ip_forward().map_err(|e| format!("environment {}: {e}", env.name))?;
        self.apply_net(&env.name)?;
        // Addresses and TAPs in the order the units were given; then the
        // unikernels all start at once.
        let mut specs = Vec::new();
        for mut u in units {
            u.env = Some(env.name.clone());
            specs.push(self.prepare_in_env(u, env.owner.clone(), true)?);
        }
        // The rules are loaded once, when all are up (below), not once per
        // unikernel: each load takes milliseconds (docs/BENCHMARKS.md,
        // "Environments").
        let mut set = tokio::task::JoinSet::new();
        for spec in specs {
            let sup = self.clone();
            set.spawn(async move { sup.create_prepared(spec, Instant::now(), false).await });
        }
        let mut first_err = None;
        while let Some(r) = set.join_next().await {
            let r = r.map_err(|e| e.to_string()).and_then(|r| r);
            if let (Err(e), None) = (r, &first_err) {
                first_err = Some(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => self.apply_net(&env.name),
        }
    }

    /// Remove environment `name` and all of it: its unikernels, their
    /// TAPs and images (kept ones too if `drop_kept`), its saved guests,
    /// its rules and its bridge; its record last. The caller holds
    /// `env_ops`.
    async fn undo_env(self: &Arc<Self>, name: &str, drop_kept: bool) {
        for unit in self.members(name) {
            let _ = self.stop(&unit).await;
            self.forget(&unit, drop_kept);
        }
        let Some(env) = self.envs().get(name).cloned() else {
            return;
        };
        if let Err(e) = envnet::remove_table(&env.table()) {
            log::warn!("environment {name}: {e}");
        }
        let taps = envnet::links_with_prefix(&Env::tap_prefix(env.id)).unwrap_or_else(|e| {
            log::warn!("environment {name}: {e}");
            vec![]
        });
        for tap in taps {
            if let Err(e) = envnet::delete_link(&tap) {
                log::warn!("environment {name}: {e}");
            }
        }
        if let Err(e) = envnet::delete_link(&env.bridge) {
            log::warn!("environment {name}: {e}");
        }
        if drop_kept {
            // Images made for unikernels that a crash kept from being
            // recorded.
            let prefix = format!("e{}-{:x}.", env.id, env.created_ns);
            if let Ok(dir) = std::fs::read_dir(self.runtime_image_dir()) {
                for e in dir.flatten() {
                    if e.file_name().to_string_lossy().starts_with(&prefix) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(env.dir(&self.cfg.state_dir));
        if let Err(e) = self.envs().remove(name) {
            log::warn!("environment {name}: {e}");
        }
        self.envs_changed.notify_one();
        self.cluster_sync().await;
    }

    /// At the daemon's start: undo every environment its predecessor left
    /// half-made, and forget unikernels whose environment is gone.
    pub async fn recover_envs(self: &Arc<Self>) {
        let _ops = self.env_ops.lock().await;
        let half: Vec<String> = self
            .envs()
            .all()
            .filter(|e| e.state == EnvState::Creating)
            .map(|e| e.name.clone())
            .collect();
        for name in half {
            log::warn!("environment {name}: its creation was cut short: removing it");
            self.undo_env(&name, true).await;
        }
        let orphans: Vec<String> = {
            let inner = self.lock();
            let envs = self.envs();
            inner
                .units
                .values()
                .filter(|u| u.spec.env.as_ref().is_some_and(|e| envs.get(e).is_none()))
                .map(|u| u.spec.name.clone())
                .collect()
        };
        for unit in orphans {
            log::warn!("{unit}: its environment is gone: removing it");
            let _ = self.stop(&unit).await;
            self.forget(&unit, true);
        }
        self.cluster_follow().await;
    }

    /// `env extend`.
    pub async fn env_extend(self: &Arc<Self>, name: &str, by: Duration) -> Result<String, String> {
        let _ops = self.env_ops.lock().await;
        let mut env = self.env_or_err(name)?;
        self.rate_limit(&mut env)?;
        env.end_ns = env.end_ns.saturating_add(by.as_nanos() as u64);
        let end = env.end_ns;
        self.envs().put(env)?;
        self.envs_changed.notify_one();
        self.cluster_sync().await;
        Ok(format!(
            "environment {name} now ends {}",
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_nanos(end))
        ))
    }

    /// `env stop`: save and stop every unikernel.
    pub async fn env_stop(self: &Arc<Self>, name: &str) -> Result<String, String> {
        let _ops = self.env_ops.lock().await;
        let mut env = self.env_or_err(name)?;
        if env.state != EnvState::Running {
            return Err(format!("environment {name} is {}", env.state.name()));
        }
        self.rate_limit(&mut env)?;
        let mut saved = 0;
        let members = self.members(name);
        for unit in &members {
            let dir = self.save_dir(&env, unit);
            let parent = env.dir(&self.cfg.state_dir);
            make_traversable(&self.cfg.state_dir, &parent)?;
            crate::admission::create_private_dir(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let (_, ok) = self.stop_or_save(unit, Some(&dir)).await?;
            let owner = {
                let mut inner = self.lock();
                let Some(u) = inner.units.get_mut(unit) else {
                    continue;
                };
                u.state = State::Stopped;
                u.restore_from = ok.then(|| dir.clone());
                u.spec.owner.clone()
            };
            if ok {
                saved += 1;
                chown_tree(&dir, &owner)?;
            } else {
                let _ = std::fs::remove_dir_all(&dir);
            }
            self.stop_drawing(unit);
        }
        env.state = EnvState::Stopped;
        self.envs().put(env)?;
        self.cluster_sync().await;
        Ok(format!(
            "environment {name} stopped: {saved} of {} unikernel(s) saved",
            members.len()
        ))
    }

    /// `env start`: bring the unikernels back from their saved guests
    /// (those without one boot again).
    pub async fn env_start(self: &Arc<Self>, name: &str) -> Result<String, String> {
        let _ops = self.env_ops.lock().await;
        let mut env = self.env_or_err(name)?;
        if env.state != EnvState::Stopped {
            return Err(format!("environment {name} is {}", env.state.name()));
        }
        self.rate_limit(&mut env)?;
        // Running first, so that a unikernel that fails to come back can
        // be looked at, restarted or destroyed as any other.
        env.state = EnvState::Running;
        self.envs().put(env.clone())?;
        let mut waits = Vec::new();
        let mut notes = Vec::new();
        for unit in self.members(name) {
            // On a cluster node, its pool admits it through the cluster
            // first (it waits for etcd; nothing is locked meanwhile).
            let spec = self.lock().units.get(&unit).map(|u| u.spec.clone());
            if let Some(spec) = &spec {
                if let Err(e) = self.pool_admit_cluster(spec).await {
                    notes.push(format!("{unit}: {e}"));
                    continue;
                }
            }
            let started = {
                let mut inner = self.lock();
                let Some(mut u) = inner.units.remove(&unit) else {
                    drop(inner);
                    self.stop_drawing(&unit);
                    continue;
                };
                let r = self
                    .start_drawing(&u.spec)
                    .and_then(|()| self.spawn(&unit, &mut u));
                if r.is_err() {
                    u.state = State::Exited;
                    u.last_end = Some(super::End::Failed);
                }
                inner.units.insert(unit.clone(), u);
                r
            };
            match started {
                Ok((_, rx)) => waits.push((unit, rx)),
                Err(e) => {
                    // Not running: it draws nothing.
                    self.stop_drawing(&unit);
                    notes.push(format!("{unit}: {e}"));
                }
            }
        }
        let mut resumed = 0;
        for (unit, rx) in waits {
            match rx.await {
                Ok(Ok(())) => {
                    resumed += 1;
                    let _ = std::fs::remove_dir_all(self.save_dir(&env, &unit));
                }
                Ok(Err(e)) => notes.push(format!("{unit}: {e}")),
                Err(_) => notes.push(format!("{unit}: its start was abandoned")),
            }
        }
        self.cluster_sync().await;
        let mut msg = format!("environment {name} started: {resumed} unikernel(s) running");
        for n in notes {
            msg += &format!("\n  {n}");
        }
        Ok(msg)
    }

    /// `env destroy`.
    pub async fn env_destroy(self: &Arc<Self>, name: &str) -> Result<String, String> {
        let _ops = self.env_ops.lock().await;
        let mut env = self.env_or_err(name)?;
        self.rate_limit(&mut env)?;
        let n = self.members(name).len();
        self.undo_env(name, false).await;
        Ok(format!(
            "environment {name} destroyed with {n} unikernel(s)"
        ))
    }

    /// The environments (those `visible` allows), as a table.
    pub fn env_list(&self, visible: impl Fn(&Env) -> bool) -> String {
        let envs: Vec<Env> = self.envs().all().filter(|e| visible(e)).cloned().collect();
        let mut out = format!(
            "{:<24} {:<9} {:<25} {:>5}  {:<12} {:<18} {}\n",
            "NAME", "STATE", "ENDS", "UNITS", "BRIDGE", "SUBNET", "OUTGOING"
        );
        for e in envs {
            let members = self.members(&e.name).len();
            out += &format!(
                "{:<24} {:<9} {:<25} {:>5}  {:<12} {:<18} {}\n",
                e.name,
                e.state.name(),
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_nanos(e.end_ns)
                )
                .to_string(),
                members,
                e.bridge,
                e.subnet,
                if e.deny_outgoing { "denied" } else { "allowed" }
            );
        }
        out
    }

    /// The owner of environment `name`, if it exists.
    pub fn env_owner(&self, name: &str) -> Option<Owner> {
        self.envs().get(name).map(|e| e.owner.clone())
    }

    /// The timer: destroys environments at their end and removes disk
    /// snapshots at theirs; sleeps until the first of those, woken early
    /// when one changes.
    pub async fn expire_envs(self: Arc<Self>) {
        loop {
            let now = now_ns();
            let due: Vec<String> = self
                .envs()
                .all()
                .filter(|e| e.state != EnvState::Creating && e.end_ns <= now)
                .map(|e| e.name.clone())
                .collect();
            for name in due {
                let _ops = self.env_ops.lock().await;
                log::info!("environment {name}: its lifetime is over: destroying it");
                self.undo_env(&name, false).await;
            }
            let gone = self.snapshots().expire(SystemTime::now());
            match gone {
                Ok(gone) => {
                    for s in gone {
                        log::info!(
                            "snapshot {} of {} expired: removed",
                            s.name,
                            s.image.display()
                        );
                    }
                }
                Err(e) => log::warn!("snapshots: {e}"),
            }
            let next_env = self.envs().next_end().map(|(t, _)| t);
            let next_snap = self.snapshots().next_expiry().map(|t| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            });
            let wake = match (next_env, next_snap) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep = wake.map_or(Duration::from_secs(3600), |t| {
                Duration::from_nanos(t.saturating_sub(now_ns()))
            });
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.envs_changed.notified() => {}
            }
        }
    }

    fn snapshots(&self) -> MutexGuard<'_, crate::images::SnapshotStore> {
        self.snapshots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The runtime image of unikernel `name` that `device` names (or its
    /// only one).
    fn runtime_image(&self, name: &str, device: Option<&str>) -> Result<(PathBuf, Owner), String> {
        let inner = self.lock();
        let u = inner
            .units
            .get(name)
            .ok_or_else(|| format!("no unikernel named {name}"))?;
        let imgs = &u.spec.images;
        let img = match device {
            Some(d) => imgs.iter().find(|i| i.device == d).ok_or_else(|| {
                format!("{name} has no runtime image for device {d} (made with --disk-from)")
            })?,
            None => match imgs.as_slice() {
                [one] => one,
                [] => {
                    return Err(format!(
                    "{name} has no runtime image (only disks made with --disk-from have snapshots)"
                ))
                }
                _ => return Err(format!("{name} has several runtime images: give --device")),
            },
        };
        Ok((img.path.clone(), u.spec.owner.clone()))
    }

    /// Run a control action (pause, resume) on a running unikernel.
    async fn control_action(&self, name: &str, action: &str) -> Result<String, String> {
        let socket = self.unit_dir(name).join("control");
        let req = crate::control::Request {
            op: action.to_string(),
            stop: false,
            downtime_ms: None,
            max_ms: None,
        };
        tokio::task::spawn_blocking(move || crate::control::call(&socket, &req, &[]))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    fn is_running(&self, name: &str) -> bool {
        self.lock()
            .units
            .get(name)
            .is_some_and(|u| u.instance.is_some())
    }

    /// `disk snapshot`: with the guest paused (its disks flushed and its
    /// journal drained), copy the image.
    pub async fn disk_snapshot(
        self: &Arc<Self>,
        name: &str,
        snap: &str,
        device: Option<&str>,
        life: Option<Duration>,
    ) -> Result<String, String> {
        let _ops = self.env_ops.lock().await;
        let (image, _) = self.runtime_image(name, device)?;
        let paused = if self.is_running(name) {
            self.control_action(name, "pause")
                .await
                .map_err(|e| format!("{name}: cannot pause it for the snapshot: {e}"))?;
            true
        } else {
            false
        };
        let taken = self.snapshots().take(&image, snap, life, SystemTime::now());
        if paused {
            if let Err(e) = self.control_action(name, "resume").await {
                log::warn!("{name}: cannot resume after the snapshot: {e}");
            }
        }
        let s = taken.map_err(|e| e.to_string())?;
        self.envs_changed.notify_one();
        Ok(format!(
            "snapshot {snap} of {name} taken ({} bytes, {:?}{})",
            s.size,
            s.kind,
            match life {
                Some(l) => format!(", kept {}", humantime::format_duration(l)),
                None => String::new(),
            }
        ))
    }

    /// `disk revert`: stop the unikernel, put the snapshot's bytes back,
    /// and boot it again (its saved guest, if its environment is stopped,
    /// is dropped: it was of the other bytes).
    pub async fn disk_revert(
        self: &Arc<Self>,
        name: &str,
        snap: &str,
        device: Option<&str>,
    ) -> Result<String, String> {
        let _ops = self.env_ops.lock().await;
        let (image, owner) = self.runtime_image(name, device)?;
        self.snapshots()
            .get(&image, snap)
            .map_err(|e| e.to_string())?;
        let held = self
            .lock()
            .units
            .get(name)
            .is_some_and(|u| u.state == State::Stopped);
        self.stop(name).await?;
        let reverted = self.snapshots().revert(&image, snap);
        let chowned = chown(&image, &owner);
        {
            let mut inner = self.lock();
            if let Some(u) = inner.units.get_mut(name) {
                u.restore_from = None;
                if held {
                    u.state = State::Stopped;
                }
            }
        }
        if let Some(dir) = self.lock().units.get(name).and_then(|u| {
            let env = self.envs().get(u.spec.env.as_deref()?)?.clone();
            Some(self.save_dir(&env, name))
        }) {
            let _ = std::fs::remove_dir_all(dir);
        }
        reverted.map_err(|e| e.to_string())?;
        chowned?;
        if held {
            return Ok(format!(
                "{name}: {} reverted to snapshot {snap} (it boots on it when its environment starts)",
                image.display()
            ));
        }
        self.restart(name, Instant::now()).await?;
        Ok(format!(
            "{name}: {} reverted to snapshot {snap}, and booted again",
            image.display()
        ))
    }

    /// `disk snapshots`.
    pub fn disk_snapshots(&self, name: &str) -> Result<String, String> {
        let images: Vec<RuntimeImage> = self
            .lock()
            .units
            .get(name)
            .ok_or_else(|| format!("no unikernel named {name}"))?
            .spec
            .images
            .clone();
        let mut out = format!(
            "{:<10} {:<20} {:>12}  {:<25} {}\n",
            "DEVICE", "SNAPSHOT", "BYTES", "TAKEN", "EXPIRES"
        );
        for img in images {
            for s in self
                .snapshots()
                .list(&img.path)
                .map_err(|e| e.to_string())?
            {
                let taken = std::time::UNIX_EPOCH + Duration::from_millis(s.created_unix_ms);
                out += &format!(
                    "{:<10} {:<20} {:>12}  {:<25} {}\n",
                    img.device,
                    s.name,
                    s.size,
                    humantime::format_rfc3339_seconds(taken).to_string(),
                    s.expires()
                        .map_or("never".into(), |t| humantime::format_rfc3339_seconds(t)
                            .to_string())
                );
            }
        }
        Ok(out)
    }

    /// `template add` (from a file the caller opened: `disk` may be a
    /// `/proc/self/fd/N` path).
    pub fn template_add(&self, name: &str, disk: &Path) -> Result<String, String> {
        let t = self
            .templates
            .add(name, disk, SystemTime::now())
            .map_err(|e| e.to_string())?;
        Ok(format!(
            "template {name} added ({} bytes, {:?})",
            t.size, t.kind
        ))
    }

    pub fn template_list(&self) -> Result<String, String> {
        let mut out = format!("{:<24} {:>14}  {}\n", "NAME", "BYTES", "ADDED");
        for t in self.templates.list().map_err(|e| e.to_string())? {
            let added = std::time::UNIX_EPOCH + Duration::from_millis(t.created_unix_ms);
            out += &format!(
                "{:<24} {:>14}  {}\n",
                t.name,
                t.size,
                humantime::format_rfc3339_seconds(added)
            );
        }
        Ok(out)
    }

    pub fn template_remove(&self, name: &str) -> Result<String, String> {
        self.templates.remove(name).map_err(|e| e.to_string())?;
        Ok(format!("template {name} removed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_arguments_are_filled_in() {
        let s: Subnet = "10.213.4.0/24".parse().unwrap();
        let ip = Ipv4Addr::new(10, 213, 4, 7);
        assert_eq!(ip_arg(DEFAULT_IP_ARGS[0], ip, &s), "--ipv4=10.213.4.7/24");
        assert_eq!(
            ip_arg(DEFAULT_IP_ARGS[1], ip, &s),
            "--ipv4-gateway=10.213.4.1"
        );
        assert_eq!(
            ip_arg("ip={ip} mask={netmask}", ip, &s),
            "ip=10.213.4.7 mask=255.255.255.0"
        );
    }
}
