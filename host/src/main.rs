//! The `tt-host` command.

use std::process::ExitCode;
use tt_host::cli::{self, Parsed};

const USAGE: &str = "\
tt-host: launch Solo5 hvt unikernels on KVM

usage:
  tt-host run [OPTIONS] IMAGE [--] [GUEST ARGS...]   boot a unikernel (see 'tt-host run --help')
  tt-host policy set|remove|show ...                delegate resources (see 'tt-host policy --help')
  tt-host journal list|drain|discard ...            block journals (see 'tt-host journal --help')
  tt-host daemon [OPTIONS]                          keep unikernels running (see 'tt-host daemon --help')
  tt-host create NAME [OPTIONS] IMAGE [--] [ARGS]   start a unikernel under the daemon
  tt-host destroy|restart|info NAME                 (see 'tt-host create --help' for these)
  tt-host list [PATH] | console NAME | stats [NAME]
  tt-host pool create|show|list|reserve|sign ...    capacity pools (see 'tt-host pool --help')
  tt-host key add|gen ...                           reservation signing keys
  tt-host env create|extend|stop|start|destroy|list environments: unikernels with a lifetime (see 'tt-host env --help')
  tt-host template add|list|remove ...              template disks ('create --disk-from:DEV=TEMPLATE')
  tt-host disk snapshot|revert|snapshots NAME ...   snapshots of a unikernel's runtime images
  tt-host pause|resume --control=SOCK               pause or resume a 'tt-host run --control=SOCK'
  tt-host snapshot --control=SOCK DIR [--stop]      save its guest to DIR (see docs/SNAPSHOT.md)
  tt-host pause|resume|status NAME                  the same for a unikernel of the daemon
  tt-host snapshot NAME DIR [--stop]                (and migrate-send NAME --to=ADDR ...)
  tt-host restore [OPTIONS] DIR                     resume a snapshot (options as for run)
  tt-host migrate-send --control=SOCK --to=ADDR     live-migrate its guest (see 'tt-host migrate-send --help')
  tt-host migrate-receive --listen=ADDR [OPTIONS]   receive one (options as for run, without IMAGE)
  tt-host demo                                      build and boot the bundled hello unikernel
  tt-host --help | --version

Run through a link named solo5-hvt, tt-host takes solo5-hvt's command line
(that of 'tt-host run', without 'run'), so a launcher that executes
solo5-hvt, such as albatross, can run it unmodified.";

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("tt-host: {msg}");
    ExitCode::from(1)
}

