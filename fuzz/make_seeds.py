#!/usr/bin/env python3
"""Write the seed corpus for the `loader` fuzz target to seeds/loader/.

Each seed is a complete, valid hvt image built by hand (no toolchain
needed): an ELF64 ET_EXEC x86-64 file with

  - a PT_LOAD R+X segment at 0x100000 holding a few bytes of code
    (optionally followed by an R and an R+W segment, or a BSS-only one),
  - a PT_NOTE with the Solo5 ABI note (ABI1: target hvt=1, version 2),
  - a PT_NOTE with the Solo5 manifest note (MFT1: version 1, entry 0
    reserved, then the declared devices).

`solo5-layout.hvt` instead copies the layout Solo5's own hvt linker script
(bindings/solo5_hvt.lds) gives a MirageOS image: see `solo5_layout()`. It is
also run end to end by tests/tests/solo5_layout.rs.

The seeds are checked in; rerun this after changing it:

    python3 fuzz/make_seeds.py
"""

import os
import struct

PAGE = 0x1000
BASE = 0x100000

PT_LOAD, PT_NOTE, PT_TLS = 1, 4, 7
PF_X, PF_W, PF_R = 1, 2, 4

NOTE_NAME = b"Solo5\0"
NT_ABI1 = 0x31494241
NT_MFT1 = 0x3154464D
MFT_RESERVED_FIRST = 1 << 30
MFT_BLOCK, MFT_NET = 1, 2
MFT_ENTRY_SIZE = 104
MFT_NAME_SIZE = 68

# The guest: hlt; jmp back to the hlt.  tt-host will run it until it
# faults or is stopped; it never reaches a hypercall, which is fine for a
# loader seed.
CODE = bytes([0xF4, 0xEB, 0xFD])


def note(ntype: int, desc: bytes) -> bytes:
    """An ELF note with the Solo5 owner; name padded to 8 (header = 20)."""
    name = NOTE_NAME.ljust(8, b"\0")
    body = struct.pack("<III", len(NOTE_NAME), len(desc), ntype) + name + desc
    return body + b"\0" * (-len(body) % 4)


def abi_note() -> bytes:
    return note(NT_ABI1, struct.pack("<IIII", 1, 2, 0, 0))


def mft_note(devices) -> bytes:
    """`devices` are (name, kind); kind "unused" is an MFT_RESERVED_FIRST entry."""
    types = {"block": MFT_BLOCK, "net": MFT_NET, "unused": MFT_RESERVED_FIRST}
    entries = [(b"", MFT_RESERVED_FIRST)] + [
        (name.encode(), types[kind]) for name, kind in devices
    ]
    mft = struct.pack("<II", 1, len(entries))
    for name, ty in entries:
        assert len(name) < MFT_NAME_SIZE
        e = name.ljust(MFT_NAME_SIZE, b"\0") + struct.pack("<I", ty)
        mft += e.ljust(MFT_ENTRY_SIZE, b"\0")
    # The descriptor starts with 4 bytes of padding so that struct mft is
    # 8-aligned (20-byte header + 4 = 24).
    return note(NT_MFT1, b"\0" * 4 + mft)


def image(devices=(), extra_segments=(), entry_off=0) -> bytes:
    """Build an image. `extra_segments` are (flags, vaddr, data, memsz)."""
    segs = [(PF_R | PF_X, BASE, CODE, len(CODE))] + list(extra_segments)
    notes = [abi_note(), mft_note(devices)]
    phnum = len(segs) + len(notes)
    ehsize, phentsize = 64, 56
    phoff = ehsize

    # File layout: headers, notes, then each loadable segment at a page
    # boundary with file offset == vaddr mod page (as linkers do).
    out = bytearray(phoff + phnum * phentsize)
    note_offs = []
    for n in notes:
        out += b"\0" * (-len(out) % 8)
        note_offs.append(len(out))
        out += n
    seg_offs = []
    for _, vaddr, data, _ in segs:
        out += b"\0" * (-len(out) % PAGE + vaddr % PAGE)
        seg_offs.append(len(out))
        out += data

    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    ehdr += struct.pack(
        "<HHIQQQIHHHHHH",
        2,  # ET_EXEC
        62,  # EM_X86_64
        1,  # EV_CURRENT
        BASE + entry_off,  # e_entry
        phoff,
        0,  # e_shoff
        0,  # e_flags
        ehsize,
        phentsize,
        phnum,
        0,
        0,
        0,
    )
    assert len(ehdr) == ehsize
    out[:ehsize] = ehdr

    phdrs = b""
    for (flags, vaddr, data, memsz), off in zip(segs, seg_offs):
        phdrs += struct.pack(
            "<IIQQQQQQ", PT_LOAD, flags, off, vaddr, vaddr, len(data), memsz, PAGE
        )
    for n, off in zip(notes, note_offs):
        phdrs += struct.pack("<IIQQQQQQ", PT_NOTE, PF_R, off, 0, 0, len(n), len(n), 8)
    out[phoff : phoff + len(phdrs)] = phdrs
    return bytes(out)


def ehdr(entry: int, phnum: int) -> bytes:
    h = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    h += struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, entry, 64, 0, 0, 64, 56, phnum, 0, 0, 0
    )
    assert len(h) == 64
    return h


