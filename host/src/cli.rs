//! `tt-host run` command line, with solo5-hvt's spellings.
//!
//! solo5-hvt's module options carry the device name inside the option
//! (`--block:storage=disk.img`), which argument-parsing crates do not model,
//! so this small parser handles them. Both `tt-host run [OPTIONS] IMAGE [--]
//! ARGS` and solo5-hvt's `[OPTIONS] [--] IMAGE ARGS` orders are accepted.

use std::path::PathBuf;

pub const RUN_USAGE: &str = "\
usage: tt-host run [OPTIONS] IMAGE [--] [GUEST ARGS...]
       tt-host run [OPTIONS] -- IMAGE [GUEST ARGS...]

Boot the Solo5 hvt unikernel IMAGE on KVM. The process exits with the
guest's exit status, 255 if the guest aborted, or 1 with a message if the
image, the options or the guest were bad.

options (solo5-hvt spellings):
  --mem=MB                      guest memory in MiB (default 512; 4 to 4096;
                                rounded down to a multiple of 2)
  --block:NAME=PATH             attach the file or block device at PATH as
                                the manifest's block device NAME
  --block-sector-size:NAME=BYTES
                                sector (block) size of block device NAME: a
                                power of two from 512 to 32768 (default 512);
                                the file size must be a multiple of it
  --net:NAME=TAP                attach the existing TAP interface TAP as the
                                manifest's network device NAME
  --net-mac:NAME=HWADDR         MAC address of network device NAME
                                (default: a random locally administered one)
  -h, --help                    show this help

developer options:
  --x-solo5-hvt-boot            start the guest in solo5-hvt's boot state
                                (2 MiB read-write pages over all memory, no
                                NX, no CR0.WP) instead of tt-host's W^X one,
                                to check that an image is portable to it

Every device in the image's manifest must be given, and every device given
must be in the manifest.";

/// A parsed `tt-host run` command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunArgs {
    pub mem_mb: u64,
    pub blocks: Vec<(String, PathBuf)>,
    pub sector_sizes: Vec<(String, u64)>,
    pub nets: Vec<(String, String)>,
    pub macs: Vec<(String, String)>,
    pub image: PathBuf,
    pub guest_args: Vec<String>,
    pub solo5_hvt_boot: bool,
}

/// Result of parsing: run, or print help.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Run(RunArgs),
    Help,
}

/// A bad command line; the message names the option.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0} (see 'tt-host run --help')")]
pub struct CliError(pub String);

fn named(opt: &str, rest: &str) -> Result<(String, String), CliError> {
    let (name, value) = rest
        .split_once('=')
        .ok_or_else(|| CliError(format!("{opt}NAME=VALUE expected, got '{opt}{rest}'")))?;
    if name.is_empty() || name.len() > 67 || !name.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(CliError(format!(
            "{opt}: device name '{name}' must be 1 to 67 ASCII letters or digits"
        )));
    }
    if value.is_empty() {
        return Err(CliError(format!("{opt}{name}= needs a value")));
    }
    Ok((name.to_string(), value.to_string()))
}

