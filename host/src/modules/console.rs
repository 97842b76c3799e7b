//! Console and time: WALLTIME, PUTS and HALT.

use super::{check_range, read_args, set_out, Action, GuestError, Module, CHUNK};
use crate::abi::{HcHalt, HcPuts, HcWalltime, Hypercall, HALT_COOKIE_MAX};
use std::io::Write;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Writes guest console output to a host writer (stdout for `tt-host run`).
pub struct Console<W: Write> {
    out: W,
}

impl<W: Write> Console<W> {
    pub fn new(out: W) -> Self {
        Console { out }
    }
}

impl<W: Write> Module for Console<W> {
    fn name(&self) -> &'static str {
        "console"
    }

    fn hypercalls(&self) -> &'static [Hypercall] {
        &[Hypercall::Walltime, Hypercall::Puts, Hypercall::Halt]
    }

    fn handle(
        &mut self,
        call: Hypercall,
        arg: u64,
        mem: &GuestMemoryMmap,
    ) -> Result<Action, GuestError> {
        match call {
            Hypercall::Walltime => {
                let (_, at) = read_args::<HcWalltime>(mem, arg)?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                set_out!(mem, at, HcWalltime.nsecs = now);
                Ok(Action::Continue)
            }
            Hypercall::Puts => {
                let (HcPuts { data, len }, _) = read_args::<HcPuts>(mem, arg)?;
                check_range(mem, "console output", data, len)?;
                let mut buf = vec![0u8; (len as usize).min(CHUNK)];
                let mut done = 0u64;
                while done < len {
                    let n = ((len - done) as usize).min(CHUNK);
                    // In range: checked above.
                    let _ = mem.read_slice(&mut buf[..n], GuestAddress(data + done));
                    // A closed stdout must not stop the guest.
                    let _ = self.out.write_all(&buf[..n]);
                    done += n as u64;
                }
                let _ = self.out.flush();
                Ok(Action::Continue)
            }
            Hypercall::Halt => {
                let (a, _) = read_args::<HcHalt>(mem, arg)?;
                // A cookie (for a core dump's notes; tt-host writes none
                // yet) must point at guest memory, as solo5-hvt checks.
                if a.cookie != 0 {
                    check_range(mem, "halt cookie", a.cookie, HALT_COOKIE_MAX)?;
                }
                Ok(Action::Exit(a.exit_status))
            }
            _ => unreachable!("console registered only its own hypercalls"),
        }
    }

    fn shutdown(&mut self) -> Result<(), String> {
        // Console output is best effort, as in solo5-hvt: a closed stdout
        // does not fail the run.
        let _ = self.out.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::ByteValued;

    const MEM: u64 = 2 << 20;
    const ARG: u64 = 0x1000;

    /// Guest memory with the argument struct `arg` at ARG.
    fn mem_with_arg<T: ByteValued>(arg: T) -> GuestMemoryMmap {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        m.write_obj(arg, GuestAddress(ARG)).unwrap();
        m
    }

    fn call<T: ByteValued>(c: Hypercall, arg: T) -> Result<Action, GuestError> {
        Console::new(Vec::new()).handle(c, ARG, &mem_with_arg(arg))
    }

    fn puts(data: u64, len: u64) -> Result<Action, GuestError> {
        call(Hypercall::Puts, HcPuts { data, len })
    }

    fn halt(cookie: u64, exit_status: i32) -> Result<Action, GuestError> {
        let a = HcHalt {
            cookie,
            exit_status,
            _pad: 0,
        };
        call(Hypercall::Halt, a)
    }

    #[test]
    fn an_empty_puts_at_an_address_outside_memory_stops_the_guest() {
        for data in [MEM, u64::MAX] {
            let r = puts(data, 0);
            assert!(matches!(r, Err(GuestError::BadAddress { .. })), "{r:?}");
        }
        assert_eq!(puts(0x2000, 0), Ok(Action::Continue));
    }

    #[test]
    fn puts_writes_the_guest_bytes_to_the_console() {
        let mem = mem_with_arg(HcPuts {
            data: 0x2000,
            len: 5,
        });
        mem.write_slice(b"hello, world", GuestAddress(0x2000))
            .unwrap();
        let mut c = Console::new(Vec::new());
        assert_eq!(c.handle(Hypercall::Puts, ARG, &mem), Ok(Action::Continue));
        assert_eq!(c.out, b"hello");
    }

    #[test]
    fn a_halt_cookie_must_point_at_guest_memory() {
        for cookie in [MEM - 8, MEM, u64::MAX] {
            let r = halt(cookie, 3);
            assert!(matches!(r, Err(GuestError::BadAddress { .. })), "{r:?}");
        }
        assert_eq!(halt(0, 3), Ok(Action::Exit(3)));
        assert_eq!(halt(MEM - 512, 3), Ok(Action::Exit(3)));
        assert_eq!(halt(0, -1), Ok(Action::Exit(-1)));
    }

    #[test]
    fn walltime_writes_only_nsecs() {
        let mem = mem_with_arg(HcWalltime { nsecs: 0 });
        mem.write_obj(u64::MAX, GuestAddress(ARG + 8)).unwrap();
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let r = Console::new(Vec::new()).handle(Hypercall::Walltime, ARG, &mem);
        assert_eq!(r, Ok(Action::Continue));
        let nsecs = mem.read_obj::<HcWalltime>(GuestAddress(ARG)).unwrap().nsecs;
        assert!(nsecs >= before, "{nsecs} < {before}");
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(ARG + 8)).unwrap(),
            u64::MAX
        );
    }

    #[test]
    fn an_argument_struct_past_the_end_of_memory_stops_the_guest() {
        let mem = mem_with_arg(HcHalt::default());
        for call in [Hypercall::Walltime, Hypercall::Puts, Hypercall::Halt] {
            let r = Console::new(Vec::new()).handle(call, MEM - 4, &mem);
            assert!(
                matches!(r, Err(GuestError::BadAddress { .. })),
                "{call:?}: {r:?}"
            );
        }
    }
}
