//! tt-host: launch single-purpose unikernels on KVM.
//!
//! A guest is a static x86-64 ELF image that speaks Solo5's hvt ABI: it
//! starts in long mode with a pointer to a boot-info struct in `rdi`, talks
//! to the host by writing the 32-bit guest-physical address of an argument
//! struct to I/O port `0x500 + n` (hypercall `n`), and declares the devices
//! it needs in an ELF note, the manifest. Real Solo5/MirageOS images run
//! unmodified, and `tt-host run` takes solo5-hvt's options.
//!
//! One launch flows through these modules, in order:
//! - [`cli`]: parse the `tt-host run` command line;
//! - [`loader`]: validate the ELF image, its ABI note and its manifest
//!   (pure functions over bytes; the fuzzer drives them);
//! - [`launch`]: match the manifest against the devices given, then admit
//!   the launch ([`admission`]: the policy tree of [`resources`], kept in a
//!   state directory shared by all `tt-host` processes, checked against
//!   every ancestor's policy before any device or VM exists), attach the
//!   devices (each device kind attaches its own: [`modules::kind`]);
//! - [`vmm`]: create the KVM VM and vCPU, lay out guest memory and page
//!   tables (W^X from the ELF segment flags), run the vCPU;
//! - [`block`]: the block layer: request checks, plain and journaled backends;
//! - [`devices`]: guest devices in the MMIO window (virtio-mmio, virtio-blk);
//! - [`modules`]: device kinds ([`modules::kind`]: each owns its
//!   command-line options, admission and attach, as Solo5's tender modules
//!   do) and the hypercall handlers (console and time, block, net, POLL
//!   over every device's readiness).
//!
//! The admission's reservation is released when the launch ends.
//! [`runfile`] holds the console ring and stats files a supervisor reads.
//! [`images`] makes runtime images from templates and keeps disk
//! snapshots (issue 21; the daemon drives it). [`envnet`] sets up and
//! tears down an environment's network on the host: its bridge, its
//! unikernels' TAPs and its nftables table.
//! [`abi`] holds the shared layouts. docs/ABI.md says what a guest may rely on.

pub mod abi;
pub mod admission;
pub mod block;
pub mod cli;
pub mod client_creds;
pub mod cluster;
pub mod control;
pub mod daemon;
pub mod devices;
pub mod envnet;
pub mod images;
pub mod launch;
pub mod loader;
pub mod migration;
pub mod modules;
pub mod pools;
pub mod resources;
pub mod runfile;
pub mod sandbox;
pub mod snapshot;
pub mod text;
pub mod vmm;
