//! What the host has: the default of the root policy's fields (CPUs,
//! memory, bridges and TAPs; no limit on unikernels or block storage), this process's CPUs and pinning to one, and the network a TAP is on.

use super::AdmitError;
use crate::resources::Policy;
use std::collections::BTreeSet;

/// The host's resources as they are now: the default of every field the
/// root policy does not set. No limit on unikernels or on block storage
/// (`u32::MAX` and `u64::MAX`, shown as `unlimited`): the disks live on
/// whatever file systems their images are on, which the state directory's
/// free space says nothing about; a policy's `--block` bounds them.
pub fn host_policy() -> Policy {
    Policy {
        unikernels: u32::MAX,
        memory_mb: physical_memory_mb(),
        cpus: online_cpus(),
        block_mb: Some(u64::MAX),
        bridges: host_bridges(),
    }
}

pub(super) fn physical_memory_mb() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || size <= 0 {
        return 0;
    }
    (pages as u64).saturating_mul(size as u64) >> 20
}

/// The host's online CPUs (`/sys/devices/system/cpu/online`), whatever
/// this process's own affinity is (`taskset`, or `run --cpu` pinning
/// itself before its admission); the CPUs this process may use if that
/// file cannot be read.
pub fn online_cpus() -> BTreeSet<u16> {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| crate::resources::parse_cpu_list(s.trim()).ok())
        .filter(|set| !set.is_empty())
        .unwrap_or_else(host_cpus)
}

/// The CPUs this process may run on.
pub fn host_cpus() -> BTreeSet<u16> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most
    // size_of::<cpu_set_t>() bytes into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return BTreeSet::from([0]);
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: i < CPU_SETSIZE, the bound CPU_ISSET requires.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .map(|i| i as u16)
        .collect()
}

/// Pin this process to `cpu`.
pub fn pin_to_cpu(cpu: u16) -> Result<(), AdmitError> {
    if !host_cpus().contains(&cpu) {
        return Err(AdmitError::Invalid(format!(
            "--cpu {cpu}: not a CPU this process may run on (available: {})",
            crate::resources::CpuList(&host_cpus())
        )));
    }
    // SAFETY: as in host_cpus; cpu < CPU_SETSIZE since it was in the set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(AdmitError::Invalid(format!(
            "--cpu {cpu}: cannot pin to it: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Every bridge and TAP/TUN interface on the host (the networks a
/// unikernel can be attached to).
fn host_bridges() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir("/sys/class/net") {
        for e in rd.flatten() {
            let p = e.path();
            if p.join("bridge").exists() || p.join("tun_flags").exists() {
                out.insert(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// The network a TAP interface connects a unikernel to: the bridge it is
/// a port of, or the TAP itself when it is in no bridge.
pub fn network_of_tap(tap: &str) -> String {
    std::fs::read_link(format!("/sys/class/net/{tap}/master"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| tap.to_string())
}
