//! The virtio-mmio version 2 register file (virtio 1.x section 4.2.2),
//! independent of the device kind behind it.
//!
//! [`Transport::read`] and [`Transport::write`] take any guest access:
//! registers are 32 bits wide and read or written only by aligned 4-byte
//! accesses (others read 0 and are ignored); the device's configuration
//! space at [`CONFIG`] may be read with 1, 2, 4 or 8-byte accesses. A
//! write that needs the device (a notify, a reset, a queue made ready,
//! DRIVER_OK) is returned as an [`Action`].

use super::{features::F_VERSION_1, status};
use virtio_queue::{Queue, QueueT};

/// Size of one device's register window.
pub const REGS_SIZE: u64 = 0x1000;
/// tt-host's vendor id: "tt" then the first two letters of "host".
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"ttho");
pub use tt_hvt_abi::virtio::mmio::*;

/// What a register write asks of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    /// QueueNotify for queue 0: serve the available ring.
    Notify,
    /// Status was written 0: the transport is reset; drop all state.
    Reset,
    /// QueueReady was written 1 for queue 0: check the queue's addresses
    /// and then [`Transport::set_queue_ready`] or [`Transport::fail`].
    QueueReady,
    /// QueueReady was written 0: the queue is stopped.
    QueueStop,
    /// DRIVER_OK was set: the device is live.
    DriverOk,
}

/// What a snapshot keeps of a [`Transport`]: its registers and its queue's
/// position (the rings themselves are in guest memory).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    pub device_features_sel: u32,
    pub driver_features: u64,
    pub driver_features_sel: u32,
    pub status: u32,
    pub queue_sel: u32,
    pub queue_num: u16,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    pub ready: bool,
    pub next_avail: u16,
    pub next_used: u16,
}

/// The transport's registers and its one queue.
#[derive(Debug)]
pub struct Transport {
    device_id: u32,
    device_features: u64,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    status: u32,
    queue_sel: u32,
    queue_num: u16,
    desc: u64,
    driver: u64,
    device: u64,
    /// The queue; addresses and size are applied at QueueReady.
    pub queue: Queue,
}

fn set_low(v: &mut u64, x: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(x);
}
fn set_high(v: &mut u64, x: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(x) << 32);
}

impl Transport {
    /// A transport for device `device_id` offering `features`, with one
    /// queue of at most `queue_max` entries (a power of two, at most
    /// 32768; `None` otherwise).
    pub fn new(device_id: u32, features: u64, queue_max: u16) -> Option<Transport> {
        let queue = Queue::new(queue_max).ok()?;
        Some(Transport {
            device_id,
            device_features: features | (1 << F_VERSION_1),
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            status: 0,
            queue_sel: 0,
            queue_num: queue_max,
            desc: 0,
            driver: 0,
            device: 0,
            queue,
        })
    }

    /// Its state, for a snapshot.
    pub fn save(&self) -> TransportState {
        TransportState {
            device_features_sel: self.device_features_sel,
            driver_features: self.driver_features,
            driver_features_sel: self.driver_features_sel,
            status: self.status,
            queue_sel: self.queue_sel,
            queue_num: self.queue_num,
            desc: self.desc,
            driver: self.driver,
            device: self.device,
            ready: self.queue.ready(),
            next_avail: self.queue.next_avail(),
            next_used: self.queue.next_used(),
        }
    }

    /// Take the state `s` (of a transport offering the same features).
    /// `false`, and the transport reset, if it is not one this transport
    /// could have reached: features it does not offer, or a queue the
    /// virtqueue refuses.
    pub fn restore(&mut self, s: &TransportState) -> bool {
        self.reset();
        if s.driver_features & !self.device_features != 0 {
            return false;
        }
        self.device_features_sel = s.device_features_sel;
        self.driver_features = s.driver_features;
        self.driver_features_sel = s.driver_features_sel;
        self.status = s.status;
        self.queue_sel = s.queue_sel;
        self.queue_num = s.queue_num;
        (self.desc, self.driver, self.device) = (s.desc, s.driver, s.device);
        if s.ready {
            if !self.set_queue_ready() {
                self.reset();
                return false;
            }
            self.queue.set_next_avail(s.next_avail);
            self.queue.set_next_used(s.next_used);
        }
        true
    }

    /// Back to the state after `new` (status 0, queue not ready).
    pub fn reset(&mut self) {
        self.device_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.status = 0;
        self.queue_sel = 0;
        self.queue_num = self.queue.max_size();
        self.desc = 0;
        self.driver = 0;
        self.device = 0;
        self.queue.reset();
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    /// Features the driver accepted (valid once FEATURES_OK is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    pub fn has_feature(&self, bit: u32) -> bool {
        self.driver_features & (1 << bit) != 0
    }

    /// Serving requests: DRIVER_OK, no NEEDS_RESET/FAILED, queue ready.
    pub fn live(&self) -> bool {
        self.status & status::DRIVER_OK != 0
            && self.status & (status::DEVICE_NEEDS_RESET | status::FAILED) == 0
            && self.queue.ready()
    }

    /// The driver broke the device's contract: set DEVICE_NEEDS_RESET.
    pub fn fail(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
    }

