//! The CPL 3 monitor (`tt_host::vmm::monitor::emulate`) against arbitrary
//! guest state: the instruction bytes at the trap, the vector and error
//! code, the registers, the shadow descriptor tables and the memory they
//! point into (IDT gates, GDT and TSS entries, the stack) all come from
//! the input, as a hostile image would set them.
//!
//! Invariants: no panic; every write the monitor makes is one the model
//! machine allows (image memory at or above 1 MiB, outside the read-only
//! range) and at most an exception frame (48 bytes) or a table register
//! (10 bytes) long; a trap it serves leaves `rip` and `rsp` canonical
//! whenever it delivered an exception to a gate (the gate's offset is
//! what the image wrote, so only the frame's own checks apply); and the
//! count of traps it served grows by at most one.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tt_host::vmm::monitor::emulate::{Control, Frame, Machine, Monitor, Trapped};

/// Model memory: [1 MiB, 1 MiB + LEN), of which [RO, RO + 4 KiB) is
/// read-only (the image's text).
const BASE: u64 = 0x10_0000;
const LEN: usize = 64 << 10;
const RO: u64 = BASE;

struct Model {
    mem: Vec<u8>,
    msrs: [u64; 3],
    writes: Vec<(u64, usize)>,
}

impl Model {
    fn range(&self, gpa: u64, len: usize) -> Option<std::ops::Range<usize>> {
        let start = gpa.checked_sub(BASE)? as usize;
        let end = start.checked_add(len)?;
        (end <= self.mem.len()).then_some(start..end)
    }
}

impl Machine for Model {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        match self.range(gpa, buf.len()) {
            Some(r) => {
                buf.copy_from_slice(&self.mem[r]);
                true
            }
            None => false,
        }
    }
    fn write(&mut self, gpa: u64, buf: &[u8]) -> bool {
        let Some(r) = self.range(gpa, buf.len()) else {
            return false;
        };
        if gpa < RO + 0x1000 && gpa + buf.len() as u64 > RO {
            return false;
        }
        self.mem[r].copy_from_slice(buf);
        self.writes.push((gpa, buf.len()));
        true
    }
    fn control(&mut self) -> Control {
        Control {
            cr0: 0x8001_0021,
            cr2: BASE + 0x8000,
            cr3: 0x2000,
            cr4: 0x620,
        }
    }
    fn msr(&mut self, index: u32) -> Option<u64> {
        match index {
            0xc000_0100..=0xc000_0102 => Some(self.msrs[(index - 0xc000_0100) as usize]),
            0xc000_0080 => Some(0xd00),
            _ => None,
        }
    }
    fn set_msr(&mut self, index: u32, value: u64) -> bool {
        match index {
            0xc000_0100..=0xc000_0102 => {
                self.msrs[(index - 0xc000_0100) as usize] = value;
                true
            }
            _ => false,
        }
    }
}

fn word(d: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    for (k, x) in b.iter_mut().enumerate() {
        *x = d.get(i * 8 + k).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    // Header: 16 words (registers), then a word each for: vector/error,
    // rsp, rflags, shadow IDT base/limit, shadow GDT base/limit, tr|cs|ss
    // and IF; then 15 code bytes; the rest is memory from BASE + 4 KiB.
    const HEAD: usize = 23 * 8;
    let mut gprs = [0u64; 16];
    for (i, g) in gprs.iter_mut().enumerate() {
        *g = word(data, i);
    }
    let misc = word(data, 16);
    let (vector, error) = ((misc & 0x1f) as u8, misc >> 8);
    let in_mem = |w: u64| BASE + w % (LEN as u64 + 0x100);
    let rsp = in_mem(word(data, 17));
    let rflags = word(data, 18) | 2;
    let mut mon = Monitor::default();
    let idt = word(data, 19);
    mon.shadow.idt = (in_mem(idt), (idt >> 48) as u16);
    let gdt = word(data, 20);
    mon.shadow.gdt = (in_mem(gdt), (gdt >> 48) as u16);
    let sels = word(data, 21);
    mon.shadow.tr = sels as u16;
    mon.shadow.cs = (sels >> 16) as u16;
    mon.shadow.ss = (sels >> 32) as u16;
    mon.shadow.interrupts = sels >> 63 != 0;
    let mut m = Model {
        mem: vec![0; LEN],
        msrs: [0; 3],
        writes: Vec::new(),
    };
    let code = data.get(HEAD..).unwrap_or(&[]);
    let n = code.len().min(15);
    m.mem[..n].copy_from_slice(&code[..n]);
    if let Some(rest) = data.get(HEAD + 15..) {
        let k = rest.len().min(LEN - 0x1000);
        m.mem[0x1000..0x1000 + k].copy_from_slice(&rest[..k]);
    }
    let mut t = Trapped {
        vector,
        error,
        frame: Frame {
            rip: RO + (word(data, 22) % 8),
            cs: 0x23,
            rflags,
            rsp,
            ss: 0x1b,
        },
        gprs,
        gprs_changed: false,
    };
    let before = mon.counts.clone();
    let served = mon.trap(&mut t, &mut m).is_ok();
    for &(_, len) in &m.writes {
        assert!(len <= 48, "a write of {len} bytes");
    }
    assert!(m.writes.len() <= 2, "{} writes in one trap", m.writes.len());
    let grown = (mon.counts.emulated + mon.counts.delivered) - (before.emulated + before.delivered);
    assert!(grown <= 1, "one trap counted {grown} times");
    if served && mon.counts.delivered > before.delivered {
        // A delivered frame lies on the stack just below where it was.
        let (at, len) = *m.writes.last().expect("a delivery writes its frame");
        assert_eq!(t.frame.rsp, at, "rsp is the frame's address");
        assert!(len == 40 || len == 48, "a frame of {len} bytes");
    }
});
