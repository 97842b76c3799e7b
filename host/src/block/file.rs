//! The plain backend: today's behaviour, for `--block-durability=none`.
//!
//! Every request is served in [`submit`](Backend::submit) itself with
//! `pread`/`pwrite` on the image and completes at once. A completed write
//! is in the page cache, not durable; FLUSH and [`shutdown`] are an
//! `fdatasync`.
//!
//! [`shutdown`]: Backend::shutdown

use super::{Backend, Completion, Completions, Error, Image, Info, Request, Response};
use std::sync::Arc;

pub struct FileBackend<I: Image = std::fs::File> {
    info: Info,
    image: Arc<I>,
    completions: Completions,
    in_flight: usize,
    shut: bool,
}

impl<I: Image> FileBackend<I> {
    /// Serve `image`, of the shape `info.geometry` says (the caller has
    /// checked it against the image's size).
    pub fn new(info: Info, image: Arc<I>) -> Result<FileBackend<I>, Error> {
        Ok(FileBackend {
            completions: Completions::new(&info.name)?,
            info,
            image,
            in_flight: 0,
            shut: false,
        })
    }

    fn io(&self, what: String, source: std::io::Error) -> Error {
        Error::Io {
            device: self.info.name.clone(),
            what,
            source,
        }
    }

    fn serve(&self, request: Request) -> Result<Response, Error> {
        if self.shut {
            return Err(Error::ShutDown {
                device: self.info.name.clone(),
            });
        }
        match request {
            Request::Read(span) => {
                check(&self.info, span)?;
                let mut buf = vec![0u8; span.len() as usize];
                self.image.read_at(&mut buf, span.offset()).map_err(|e| {
                    self.io(format!("read {:#x}+{:#x}", span.offset(), span.len()), e)
                })?;
                Ok(Response::Read(buf))
            }
            Request::Write(w) => {
                check(&self.info, w.span())?;
                let span = w.span();
                self.image.write_at(w.data(), span.offset()).map_err(|e| {
                    self.io(format!("write {:#x}+{:#x}", span.offset(), span.len()), e)
                })?;
                Ok(Response::Written)
            }
            Request::Flush => {
                self.image
                    .sync_data()
                    .map_err(|e| self.io("flush (fdatasync)".into(), e))?;
                Ok(Response::Flushed)
            }
            Request::GetId => Ok(Response::Id(self.info.id)),
        }
    }
}

/// Refuse a span checked against another device's geometry.
pub(crate) fn check(info: &Info, span: super::Span) -> Result<(), Error> {
    if info.geometry.contains(span) {
        Ok(())
    } else {
        Err(Error::Request {
            device: info.name.clone(),
            source: super::RequestError::OutOfRange {
                offset: span.offset(),
                len: span.len(),
                capacity: info.geometry.capacity,
            },
        })
    }
}

impl<I: Image> Backend for FileBackend<I> {
    fn info(&self) -> &Info {
        &self.info
    }

    fn submit(&mut self, user_data: u64, request: Request) -> Result<(), Error> {
        if self.shut {
            return Err(Error::ShutDown {
                device: self.info.name.clone(),
            });
        }
        let result = self.serve(request);
        self.in_flight += 1;
        self.completions.post(Completion { user_data, result });
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        let n = self.completions.drain(out);
        self.in_flight -= n;
        n
    }

    fn event(&self) -> &vmm_sys_util::eventfd::EventFd {
        self.completions.event()
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn execute(&mut self, request: Request) -> Result<Response, Error> {
        if self.in_flight > 0 {
            return Err(Error::Busy {
                device: self.info.name.clone(),
                in_flight: self.in_flight,
            });
        }
        self.serve(request)
    }

    fn shutdown(&mut self) -> Result<(), Error> {
        if self.shut {
            return Ok(());
        }
        self.shut = true;
        self.image.sync_data().map_err(|e| {
            self.io(
                "could not be flushed at shutdown (what the guest wrote may not be on disk)".into(),
                e,
            )
        })
    }
}
