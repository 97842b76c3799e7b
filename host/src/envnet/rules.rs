//! The environment's nftables table: written as an nft script, loaded,
//! removed and listed through the `nft` program.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};

use super::{EnvNet, NetError};

/// Check that `name` can name an nftables table here: 1 to 64 ASCII
/// letters, digits, '-' or '_', starting with a letter (nft's identifiers
/// allow more, but these are safe to write unquoted in a script, where
/// nft takes no quoted table names). nft also refuses its keywords
/// (`filter` is fine, `drop` or `ip` are not), which this does not check:
/// [`apply`] then fails with nft's syntax error. Names such as
/// `tt-env-<id>` are never keywords.
pub fn validate_table_name(name: &str) -> Result<(), NetError> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    match ok {
        true => Ok(()),
        false => Err(NetError::TableName { name: name.into() }),
    }
}

/// The nft script that replaces table `inet ENV.table` with the rules of
/// `env` (the chains the module doc describes), for `nft -f -`.
///
/// It declares the table (a no-op when it exists), deletes it and creates
/// it again: nft loads a script as one transaction, so the old rules give
/// way to the new ones at once, whether or not the table existed.
pub fn ruleset(env: &EnvNet) -> Result<String, NetError> {
    env.check()?;
    let (t, br, net) = (&env.table, &env.bridge, env.subnet);
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(s, "table inet {t} {{}}");
    let _ = writeln!(s, "delete table inet {t}");
    let _ = writeln!(s, "table inet {t} {{");

    let dnat = |s: &mut String, prefix: &str| {
        for f in &env.forwards {
            let _ = writeln!(
                s,
                "\t\t{prefix}fib daddr type local {} dport {} dnat ip to {}:{}",
                f.proto, f.host_port, f.guest, f.guest_port
            );
        }
    };
    let _ = writeln!(s, "\tchain prerouting {{");
    let _ = writeln!(
        s,
        "\t\ttype nat hook prerouting priority dstnat; policy accept;"
    );
    dnat(&mut s, "");
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(s, "\tchain output {{");
    let _ = writeln!(s, "\t\ttype nat hook output priority -100; policy accept;");
    dnat(&mut s, "ip daddr != 127.0.0.0/8 ");
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(s, "\tchain postrouting {{");
    let _ = writeln!(
        s,
        "\t\ttype nat hook postrouting priority srcnat; policy accept;"
    );
    let _ = writeln!(s, "\t\tip saddr {net} oifname != \"{br}\" masquerade");
    let _ = writeln!(
        s,
        "\t\tip saddr {net} ip daddr {net} ct status dnat masquerade"
    );
    let _ = writeln!(s, "\t}}");

    let mut blacklist: Vec<Ipv4Addr> = env.blacklist.clone();
    blacklist.sort();
    blacklist.dedup();
    if !blacklist.is_empty() || env.deny_outgoing {
        let list = blacklist
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        for (chain, hook) in [("forward", "forward"), ("input", "input")] {
            let _ = writeln!(s, "\tchain {chain} {{");
            let _ = writeln!(
                s,
                "\t\ttype filter hook {hook} priority filter; policy accept;"
            );
            if !blacklist.is_empty() {
                let _ = writeln!(s, "\t\tiifname \"{br}\" ip daddr {{ {list} }} drop");
            }
            if env.deny_outgoing {
                let _ = writeln!(
                    s,
                    "\t\tiifname \"{br}\" ct state established,related accept"
                );
                if chain == "forward" {
                    let _ = writeln!(s, "\t\tiifname \"{br}\" oifname \"{br}\" accept");
                }
                let _ = writeln!(s, "\t\tiifname \"{br}\" drop");
            }
            let _ = writeln!(s, "\t}}");
        }
    }
    let _ = writeln!(s, "}}");
    Ok(s)
}

/// Where nft may be when PATH lacks it (a user's PATH on Debian has no
/// /usr/sbin).
const NFT: [&str; 3] = ["nft", "/usr/sbin/nft", "/sbin/nft"];

