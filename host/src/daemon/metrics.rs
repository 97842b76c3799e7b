//! Counters in Prometheus' text exposition format (version 0.0.4), for
//! `tt-host stats --prometheus` and the daemon's `--metrics` listener.

use super::proto::UnitStats;
use std::fmt::Write;

/// A label value with `\`, `"` and newlines escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Every unit's counters, one family per counter.
pub fn render(units: &[UnitStats]) -> String {
    type Get = fn(&UnitStats) -> f64;
    let families: [(&str, &str, &str, Get); 14] = [
        (
            "tt_host_unikernel_up",
            "gauge",
            "1 if the unikernel's process runs",
            |s| s.running as u8 as f64,
        ),
        (
            "tt_host_unikernel_restarts_total",
            "counter",
            "restarts by the daemon",
            |s| s.restarts as f64,
        ),
        (
            "tt_host_unikernel_cpu_user_seconds_total",
            "counter",
            "user CPU time of its tt-host process",
            |s| s.cpu_user_us as f64 / 1e6,
        ),
        (
            "tt_host_unikernel_cpu_system_seconds_total",
            "counter",
            "system CPU time of its tt-host process",
            |s| s.cpu_system_us as f64 / 1e6,
        ),
        (
            "tt_host_unikernel_peak_rss_bytes",
            "gauge",
            "peak resident memory of its tt-host process",
            |s| (s.peak_rss_kib * 1024) as f64,
        ),
        (
            "tt_host_unikernel_block_read_ops_total",
            "counter",
            "block read requests completed",
            |s| s.block_read_ops as f64,
        ),
        (
            "tt_host_unikernel_block_read_bytes_total",
            "counter",
            "bytes read from block devices",
            |s| s.block_read_bytes as f64,
        ),
        (
            "tt_host_unikernel_block_write_ops_total",
            "counter",
            "block write requests completed",
            |s| s.block_write_ops as f64,
        ),
        (
            "tt_host_unikernel_block_write_bytes_total",
            "counter",
            "bytes written to block devices",
            |s| s.block_write_bytes as f64,
        ),
        (
            "tt_host_unikernel_net_rx_packets_total",
            "counter",
            "packets received by the guest",
            |s| s.net_rx_packets as f64,
        ),
        (
            "tt_host_unikernel_net_rx_bytes_total",
            "counter",
            "bytes received by the guest",
            |s| s.net_rx_bytes as f64,
        ),
        (
            "tt_host_unikernel_net_tx_packets_total",
            "counter",
            "packets sent by the guest",
            |s| s.net_tx_packets as f64,
        ),
        (
            "tt_host_unikernel_net_tx_bytes_total",
            "counter",
            "bytes sent by the guest",
            |s| s.net_tx_bytes as f64,
        ),
        (
            "tt_host_unikernel_vm_exits_total",
            "counter",
            "exits from KVM_RUN to tt-host",
            |s| s.vm_exits as f64,
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, get) in families {
        let _ = writeln!(out, "# HELP {name} {help}.");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for u in units {
            let _ = writeln!(out, "{name}{{name=\"{}\"}} {}", label(&u.name), get(u));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_escaped_labels() {
        let u = UnitStats {
            name: "a\"b".into(),
            running: true,
            cpu_user_us: 1_500_000,
            block_write_bytes: 4096,
            ..Default::default()
        };
        let t = render(&[u]);
        assert!(t.contains("# TYPE tt_host_unikernel_up gauge\n"), "{t}");
        assert!(
            t.contains("tt_host_unikernel_up{name=\"a\\\"b\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("tt_host_unikernel_cpu_user_seconds_total{name=\"a\\\"b\"} 1.5\n"),
            "{t}"
        );
        assert!(
            t.contains("tt_host_unikernel_block_write_bytes_total{name=\"a\\\"b\"} 4096\n"),
            "{t}"
        );
        assert_eq!(t.lines().filter(|l| l.starts_with("# TYPE")).count(), 14);
    }
}
