#!/usr/bin/env python3
"""Write the seed corpus for the `loader` fuzz target to seeds/loader/.

Each seed is a complete, valid hvt image built by hand (no toolchain
needed): an ELF64 ET_EXEC x86-64 file with

  - a PT_LOAD R+X segment at 0x100000 holding a few bytes of code
    (optionally followed by an R and an R+W segment, or a BSS-only one),
  - a PT_NOTE with the Solo5 ABI note (ABI1: target hvt=1, version 2),
  - a PT_NOTE with the Solo5 manifest note (MFT1: version 1, entry 0
    reserved, then the declared devices).

The seeds are checked in; rerun this after changing it:

    python3 fuzz/make_seeds.py
"""

import os
import struct

PAGE = 0x1000
BASE = 0x100000

PT_LOAD, PT_NOTE = 1, 4
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
    entries = [(b"", MFT_RESERVED_FIRST)] + [
        (name.encode(), MFT_BLOCK if kind == "block" else MFT_NET)
        for name, kind in devices
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