/// Run `nft ARGS` with `stdin` as its input; its output, or why it could
/// not run. `what` and `table` name the job in errors.
fn nft(args: &[&str], stdin: &str, what: &'static str, table: &str) -> Result<Output, NetError> {
    let spawn_err = |source: io::Error| NetError::NftSpawn {
        what,
        table: table.into(),
        source,
    };
    let mut child = None;
    for program in NFT {
        match Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => {
                child = Some(c);
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(spawn_err(e)),
        }
    }
    let Some(mut child) = child else {
        return Err(NetError::NftMissing {
            what,
            table: table.into(),
        });
    };
    if let Some(mut pipe) = child.stdin.take() {
        // nft reads its whole input before it answers; an error here (nft
        // gone early) shows in its status and stderr.
        let _ = pipe.write_all(stdin.as_bytes());
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(NetError::Nft {
            what,
            table: table.into(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Load `env`'s table ([`ruleset`]) with `nft -f -`, replacing the one
/// there is in one transaction. On error nothing changed: the old table
/// (or none) stays.
pub fn apply(env: &EnvNet) -> Result<(), NetError> {
    let script = ruleset(env)?;
    nft(&["-f", "-"], &script, "load", &env.table)?;
    log::debug!("nftables table {} loaded", env.table);
    Ok(())
}

/// Delete table `inet NAME` with all its chains and rules; Ok if there is
/// none.
pub fn remove_table(name: &str) -> Result<(), NetError> {
    validate_table_name(name)?;
    // Declaring it first makes the deletion succeed when it is absent.
    let script = format!("table inet {name} {{}}\ndelete table inet {name}\n");
    nft(&["-f", "-"], &script, "remove", name)?;
    Ok(())
}

/// The `inet` tables whose names start with `prefix` (e.g. `tt-env-`), to
/// remove what a crashed run left.
pub fn tables_with_prefix(prefix: &str) -> Result<Vec<String>, NetError> {
    let out = nft(
        &["list", "tables", "inet"],
        "",
        "list",
        &format!("{prefix}*"),
    )?;
    Ok(parse_tables(&String::from_utf8_lossy(&out.stdout), prefix))
}

/// The names in `nft list tables` output (`table inet NAME` lines) of
/// `inet` tables that start with `prefix`.
fn parse_tables(listing: &str, prefix: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            ["table", "inet", name] if name.starts_with(prefix) => Some(name.to_string()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::{Forward, Subnet};
    use super::*;

    fn env() -> EnvNet {
        let subnet: Subnet = "10.213.4.0/24".parse().unwrap();
        EnvNet::new("tt-env-4", "ttbr4", subnet)
    }

    #[test]
    fn plain_env_masquerades_and_filters_nothing() {
        let expected = "\
table inet tt-env-4 {}
delete table inet tt-env-4
table inet tt-env-4 {
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t}
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr 10.213.4.0/24 oifname != \"ttbr4\" masquerade
\t\tip saddr 10.213.4.0/24 ip daddr 10.213.4.0/24 ct status dnat masquerade
\t}
}
";
        assert_eq!(ruleset(&env()).unwrap(), expected);
    }

    #[test]
    fn forwards_deny_and_blacklist() {
        let mut e = env();
        e.forwards = vec![
            Forward::parse("8080:80")
                .unwrap()
                .to("10.213.4.2".parse().unwrap()),
            Forward::parse("5353:53/udp")
                .unwrap()
                .to("10.213.4.3".parse().unwrap()),
        ];
        e.deny_outgoing = true;
        e.blacklist = ["192.0.2.9", "169.254.169.254", "192.0.2.9"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let expected = "\
table inet tt-env-4 {}
delete table inet tt-env-4
table inet tt-env-4 {
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tfib daddr type local tcp dport 8080 dnat ip to 10.213.4.2:80
\t\tfib daddr type local udp dport 5353 dnat ip to 10.213.4.3:53
\t}
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tip daddr != 127.0.0.0/8 fib daddr type local tcp dport 8080 dnat ip to 10.213.4.2:80
\t\tip daddr != 127.0.0.0/8 fib daddr type local udp dport 5353 dnat ip to 10.213.4.3:53
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr 10.213.4.0/24 oifname != \"ttbr4\" masquerade
\t\tip saddr 10.213.4.0/24 ip daddr 10.213.4.0/24 ct status dnat masquerade
\t}
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname \"ttbr4\" ip daddr { 169.254.169.254, 192.0.2.9 } drop
\t\tiifname \"ttbr4\" ct state established,related accept
\t\tiifname \"ttbr4\" oifname \"ttbr4\" accept
\t\tiifname \"ttbr4\" drop
\t}
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname \"ttbr4\" ip daddr { 169.254.169.254, 192.0.2.9 } drop
\t\tiifname \"ttbr4\" ct state established,related accept
\t\tiifname \"ttbr4\" drop
\t}
}
";
        assert_eq!(ruleset(&e).unwrap(), expected);

        // The blacklist alone: no deny rules.
        e.deny_outgoing = false;
        let s = ruleset(&e).unwrap();
        assert!(s.contains("\t\tiifname \"ttbr4\" ip daddr { 169.254.169.254, 192.0.2.9 } drop\n\t}\n\tchain input"), "{s}");
        assert!(!s.contains("established"), "{s}");
        assert!(!s.contains("\t\tiifname \"ttbr4\" drop"), "{s}");
    }

    #[test]
    fn ruleset_refuses_bad_input() {
        let mut e = env();
        e.table = "tt env; flush ruleset".into();
        assert!(matches!(ruleset(&e), Err(NetError::TableName { .. })));
        let mut e = env();
        e.bridge = "br\"0".into();
        assert!(matches!(ruleset(&e), Err(NetError::InterfaceName { .. })));
        let mut e = env();
        e.forwards = vec![Forward::parse("1:2").unwrap()];
        assert!(matches!(ruleset(&e), Err(NetError::Invalid { .. })));
    }

    #[test]
    fn table_names() {
        for good in ["tt-env-1", "a", "T_2", &"x".repeat(64)] {
            validate_table_name(good).unwrap();
        }
        for bad in ["", "1tt", "-x", "tt env", "tt.env", "tt\"", &"x".repeat(65)] {
            let e = validate_table_name(bad).unwrap_err().to_string();
            assert!(e.contains("1 to 64 ASCII letters"), "{e}");
        }
    }

    #[test]
    fn missing_nft_says_how_to_install_it() {
        let e = NetError::NftMissing {
            what: "load",
            table: "tt-env-1".into(),
        };
        assert_eq!(
            e.to_string(),
            "cannot run nft to load table tt-env-1: program not found; \
             is nftables installed? (apt-get install nftables)"
        );
    }

    #[test]
    fn parses_table_listings() {
        let listing = "table inet tt-env-1\ntable ip nat\ntable inet filter\n\
                       table inet tt-env-22\ntable ip tt-env-3\n";
        assert_eq!(parse_tables(listing, "tt-env-"), ["tt-env-1", "tt-env-22"]);
        assert!(parse_tables("", "tt-env-").is_empty());
    }
}