/// Parse the arguments after `run`.
pub fn parse_run(args: &[String]) -> Result<Parsed, CliError> {
    let mut mem_mb = 512u64;
    let (mut blocks, mut sector_sizes, mut nets, mut macs) = (vec![], vec![], vec![], vec![]);
    let mut i = 0;
    let mut dashdash = false;
    let mut solo5_hvt_boot = false;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "--" {
            dashdash = true;
            i += 1;
            break;
        }
        if !a.starts_with('-') || a == "-" {
            break;
        }
        if a == "-h" || a == "--help" {
            return Ok(Parsed::Help);
        }
        let dup = |list: &[(String, String)], name: &str, opt: &str| {
            if list.iter().any(|(n, _)| n == name) {
                Err(CliError(format!("{opt}{name} given twice")))
            } else {
                Ok(())
            }
        };
        if let Some(v) = a.strip_prefix("--mem=").or_else(|| {
            (a == "--mem").then(|| {
                i += 1;
                args.get(i).map(String::as_str).unwrap_or("")
            })
        }) {
            mem_mb = v
                .parse::<u64>()
                .ok()
                .filter(|m| (4..=4096).contains(m))
                .ok_or_else(|| {
                    CliError(format!("--mem={v}: expected a size in MiB from 4 to 4096"))
                })?;
        } else if a == "--x-solo5-hvt-boot" {
            solo5_hvt_boot = true;
        } else if let Some(rest) = a.strip_prefix("--block:") {
            let (name, path) = named("--block:", rest)?;
            let paths: Vec<(String, String)> = blocks
                .iter()
                .map(|(n, p): &(String, PathBuf)| (n.clone(), p.display().to_string()))
                .collect();
            dup(&paths, &name, "--block:")?;
            blocks.push((name, PathBuf::from(path)));
        } else if let Some(rest) = a.strip_prefix("--block-sector-size:") {
            let (name, size) = named("--block-sector-size:", rest)?;
            let size = size.parse::<u64>().map_err(|_| {
                CliError(format!(
                    "--block-sector-size:{name}={size}: not a number of bytes"
                ))
            })?;
            if sector_sizes.iter().any(|(n, _)| n == &name) {
                return Err(CliError(format!("--block-sector-size:{name} given twice")));
            }
            sector_sizes.push((name, size));
        } else if let Some(rest) = a.strip_prefix("--net:") {
            let (name, tap) = named("--net:", rest)?;
            dup(&nets, &name, "--net:")?;
            nets.push((name, tap));
        } else if let Some(rest) = a.strip_prefix("--net-mac:") {
            let (name, mac) = named("--net-mac:", rest)?;
            dup(&macs, &name, "--net-mac:")?;
            macs.push((name, mac));
        } else {
            return Err(CliError(format!("unknown option '{a}'")));
        }
        i += 1;
    }
    let image = args
        .get(i)
        .ok_or_else(|| CliError("missing IMAGE (the unikernel to run)".into()))?;
    let mut rest = &args[i + 1..];
    if !dashdash && rest.first().map(String::as_str) == Some("--") {
        rest = &rest[1..];
    }
    Ok(Parsed::Run(RunArgs {
        mem_mb,
        blocks,
        sector_sizes,
        nets,
        macs,
        image: PathBuf::from(image),
        guest_args: rest.to_vec(),
        solo5_hvt_boot,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Parsed, CliError> {
        parse_run(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn run(args: &[&str]) -> RunArgs {
        match p(args).unwrap() {
            Parsed::Run(r) => r,
            Parsed::Help => panic!("help"),
        }
    }

    #[test]
    fn solo5_hvt_spellings() {
        let r = run(&[
            "--mem=64",
            "--block:storage=disk.img",
            "--block-sector-size:storage=4096",
            "--net:service0=tap0",
            "--net-mac:service0=02:00:00:00:00:01",
            "app.hvt",
            "--",
            "a",
            "b",
        ]);
        assert_eq!(r.mem_mb, 64);
        assert_eq!(
            r.blocks,
            vec![("storage".into(), PathBuf::from("disk.img"))]
        );
        assert_eq!(r.sector_sizes, vec![("storage".into(), 4096)]);
        assert_eq!(r.nets, vec![("service0".into(), "tap0".into())]);
        assert_eq!(
            r.macs,
            vec![("service0".into(), "02:00:00:00:00:01".into())]
        );
        assert_eq!(r.image, PathBuf::from("app.hvt"));
        assert_eq!(r.guest_args, vec!["a", "b"]);
    }

    #[test]
    fn solo5_order_with_dashdash_before_image() {
        let r = run(&[
            "--mem=8",
            "--x-solo5-hvt-boot",
            "--",
            "app.hvt",
            "x",
            "--",
            "y",
        ]);
        assert!(r.solo5_hvt_boot);
        assert_eq!(r.image, PathBuf::from("app.hvt"));
        assert_eq!(r.guest_args, vec!["x", "--", "y"]);
    }

    #[test]
    fn defaults() {
        let r = run(&["app.hvt"]);
        assert_eq!(r.mem_mb, 512);
        assert!(r.guest_args.is_empty());
    }

    #[test]
    fn errors_name_the_option() {
        for (args, needle) in [
            (&["--mem=0", "x"][..], "--mem=0"),
            (&["--mem=abc", "x"][..], "--mem=abc"),
            (&["--block:storage", "x"][..], "--block:"),
            (&["--block:st/x=a", "x"][..], "device name"),
            (
                &["--block-sector-size:s=big", "x"][..],
                "--block-sector-size:s=big",
            ),
            (&["--frobnicate", "x"][..], "unknown option '--frobnicate'"),
            (&["--net:a=t0", "--net:a=t1", "x"][..], "given twice"),
            (&["--mem=8"][..], "missing IMAGE"),
        ] {
            let e = p(args).unwrap_err();
            assert!(e.0.contains(needle), "{args:?}: {e}");
        }
    }

    #[test]
    fn help() {
        assert_eq!(p(&["--help"]).unwrap(), Parsed::Help);
        assert!(RUN_USAGE.contains("--block-sector-size:NAME=BYTES"));
    }
}