    /// The queue's guest addresses and size as the driver wrote them:
    /// (descriptor table, driver area, device area, size).
    pub fn queue_layout(&self) -> (u64, u64, u64, u16) {
        (self.desc, self.driver, self.device, self.queue_num)
    }

    /// Apply the written size and addresses to the queue and make it
    /// ready; `false` (queue unchanged, not ready) if the virtqueue
    /// refuses them (size not a power of two or above the maximum,
    /// misaligned rings).
    pub fn set_queue_ready(&mut self) -> bool {
        let event_idx = self.has_feature(super::features::RING_F_EVENT_IDX);
        let q = &mut self.queue;
        let ok = q.try_set_size(self.queue_num).is_ok()
            && q.try_set_desc_table_address(vm_memory::GuestAddress(self.desc))
                .is_ok()
            && q.try_set_avail_ring_address(vm_memory::GuestAddress(self.driver))
                .is_ok()
            && q.try_set_used_ring_address(vm_memory::GuestAddress(self.device))
                .is_ok();
        if ok {
            q.set_event_idx(event_idx);
            q.set_ready(true);
        } else {
            q.reset();
        }
        ok
    }

    /// A guest read of `data.len()` bytes at `offset`; `config` is the
    /// device's configuration space.
    pub fn read(&self, offset: u64, data: &mut [u8], config: &[u8]) {
        data.fill(0);
        if offset >= CONFIG {
            let Ok(at) = usize::try_from(offset - CONFIG) else {
                return;
            };
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                if let Some(src) = at
                    .checked_add(data.len())
                    .and_then(|end| config.get(at..end))
                {
                    data.copy_from_slice(src);
                }
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            return;
        }
        let q0 = self.queue_sel == 0;
        let v: u32 = match offset {
            MAGIC_VALUE => MAGIC,
            VERSION => VERSION_2,
            DEVICE_ID => self.device_id,
            VENDOR => VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX if q0 => u32::from(self.queue.max_size()),
            QUEUE_READY if q0 => u32::from(self.queue.ready()),
            INTERRUPT_STATUS => 0,
            STATUS => self.status,
            // No shared memory regions: their length reads as all ones.
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => 0,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        if offset >= CONFIG || data.len() != 4 || offset % 4 != 0 {
            // The configuration space is read-only (no writeback feature).
            return Action::None;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        // Queue registers may change only while the queue is not ready
        // and before DRIVER_OK; other writes are ignored.
        let queue_setup =
            self.queue_sel == 0 && !self.queue.ready() && self.status & status::DRIVER_OK == 0;
        let features_open = self.status & status::FEATURES_OK == 0;
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = v,
            DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            DRIVER_FEATURES if features_open => match self.driver_features_sel {
                0 => set_low(&mut self.driver_features, v),
                1 => set_high(&mut self.driver_features, v),
                // Bits beyond 64 were never offered.
                _ if v != 0 => self.fail(),
                _ => {}
            },
            QUEUE_SEL => self.queue_sel = v,
            QUEUE_NUM if queue_setup => self.queue_num = v.min(u32::from(u16::MAX)) as u16,
            QUEUE_DESC_LOW if queue_setup => set_low(&mut self.desc, v),
            QUEUE_DESC_HIGH if queue_setup => set_high(&mut self.desc, v),
            QUEUE_DRIVER_LOW if queue_setup => set_low(&mut self.driver, v),
            QUEUE_DRIVER_HIGH if queue_setup => set_high(&mut self.driver, v),
            QUEUE_DEVICE_LOW if queue_setup => set_low(&mut self.device, v),
            QUEUE_DEVICE_HIGH if queue_setup => set_high(&mut self.device, v),
            QUEUE_READY if self.queue_sel == 0 => match (v, self.queue.ready()) {
                (1, false) => return Action::QueueReady,
                (0, true) => {
                    self.queue.set_ready(false);
                    return Action::QueueStop;
                }
                _ => {}
            },
            QUEUE_NOTIFY if v == 0 => return Action::Notify,
            STATUS => return self.write_status(v),
            INTERRUPT_ACK | SHM_SEL => {}
            _ => {}
        }
        Action::None
    }

    fn write_status(&mut self, v: u32) -> Action {
        if v == 0 {
            self.reset();
            return Action::Reset;
        }
        let old = self.status;
        let new = v | (old & status::DEVICE_NEEDS_RESET);
        let set = new & !old;
        if set & status::FEATURES_OK != 0 {
            let unoffered = self.driver_features & !self.device_features;
            if unoffered != 0 || self.driver_features & (1 << F_VERSION_1) == 0 {
                // Features it was not offered, or a legacy driver: refuse
                // FEATURES_OK (it reads back clear) and flag the device.
                self.status = (new & !status::FEATURES_OK) | status::DEVICE_NEEDS_RESET;
                return Action::None;
            }
        }
        if set & status::DRIVER_OK != 0 && new & status::FEATURES_OK == 0 {
            self.status = new | status::DEVICE_NEEDS_RESET;
            return Action::None;
        }
        self.status = new;
        if set & status::DRIVER_OK != 0 {
            Action::DriverOk
        } else {
            Action::None
        }
    }
}
