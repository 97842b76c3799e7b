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

    fn read_into(
        &mut self,
        span: super::Span,
        dst: &[vm_memory::VolatileSlice<'_>],
    ) -> Result<(), Error> {
        if self.shut {
            return Err(Error::ShutDown {
                device: self.info.name.clone(),
            });
        }
        check(&self.info, span)?;
        super::read_image_into(&self.info, &*self.image, span, dst)
    }

    fn quiesce(&mut self) -> Result<(), Error> {
        if self.shut {
            return Err(Error::ShutDown {
                device: self.info.name.clone(),
            });
        }
        self.image
            .sync_data()
            .map_err(|e| self.io("could not be synced for a snapshot".into(), e))
    }

    fn image_file(&self) -> Option<&std::fs::File> {
        self.image.as_file()
    }

    fn lock_fds(&self) -> Vec<std::os::fd::RawFd> {
        let image = self.image_file().map(std::os::fd::AsRawFd::as_raw_fd);
        image.into_iter().collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::testing::{contents, ModelImage};
    use crate::block::{Geometry, ID_LEN};
    use tt_ring::FaultyDevice;

    fn backend(image: &Arc<FaultyDevice>, capacity: u64) -> FileBackend<ModelImage> {
        let info = Info {
            name: "disk".into(),
            geometry: Geometry {
                capacity,
                sector_size: 512,
            },
            id: [1; ID_LEN],
            durable_writes: false,
            max_atomic_write: 512,
        };
        FileBackend::new(info, Arc::new(ModelImage(image.clone()))).unwrap()
    }

    /// `read_into` on a real file: `pread` straight into the
    /// destination buffers, split anywhere, not only at sectors.
    #[test]
    fn a_read_into_buffers_comes_straight_from_the_file() {
        let tmp = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let file = tmp.into_file();
        let bytes: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        std::os::unix::fs::FileExt::write_all_at(&file, &bytes, 0).unwrap();
        let info = Info {
            name: "disk".into(),
            geometry: Geometry {
                capacity: 4096,
                sector_size: 512,
            },
            id: [1; ID_LEN],
            durable_writes: false,
            max_atomic_write: 512,
        };
        let mut b = FileBackend::new(info, Arc::new(file)).unwrap();
        let g = b.info().geometry;
        let (mut x, mut y) = (vec![0u8; 100], vec![0u8; 1436]);
        let dst = [
            vm_memory::VolatileSlice::from(&mut x[..]),
            vm_memory::VolatileSlice::from(&mut y[..]),
        ];
        b.read_into(g.span(1024, 1536).unwrap(), &dst).unwrap();
        assert_eq!(x[..], bytes[1024..1124]);
        assert_eq!(y[..], bytes[1124..2560]);
        // Buffers that do not add up to the span are refused.
        let mut z = vec![0u8; 512];
        let short = [vm_memory::VolatileSlice::from(&mut z[..])];
        assert!(matches!(
            b.read_into(g.span(0, 1024).unwrap(), &short),
            Err(Error::Request { .. })
        ));
    }

    #[test]
    fn a_completed_write_is_durable_only_after_a_flush() {
        let image = Arc::new(FaultyDevice::new(4096, 512));
        let mut b = backend(&image, 4096);
        let g = b.info().geometry;
        b.execute(Request::write(&g, 0, vec![1; 512]).unwrap())
            .unwrap();
        image.crash();
        assert_eq!(contents(&image)[..512], [0; 512], "not flushed: lost");
        b.execute(Request::write(&g, 512, vec![2; 512]).unwrap())
            .unwrap();
        assert_eq!(b.execute(Request::Flush).unwrap(), Response::Flushed);
        b.execute(Request::write(&g, 1024, vec![3; 512]).unwrap())
            .unwrap();
        b.shutdown().unwrap();
        image.crash();
        let c = contents(&image);
        assert_eq!(c[512..1024], [2; 512], "flushed");
        assert_eq!(c[1024..1536], [3; 512], "synced at shutdown");
    }

    #[test]
    fn a_span_checked_against_a_larger_device_is_refused() {
        let image = Arc::new(FaultyDevice::new(4096, 512));
        let mut b = backend(&image, 4096);
        let big = Geometry {
            capacity: 1 << 20,
            sector_size: 512,
        };
        let e = b
            .execute(Request::read(&big, 8192, 512).unwrap())
            .unwrap_err();
        assert!(matches!(e, Error::Request { .. }), "{e}");
        assert!(e.to_string().contains("'disk'"), "{e}");
    }
}
