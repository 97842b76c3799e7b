//! Device kinds: what a manifest entry type needs from the host.
//!
//! As in Solo5's tender, where `hvt_module_blk.c` owns its options, setup
//! and usage, each kind of device owns everything about itself: the
//! command-line options that give and tune its devices (`--block:NAME=PATH`,
//! `--block-sector-size:NAME=BYTES`), their help text, what its devices take
//! from admission, and attaching them. The command line ([`crate::cli`])
//! and the launch ([`crate::launch`]) only go through [`kinds()`]; adding a
//! device kind means writing one [`DeviceKind`] and adding it to that list.

use super::Module;
use crate::loader::manifest::DeviceInfo;
use crate::resources::Unikernel;

/// One option a device kind owns.
#[derive(Debug, Clone, Copy)]
pub struct OptionSpec {
    /// The option's name without the leading `--`, e.g. `block-sector-size`.
    pub name: &'static str,
    /// What its value is, for the help text, e.g. `BYTES`.
    pub value: &'static str,
    /// May it also be given without a device name (`--OPT=VALUE`), as the
    /// default for every device of the kind? A `--OPT:NAME=VALUE` for one
    /// device overrides it.
    pub default_for_all: bool,
    /// Help text, without the option itself: lines of up to 44 columns
    /// (leading spaces are dropped; the help aligns them).
    pub help: &'static str,
}

/// One device option from the command line: `--OPT:NAME=VALUE`, or
/// `--OPT=VALUE` (then `device` is `None`) for an option that is a default
/// for every device of its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceOption {
    /// The option's name, e.g. `block` or `net-mac`.
    pub option: &'static str,
    pub device: Option<String>,
    pub value: String,
}

/// One device of a kind, as the command line and the manifest give it.
#[derive(Debug, Clone, Copy)]
pub struct Given<'a> {
    /// The device's name, from the manifest and `--OPT:NAME`.
    pub name: &'a str,
    /// Its index in the manifest.
    pub handle: u64,
    options: &'a [DeviceOption],
}

impl<'a> Given<'a> {
    pub fn new(name: &'a str, handle: u64, options: &'a [DeviceOption]) -> Self {
        Given {
            name,
            handle,
            options,
        }
    }

    /// The value of `option` for this device: its own `--OPT:NAME=VALUE`,
    /// else the kind-wide `--OPT=VALUE`, else `None`.
    pub fn option(&self, option: &str) -> Option<&'a str> {
        let mut default = None;
        for o in self.options.iter().filter(|o| o.option == option) {
            match &o.device {
                Some(d) if d == self.name => return Some(&o.value),
                Some(_) => {}
                None => default = Some(o.value.as_str()),
            }
        }
        default
    }
}

/// What attaching a kind's devices gives the launch.
pub struct Attached {
    /// What the host fills into each device's manifest entry, by handle.
    pub info: Vec<(u64, DeviceInfo)>,
    /// The module that serves the devices' hypercalls.
    pub module: Box<dyn Module>,
    /// What the POLL hypercall waits on for these devices.
    pub readiness: Vec<Box<dyn super::poll::Readiness>>,
    /// Their register windows in the MMIO window, if they have any.
    pub mmio: Vec<crate::vmm::bus::MmioRegion>,
}

/// What a kind's devices are attached with.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// What admission granted the whole unikernel.
    pub admitted: &'a Unikernel,
    /// The state directory (`--state-dir`): block journals live in it.
    pub state_dir: &'a std::path::Path,
    /// The image, for what its devices must not touch (its read-only and
    /// executable segments).
    pub image: &'a crate::loader::Image,
    /// MMIO window slots taken by the kinds attached before this one: this
    /// kind's devices take the next ones.
    pub mmio_slots_used: usize,
}

/// A device that could not be given, admitted or attached. The message
/// names the device and what to do.
pub type DeviceError = Box<dyn std::error::Error + Send + Sync>;

/// A kind of device: a manifest entry type and the options that give it.
pub trait DeviceKind: Sync {
    /// The kind's name in messages, e.g. `block`.
    fn name(&self) -> &'static str;
    /// The manifest entry type (`mft_type`) its devices have.
    fn mft_type(&self) -> u32;
    /// The options it owns (its help lists them).
    fn options(&self) -> &'static [OptionSpec];
    /// The option that gives one of its devices: every device of the kind
    /// that the manifest declares must be given with it. The first option
    /// it owns, unless it takes another kind's (a virtio-blk device is
    /// given with `--block:NAME=PATH`, as an hvt block device is).
    fn given_by(&self) -> &'static OptionSpec {
        &self.options()[0]
    }
    /// Options another kind owns that this kind's devices take too (the
    /// owner checks their values; the manifest says which kind a device
    /// is).
    fn shares(&self) -> &'static [&'static str] {
        &[]
    }
    /// Does a device of this kind take `option`?
    fn takes(&self, option: &str) -> bool {
        self.options().iter().any(|o| o.name == option) || self.shares().contains(&option)
    }
    /// Check an option's value when the command line is parsed (its
    /// syntax only: no files, no devices). The error says what is wrong.
    fn check(&self, option: &str, value: &str) -> Result<(), String> {
        let _ = (option, value);
        Ok(())
    }
    /// Add what these devices take to `uk`, before admission (nothing is
    /// opened for use yet).
    fn resources(&self, devices: &[Given], uk: &mut Unikernel) -> Result<(), DeviceError>;
    /// Open and attach the devices, after admission.
    fn attach(&self, devices: &[Given], ctx: &Context) -> Result<Attached, DeviceError>;
}