def phdr(ty, flags, off, vaddr, filesz, memsz, align) -> bytes:
    return struct.pack("<IIQQQQQQ", ty, flags, off, vaddr, vaddr, filesz, memsz, align)


def solo5_layout() -> bytes:
    """An image laid out as Solo5's hvt linker script lays out MirageOS.

    - text PT_LOAD with PF_X only (FLAGS(1): execute-only, no PF_R);
    - rodata PT_LOAD (R) holding the three notes: manifest, ABI, and an
      OpenBSD note, each also in its own PT_NOTE, the OpenBSD one listed
      first among the program headers;
    - data PT_LOAD (RW), a PT_TLS, and a .bss-only PT_LOAD (RW,
      p_filesz 0);
    - a manifest with an unused entry (type MFT_RESERVED_FIRST) before the
      block device "storage", whose handle is therefore 2.

    The code reads the first 512 bytes of handle 2 into .bss and halts with
    status 40 + the BLOCK_READ result (40 if the read worked; 42, EINVAL, if
    handle 2 were not the block device). Its hypercall structs live in the
    .bss-only segment, so that must be mapped writable.
    """
    text, rodata, data, bss = BASE, BASE + 0x1000, BASE + 0x2000, BASE + 0x3000
    buf = bss + 0x1000

    def movq(addr, imm):  # mov qword [addr], imm32
        return bytes([0x48, 0xC7, 0x04, 0x25]) + struct.pack("<Ii", addr, imm)

    def hcall(nr, arg):  # mov eax, arg; mov dx, 0x500 + nr; out dx, eax
        return b"\xb8" + struct.pack("<I", arg) + b"\x66\xba" + struct.pack("<H", 0x500 + nr) + b"\xef"

    code = movq(bss, 2) + movq(bss + 8, 0) + movq(bss + 16, buf) + movq(bss + 24, 512)
    code += hcall(5, bss)  # BLOCK_READ
    code += b"\x8b\x04\x25" + struct.pack("<I", bss + 32)  # mov eax, [ret]
    code += b"\x83\xc0\x28"  # add eax, 40
    code += b"\x89\x04\x25" + struct.pack("<I", bss + 64 + 8)  # exit_status
    code += movq(bss + 64, 0)  # cookie
    code += hcall(8, bss + 64)  # HALT

    mft = mft_note([("", "unused"), ("storage", "block")])
    abi = abi_note()
    openbsd = struct.pack("<III", 8, 4, 1) + b"OpenBSD\0" + b"\0" * 4
    ro = bytearray(mft)
    ro += b"\0" * (-len(ro) % 4)
    abi_at = len(ro)
    ro += abi
    bsd_at = len(ro)
    ro += openbsd
    ro += b"rodata\0"

    phnum = 8
    out = bytearray(0x1000)
    out += code
    out += b"\0" * (-len(out) % PAGE)
    ro_off = len(out)
    out += ro
    out += b"\0" * (-len(out) % PAGE)
    data_off = len(out)
    out += b"\x01" * 16
    phdrs = b"".join(
        [
            phdr(PT_LOAD, PF_X, 0x1000, text, len(code), len(code), PAGE),
            phdr(PT_LOAD, PF_R, ro_off, rodata, len(ro), len(ro), PAGE),
            phdr(PT_LOAD, PF_R | PF_W, data_off, data, 16, 16, PAGE),
            phdr(PT_TLS, PF_R, data_off + 16, data + 16, 0, 8, 8),
            phdr(PT_LOAD, PF_R | PF_W, data_off + 16, bss, 0, 0x2000, PAGE),
            phdr(PT_NOTE, PF_R, ro_off + bsd_at, rodata + bsd_at, len(openbsd), len(openbsd), 4),
            phdr(PT_NOTE, PF_R, ro_off + abi_at, rodata + abi_at, len(abi), len(abi), 4),
            phdr(PT_NOTE, PF_R, ro_off, rodata, len(mft), len(mft), 8),
        ]
    )
    assert len(phdrs) == phnum * 56
    out[0:64] = ehdr(text, phnum)
    out[64 : 64 + len(phdrs)] = phdrs
    return bytes(out)


SEEDS = {
    # One R+X segment, no devices: the smallest image tt-host accepts.
    "minimal.hvt": image(),
    # Text, read-only data, and data + BSS, as a real unikernel has.
    "three-segments.hvt": image(
        extra_segments=[
            (PF_R, BASE + 0x1000, b"rodata\0", 7),
            (PF_R | PF_W, BASE + 0x2010, b"\x01\x02\x03\x04", 0x3000),
        ],
        entry_off=1,
    ),
    # A manifest with one block and one net device.
    "devices.hvt": image(devices=[("storage", "block"), ("service0", "net")]),
    # Solo5's own layout, with a .bss-only segment and an unused entry.
    "solo5-layout.hvt": solo5_layout(),
}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out_dir = os.path.join(here, "seeds", "loader")
    os.makedirs(out_dir, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
        print(f"{os.path.join(out_dir, name)}: {len(data)} bytes")


if __name__ == "__main__":
    main()
