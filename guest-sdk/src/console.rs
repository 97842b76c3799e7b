//! Console output.
//!
//! Every console write is one `PUTS` hypercall (a VM exit, tens of
//! microseconds on some hosts), so output is never written byte by byte:
//! [`print!`](crate::print) and [`println!`](crate::println) format into a
//! stack buffer and issue one hypercall per call (more only if a single
//! call produces more than [`LINE_MAX`] bytes).

use core::fmt::{self, Write};

use crate::hypercall;

/// Size of the formatting buffer; longer output is split into chunks of
/// this size.
pub const LINE_MAX: usize = 1024;

/// Write raw bytes to the console with one hypercall.
pub fn write(bytes: &[u8]) {
    if !bytes.is_empty() {
        hypercall::puts(bytes);
    }
}

/// Write a string to the console with one hypercall.
pub fn write_str(s: &str) {
    write(s.as_bytes());
}

/// A formatter that buffers output and flushes it in one hypercall.
pub struct LineWriter {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl LineWriter {
    /// An empty writer.
    pub const fn new() -> Self {
        LineWriter {
            buf: [0; LINE_MAX],
            len: 0,
        }
    }

    /// Send what is buffered to the console.
    pub fn flush(&mut self) {
        write(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Default for LineWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for LineWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut s = s.as_bytes();
        while !s.is_empty() {
            if self.len == LINE_MAX {
                self.flush();
            }
            let n = s.len().min(LINE_MAX - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
            self.len += n;
            s = &s[n..];
        }
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        self.flush();
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    let mut w = LineWriter::new();
    let _ = w.write_fmt(args);
}

/// Print to the console (one hypercall per call).
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::console::_print(::core::format_args!($($arg)*))
    };
}

/// Print a line to the console (one hypercall per call).
#[macro_export]
macro_rules! println {
    () => {
        $crate::console::write(b"\n")
    };
    ($($arg:tt)*) => {
        $crate::console::_print(::core::format_args!("{}\n", ::core::format_args!($($arg)*)))
    };
}
