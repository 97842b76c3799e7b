//! Every ABI struct's size, alignment and field offsets, checked against
//! the layouts Solo5 defines in `include/hvt_abi.h`, `include/mft_abi.h`
//! and `include/elf_abi.h` (github.com/Solo5/solo5) for x86-64 (LP64:
//! `size_t` and pointers 8 bytes, `int` and enums 4, `bool` 1). The
//! expected numbers are written out here, not computed, so that moving or
//! resizing a field fails this test instead of silently changing the ABI.

use crate::*;
use core::mem::{align_of, offset_of, size_of};

/// Assert `size_of::<$ty>() == $size` and each `offset_of!($ty, field)`.
macro_rules! check_layout {
    ($ty:ty, size $size:expr, align $align:expr, { $($field:ident @ $off:expr),* $(,)? }) => {{
        assert_eq!(size_of::<$ty>(), $size, "size of {}", stringify!($ty));
        assert_eq!(align_of::<$ty>(), $align, "alignment of {}", stringify!($ty));
        $(
            assert_eq!(
                offset_of!($ty, $field),
                $off,
                "offset of {}.{}",
                stringify!($ty),
                stringify!($field)
            );
        )*
    }};
}

#[test]
fn boot_info_matches_hvt_abi_h() {
    // struct hvt_boot_info: five 8-byte fields.
    check_layout!(BootInfo, size 40, align 8, {
        mem_size @ 0, kernel_end @ 8, cpu_cycle_freq @ 16, cmdline @ 24, mft @ 32,
    });
}

#[test]
fn hypercall_argument_structs_match_hvt_abi_h() {
    check_layout!(HcWalltime, size 8, align 8, { nsecs @ 0 });
    check_layout!(HcPuts, size 16, align 8, { data @ 0, len @ 8 });
    // struct hvt_hc_poll: the int ret at 16, 4 bytes of tail padding.
    check_layout!(HcPoll, size 24, align 8, {
        timeout_nsecs @ 0, ready_set @ 8, ret @ 16, _pad @ 20,
    });
    check_layout!(HcBlockWrite, size 40, align 8, {
        handle @ 0, offset @ 8, data @ 16, len @ 24, ret @ 32, _pad @ 36,
    });
    check_layout!(HcBlockRead, size 40, align 8, {
        handle @ 0, offset @ 8, data @ 16, len @ 24, ret @ 32, _pad @ 36,
    });
    check_layout!(HcNetWrite, size 32, align 8, {
        handle @ 0, data @ 8, len @ 16, ret @ 24, _pad @ 28,
    });
    check_layout!(HcNetRead, size 32, align 8, {
        handle @ 0, data @ 8, len @ 16, ret @ 24, _pad @ 28,
    });
    check_layout!(HcHalt, size 16, align 8, { cookie @ 0, exit_status @ 8, _pad @ 12 });
}

#[test]
fn hypercall_numbers_and_constants_match_hvt_abi_h() {
    // enum hvt_hypercall: WALLTIME = 1 .. HALT = 8, 0 reserved.
    let expect = [
        (Hypercall::Walltime, 1),
        (Hypercall::Puts, 2),
        (Hypercall::Poll, 3),
        (Hypercall::BlockWrite, 4),
        (Hypercall::BlockRead, 5),
        (Hypercall::NetWrite, 6),
        (Hypercall::NetRead, 7),
        (Hypercall::Halt, 8),
    ];
    for (call, nr) in expect {
        assert_eq!(call.nr(), nr);
        assert_eq!(call.port(), 0x500 + nr);
        assert_eq!(Hypercall::from_port(0x500 + nr), Some(call));
        assert_eq!(Hypercall::from_nr(nr), Some(call));
    }
    assert_eq!(Hypercall::ALL.map(|c| c.nr()), [1, 2, 3, 4, 5, 6, 7, 8]);
    for port in [0, 0x4ff, 0x500, 0x509, 0xffff] {
        assert_eq!(Hypercall::from_port(port), None, "port {port:#x}");
    }
    assert_eq!(ABI_VERSION, 2);
    assert_eq!(GUEST_MIN_BASE, 0x10_0000);
    assert_eq!(CMDLINE_SIZE, 8192);
    assert_eq!(HALT_COOKIE_MAX, 512);
}