fn run(args: &[String]) -> ExitCode {
    let run_args = match cli::parse_run(args) {
        Ok(Parsed::Run(r)) => r,
        Ok(Parsed::Help) => {
            println!("{}", cli::run_usage());
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("{}", cli::version_text());
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(e),
    };
    launched(&run_args, || tt_host::launch::run(&run_args))
}

/// Run a launch (a boot, a restore, a migration's target) with its stats
/// file: created first, so that even a launch that fails early leaves its
/// end record. The exit status is the guest's, or 1 with the error.
fn launched(
    args: &cli::RunArgs,
    launch: impl FnOnce() -> Result<i32, tt_host::launch::LaunchError>,
) -> ExitCode {
    let stats = match &args.stats_file {
        Some(p) => match tt_host::runfile::stats::StatsFile::create(p) {
            Ok(s) => {
                s.install();
                Some(s)
            }
            Err(e) => return fail(e),
        },
        None => None,
    };
    let result = launch();
    if let Some(s) = &stats {
        s.finish(tt_host::launch::end_state(&result));
    }
    match result {
        Ok(status) => ExitCode::from((status & 0xff) as u8),
        Err(e) => fail(e),
    }
}

/// `tt-host restore [run options] DIR`.
fn restore(args: &[String]) -> ExitCode {
    let run_args = match cli::parse_run(args) {
        Ok(Parsed::Run(r)) => r,
        Ok(Parsed::Help | Parsed::Version) => {
            println!("{}", cli::RESTORE_USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(e),
    };
    launched(&run_args, || tt_host::launch::restore(&run_args))
}

/// `tt-host migrate-send --control=SOCK --to=ADDR ...`.
fn migrate_send(args: &[String]) -> ExitCode {
    if !args.iter().any(|a| a.starts_with("--control"))
        && !args.iter().any(|a| a == "--help" || a == "-h")
    {
        return match tt_host::daemon::client::control("migrate-send", args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        };
    }
    let m = match cli::parse_migrate_send(args) {
        Ok(Some(m)) => m,
        Ok(None) => {
            println!("{}", cli::MIGRATE_USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(e),
    };
    let key = match &m.psk {
        Some(p) => match tt_host::migration::auth::read_key(p) {
            Ok(k) => Some(k),
            Err(e) => return fail(e),
        },
        None => None,
    };
    match tt_host::control::migrate(&m.control, &m.to, key.as_deref(), m.downtime_ms, m.max_ms) {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// `tt-host migrate-receive --listen=ADDR [--psk=FILE] [run options]`.
fn migrate_receive(args: &[String]) -> ExitCode {
    let (listen, psk, rest) = match cli::parse_migrate_receive(args) {
        Ok(Some(x)) => x,
        Ok(None) => {
            println!("{}", cli::MIGRATE_USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(e),
    };
    let run_args = match cli::parse_run(&rest) {
        Ok(Parsed::Run(r)) => r,
        Ok(_) => {
            println!("{}", cli::MIGRATE_USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(e),
    };
    let key = match &psk {
        Some(p) => match tt_host::migration::auth::read_key(p) {
            Ok(k) => Some(k),
            Err(e) => return fail(e),
        },
        None => None,
    };
    launched(&run_args, || {
        let incoming = tt_host::migration::receive::accept(&listen, key.as_deref())
            .map_err(tt_host::launch::LaunchError::Migration)?;
        tt_host::launch::receive(&run_args, incoming)
    })
}

/// `tt-host pause|resume|snapshot --control=SOCK ...`.
fn control(cmd: &str, args: &[String]) -> ExitCode {
    if !args.iter().any(|a| a.starts_with("--control"))
        && !args.iter().any(|a| a == "--help" || a == "-h")
    {
        // Without --control: a unikernel of the daemon, by name.
        return match tt_host::daemon::client::control(cmd, args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        };
    }
    match cli::parse_control(cmd, args) {
        Ok(None) => {
            println!("{}", cli::CONTROL_USAGE);
            ExitCode::SUCCESS
        }
        Ok(Some(c)) => {
            use tt_host::control;
            let r = match &c.dir {
                Some(dir) => control::snapshot(&c.socket, dir, c.stop),
                None => control::call(
                    &c.socket,
                    &control::Request {
                        op: cmd.into(),
                        stop: false,
                        downtime_ms: None,
                        max_ms: None,
                    },
                    &[],
                ),
            };
            match r {
                Ok(msg) => {
                    println!("{msg}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Err(e) => fail(e),
    }
}

fn policy(args: &[String]) -> ExitCode {
    use tt_host::admission::StateDir;
    use tt_host::cli::PolicyCmd;
    if let Some(result) = tt_host::daemon::client::policy(args) {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        };
    }
    let cmd = match cli::parse_policy(args) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let dir = |d: &Option<std::path::PathBuf>| StateDir::resolve(d.as_deref());
    let result = match cmd {
        PolicyCmd::Help => {
            println!("{}", cli::POLICY_USAGE);
            return ExitCode::SUCCESS;
        }
        PolicyCmd::Set {
            path,
            change,
            state_dir,
        } => dir(&state_dir).set_policy(&path, &change).map(|_| ()),
        PolicyCmd::Remove { path, state_dir } => dir(&state_dir).remove_policy(&path),
        PolicyCmd::Show { path, state_dir } => dir(&state_dir).show(&path).map(|t| print!("{t}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn journal(args: &[String]) -> ExitCode {
    use std::io::BufRead;
    use tt_host::admission::StateDir;
    use tt_host::block::home;
    use tt_host::cli::JournalCmd;
    let cmd = match cli::parse_journal(args) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let dir =
        |d: &Option<std::path::PathBuf>| StateDir::resolve(d.as_deref()).path().join("journals");
    let result = match cmd {
        JournalCmd::Help => {
            println!("{}", cli::JOURNAL_USAGE);
            return ExitCode::SUCCESS;
        }
        JournalCmd::List { state_dir } => home::list(&dir(&state_dir)).map(|all| {
            if all.is_empty() {
                println!("no journals in {}", dir(&state_dir).display());
            }
            for e in all {
                println!("{e}");
            }
        }),
        JournalCmd::Drain { image, state_dir } => home::drain(&dir(&state_dir), &image).map(|o| {
            println!(
                "{}: applied {} writes from its journal",
                image.display(),
                o.records
            )
        }),
        JournalCmd::Discard {
            image,
            yes,
            state_dir,
        } => {
            let dir = dir(&state_dir);
            match home::find(&dir, &image) {
                Ok(None) => {
                    return fail(format!(
                        "{} has no journal in {}",
                        image.display(),
                        dir.display()
                    ))
                }
                Ok(Some(entry)) if !yes => {
                    eprintln!("tt-host: about to throw away this journal:\n{entry}");
                    eprint!("tt-host: type 'yes' to discard it: ");
                    let mut answer = String::new();
                    let _ = std::io::stdin().lock().read_line(&mut answer);
                    if answer.trim() != "yes" {
                        return fail("not discarded (give --yes to skip the question)");
                    }
                    home::discard(&dir, &image)
                }
                Ok(Some(_)) => home::discard(&dir, &image),
                Err(e) => Err(e),
            }
            .map(|o| {
                println!(
                    "{}: journal discarded with {} unapplied writes",
                    image.display(),
                    o.records
                )
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn daemon(args: &[String]) -> ExitCode {
    use tt_host::daemon;
    match daemon::parse_args(args) {
        Ok(None) => {
            println!("{}", daemon::USAGE);
            ExitCode::SUCCESS
        }
        Ok(Some(a)) => match daemon::main(&a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Err(e) => fail(e),
    }
}

/// Build the hello example with the guest SDK from this source tree and boot it.
fn demo() -> ExitCode {
    let sdk = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk");
    let sdk = sdk.canonicalize().unwrap_or(sdk);
    if !sdk.join("Cargo.toml").exists() {
        return fail(format!(
            "demo needs the tt-host source tree (guest SDK not found at {})",
            sdk.display()
        ));
    }
    eprintln!("tt-host: building the hello unikernel in {}", sdk.display());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "-p", "tt-example-hello"])
        .current_dir(&sdk)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => return fail(format!("building the hello unikernel failed ({s})")),
        Err(e) => return fail(format!("cannot run cargo: {e}")),
    }
    let image = sdk.join("target/release/hello");
    eprintln!(
        "tt-host: tt-host run {} -- from tt-host demo",
        image.display()
    );
    run(&[
        "--mem=32".into(),
        image.display().to_string(),
        "--".into(),
        "from".into(),
        "tt-host".into(),
        "demo".into(),
    ])
}

/// Was tt-host started through a link named `solo5-hvt` (or
/// `solo5-hvt.N`, the ABI-versioned name albatross looks for first)?
fn invoked_as_solo5_hvt() -> bool {
    let Some(argv0) = std::env::args_os().next() else {
        return false;
    };
    let name = std::path::Path::new(&argv0)
        .file_name()
        .unwrap_or_default()
        .to_string_lossy();
    name == "solo5-hvt" || name.starts_with("solo5-hvt.")
}

fn main() -> ExitCode {
    // Options, paths and guest arguments are all handled as UTF-8 (the guest
    // command line is a string), so refuse any other argument by name.
    let mut args = Vec::new();
    for (n, a) in std::env::args_os().enumerate().skip(1) {
        match a.into_string() {
            Ok(a) => args.push(a),
            Err(a) => return fail(format!("argument {n} ({a:?}) is not valid UTF-8")),
        }
    }
    if invoked_as_solo5_hvt() {
        return run(&args);
    }
    match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("policy") => policy(&args[1..]),
        Some("journal") => journal(&args[1..]),
        Some("demo") => demo(),
        Some("restore") => restore(&args[1..]),
        Some("migrate-send") => migrate_send(&args[1..]),
        Some("migrate-receive") => migrate_receive(&args[1..]),
        Some(cmd @ ("pause" | "resume" | "snapshot" | "status")) => control(cmd, &args[1..]),
        Some("daemon") => daemon(&args[1..]),
        Some("pool") => match tt_host::daemon::client::pool(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Some("key") => match tt_host::daemon::client::key(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Some(cmd @ ("env" | "template" | "disk")) => {
            use tt_host::daemon::envclient;
            let f = match cmd {
                "env" => envclient::env,
                "template" => envclient::template,
                _ => envclient::disk,
            };
            match f(&args[1..]) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Some(cmd @ ("create" | "destroy" | "restart" | "list" | "info" | "console" | "stats")) => {
            match tt_host::daemon::client::run(cmd, &args[1..]) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            if args.is_empty() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Some("-V" | "--version") => {
            println!("{}", cli::version_text());
            ExitCode::SUCCESS
        }
        Some(other) => fail(format!(
            "unknown command '{}' (see 'tt-host --help')",
            tt_host::text::quote(other)
        )),
    }
}
