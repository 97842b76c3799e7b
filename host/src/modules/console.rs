//! Console and time: WALLTIME, PUTS and HALT.

use super::{check_range, read_arg, Action, GuestError, Module, CHUNK};
use crate::abi::{layout, Hypercall};
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
                let a = read_arg::<8>(mem, arg)?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                a.set_u64(mem, 0, now);
                Ok(Action::Continue)
            }
            Hypercall::Puts => {
                let a = read_arg::<{ layout::PUTS_SIZE }>(mem, arg)?;
                let (data, len) = (a.u64(0), a.u64(8));
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
                let a = read_arg::<{ layout::HALT_SIZE }>(mem, arg)?;
                // A cookie (for a core dump's notes; tt-host writes none
                // yet) must point at guest memory, as solo5-hvt checks.
                let cookie = a.u64(0);
                if cookie != 0 {
                    check_range(mem, "halt cookie", cookie, layout::HALT_COOKIE_MAX)?;
                }
                Ok(Action::Exit(a.i32(8)))
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

    const MEM: u64 = 2 << 20;
    const ARG: u64 = 0x1000;

    /// Guest memory with the two u64 words of an argument struct at ARG.
    fn mem_with_arg(words: [u64; 2]) -> GuestMemoryMmap {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        m.write_obj(words[0], GuestAddress(ARG)).unwrap();
        m.write_obj(words[1], GuestAddress(ARG + 8)).unwrap();
        m
    }

    fn call(c: Hypercall, words: [u64; 2]) -> Result<Action, GuestError> {
        Console::new(Vec::new()).handle(c, ARG, &mem_with_arg(words))
    }

    #[test]
    fn an_empty_puts_at_an_address_outside_memory_stops_the_guest() {
        for data in [MEM, u64::MAX] {
            let r = call(Hypercall::Puts, [data, 0]);
            assert!(matches!(r, Err(GuestError::BadAddress { .. })), "{r:?}");
        }
        assert_eq!(call(Hypercall::Puts, [0x2000, 0]), Ok(Action::Continue));
    }

    #[test]
    fn a_halt_cookie_must_point_at_guest_memory() {
        for cookie in [MEM - 8, MEM, u64::MAX] {
            let r = call(Hypercall::Halt, [cookie, 3]);
            assert!(matches!(r, Err(GuestError::BadAddress { .. })), "{r:?}");
        }
        assert_eq!(call(Hypercall::Halt, [0, 3]), Ok(Action::Exit(3)));
        assert_eq!(call(Hypercall::Halt, [MEM - 512, 3]), Ok(Action::Exit(3)));
    }
}