#[test]
fn notes_match_elf_abi_h_and_mft_abi_h() {
    // struct abi1_nhdr / mft1_nhdr: three u32 and the name padded to 8.
    check_layout!(NoteHeader, size 20, align 4, {
        n_namesz @ 0, n_descsz @ 4, n_type @ 8, n_name @ 12,
    });
    check_layout!(Abi1Info, size 16, align 4, {
        abi_target @ 0, abi_version @ 4, reserved0 @ 8, reserved1 @ 12,
    });
    assert_eq!(&NOTE_TYPE_ABI1.to_le_bytes(), b"ABI1");
    assert_eq!(&NOTE_TYPE_MFT1.to_le_bytes(), b"MFT1");
    // offsetof(struct abi1_note, i) is 20: no padding after the header;
    // offsetof(struct mft1_note, m) is 24: 4 bytes to MFT1_NOTE_ALIGN (8).
    assert_eq!(ABI1_NOTE_ALIGN, 4);
    assert_eq!(MFT_NOTE_ALIGN, 8);
    assert_eq!(MFT_NOTE_PAD, 4);
    // MFT1_NOTE_MAX_SIZE: (sizeof(struct mft1_note) - sizeof(struct
    // mft1_nhdr)) + 64 * sizeof(struct mft_entry) = (32 - 20) + 64 * 104.
    assert_eq!(MFT_NOTE_MAX_DESC, 12 + 64 * 104);
}

#[test]
fn manifest_matches_mft_abi_h() {
    // struct mft: version, entries, then e[] at 8.
    check_layout!(MftHeader, size 8, align 4, { version @ 0, entries @ 4 });
    // struct mft_block_basic: u64 then u16, 6 bytes of tail padding.
    check_layout!(MftBlockBasic, size 16, align 8, { capacity @ 0, block_size @ 8, _pad @ 10 });
    check_layout!(MftNetBasic, size 8, align 2, { mac @ 0, mtu @ 6 });
    // tt-host's own (no Solo5 counterpart): fits the 16-byte union.
    check_layout!(MftVirtio, size 16, align 8, { mmio_base @ 0, mmio_size @ 8, queue_max @ 12 });
    // The union u: its largest member, mft_block_basic.
    assert_eq!((size_of::<MftProps>(), align_of::<MftProps>()), (16, 8));
    // struct mft_entry: name[68], type at 68, u at 72, b (int or pointer)
    // at 88, bool attached at 96, 7 bytes of tail padding.
    check_layout!(MftEntry, size 104, align 8, {
        name @ 0, ty @ 68, props @ 72, backing @ 88, attached @ 96, _pad @ 97,
    });
    assert_eq!((MFT_VERSION, MFT_MAX_ENTRIES, MFT_NAME_SIZE), (1, 64, 68));
    assert_eq!(
        (MFT_DEV_BLOCK_BASIC, MFT_DEV_NET_BASIC, MFT_RESERVED_FIRST),
        (1, 2, 1 << 30)
    );
}

#[test]
fn device_properties_share_the_union_bytes() {
    let b = MftProps::from_block_basic(MftBlockBasic {
        capacity: 0x0102_0304_0506_0708,
        block_size: 512,
        _pad: [0; 6],
    });
    let raw = b.to_bytes();
    assert_eq!(raw[..8], 0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(raw[8..10], 512u16.to_le_bytes());
    let n = MftProps::from_net_basic(MftNetBasic {
        mac: [2, 0, 0, 0, 0, 1],
        mtu: 1500,
    });
    let raw = n.to_bytes();
    assert_eq!(raw[..6], [2, 0, 0, 0, 0, 1]);
    assert_eq!(raw[6..8], 1500u16.to_le_bytes());
    assert_eq!(raw[8..], [0; 8]);
    assert_eq!(MftProps::from_bytes(raw).net_basic().mtu, 1500);
}

#[cfg(feature = "vm-memory")]
#[test]
fn byte_valued_views_cover_whole_structs_in_le_order() {
    use vm_memory::ByteValued;
    let mut a = HcBlockRead {
        handle: 1,
        len: 4096,
        ret: ret::EINVAL,
        ..Default::default()
    };
    assert_eq!(a.as_slice().len(), 40);
    assert_eq!(a.as_slice()[24..32], 4096u64.to_le_bytes());
    assert_eq!(a.as_slice()[32..36], ret::EINVAL.to_le_bytes());
    a.as_mut_slice()[24..32].copy_from_slice(&7u64.to_le_bytes());
    assert_eq!(a.len, 7);
    let mut e = MftEntry::reserved_first();
    e.props = MftProps::from_net_basic(MftNetBasic {
        mac: [2, 0, 0, 0, 0, 9],
        mtu: 1500,
    });
    assert_eq!(e.as_slice()[68..72], MFT_RESERVED_FIRST.to_le_bytes());
    assert_eq!(e.as_slice()[72..80], [2, 0, 0, 0, 0, 9, 0xdc, 0x05]);
}