/// Every device kind tt-host knows, in the order their modules are set up.
static KINDS: &[&dyn DeviceKind] = &[
    &super::block::KIND,
    &super::net::KIND,
    &crate::devices::virtio::kind::KIND,
    #[cfg(test)]
    &tests::DUMMY,
];

/// Every device kind tt-host knows, in the order their modules are set up.
pub fn kinds() -> &'static [&'static dyn DeviceKind] {
    KINDS
}

/// The kind that owns option `name` (without `--`), and the option.
pub fn option_owner(name: &str) -> Option<(&'static dyn DeviceKind, &'static OptionSpec)> {
    kinds()
        .iter()
        .find_map(|k| k.options().iter().find(|o| o.name == name).map(|o| (*k, o)))
}

/// The kind whose devices have manifest type `mft_type`.
pub fn kind_of_type(mft_type: u32) -> Option<&'static dyn DeviceKind> {
    kinds().iter().copied().find(|k| k.mft_type() == mft_type)
}

/// The help text of every kind's options, for `tt-host run --help`.
pub fn usage() -> String {
    let mut out = String::new();
    for o in kinds().iter().flat_map(|k| k.options()) {
        let help = o
            .help
            .lines()
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(&format!("\n{:32}", ""));
        let spelled = if o.default_for_all {
            format!("--{n}[:NAME]={v}", n = o.name, v = o.value)
        } else {
            format!("--{n}:NAME={v}", n = o.name, v = o.value)
        };
        if spelled.len() <= 28 {
            out.push_str(&format!("  {spelled:<30}{help}\n"));
        } else {
            out.push_str(&format!("  {spelled}\n{:32}{help}\n", ""));
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    //! A device kind that exists only in tests, to show that a kind is
    //! one `DeviceKind` and one line in [`kinds`].
    use super::*;
    use crate::abi::Hypercall;
    use crate::modules::{Action, GuestError, GuestMem};

    /// Manifest type of the dummy kind (below `MFT_RESERVED_FIRST`, unused
    /// by Solo5).
    pub const DUMMY_TYPE: u32 = 0x7d;

    pub struct Dummy;
    pub static DUMMY: Dummy = Dummy;

    struct DummyModule;
    impl Module for DummyModule {
        fn name(&self) -> &'static str {
            "dummy"
        }
        fn hypercalls(&self) -> &'static [Hypercall] {
            &[]
        }
        fn handle(&mut self, _: Hypercall, _: u64, _: &GuestMem) -> Result<Action, GuestError> {
            Ok(Action::Continue)
        }
    }

    impl DeviceKind for Dummy {
        fn name(&self) -> &'static str {
            "dummy"
        }
        fn mft_type(&self) -> u32 {
            DUMMY_TYPE
        }
        fn options(&self) -> &'static [OptionSpec] {
            &[
                OptionSpec {
                    name: "dummy",
                    value: "WORD",
                    default_for_all: false,
                    help: "attach dummy device NAME",
                },
                OptionSpec {
                    name: "dummy-colour",
                    value: "COLOUR",
                    default_for_all: true,
                    help: "its colour: red or blue",
                },
            ]
        }
        fn check(&self, option: &str, value: &str) -> Result<(), String> {
            if option == "dummy-colour" && value != "red" && value != "blue" {
                return Err(format!("'{value}' is not red or blue"));
            }
            Ok(())
        }
        fn resources(&self, devices: &[Given], uk: &mut Unikernel) -> Result<(), DeviceError> {
            uk.memory_mb += devices.len() as u64;
            Ok(())
        }
        fn attach(&self, devices: &[Given], _: &Context) -> Result<Attached, DeviceError> {
            if let Some(d) = devices.iter().find(|d| d.option("dummy") == Some("fail")) {
                return Err(format!("dummy device '{}' was told to fail", d.name).into());
            }
            Ok(Attached {
                info: vec![],
                module: Box::new(DummyModule),
                readiness: vec![],
                mmio: vec![],
            })
        }
    }

    fn opt(option: &'static str, device: Option<&str>, value: &str) -> DeviceOption {
        DeviceOption {
            option,
            device: device.map(String::from),
            value: value.into(),
        }
    }

    #[test]
    fn a_kind_registered_in_one_line_owns_its_options_and_help() {
        let (kind, spec) = option_owner("dummy-colour").expect("registered");
        assert_eq!(kind.name(), "dummy");
        assert!(spec.default_for_all);
        assert!(kind_of_type(DUMMY_TYPE).is_some());
        let help = usage();
        assert!(help.contains("--dummy:NAME=WORD"), "{help}");
        assert!(help.contains("--dummy-colour[:NAME]=COLOUR"), "{help}");
        assert!(help.contains("--block:NAME=PATH"), "{help}");
    }

    #[test]
    fn a_device_option_overrides_the_kind_wide_default() {
        let opts = [
            opt("dummy", Some("a"), "x"),
            opt("dummy", Some("b"), "y"),
            opt("dummy-colour", None, "red"),
            opt("dummy-colour", Some("b"), "blue"),
        ];
        let a = Given::new("a", 1, &opts);
        let b = Given::new("b", 2, &opts);
        assert_eq!(a.option("dummy"), Some("x"));
        assert_eq!(a.option("dummy-colour"), Some("red"));
        assert_eq!(b.option("dummy-colour"), Some("blue"));
        assert_eq!(Given::new("c", 3, &opts[..2]).option("dummy-colour"), None);
    }
}
