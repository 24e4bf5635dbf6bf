//! Writes arbitrary bytes to a file and imports it the way `vstream vdisk
//! import` does (`open_source`, then every data extent), so the VHD reader
//! (fixed and dynamic) and the raw reader see hostile files. Neither may
//! panic; extents must be in order, not overlap, stay within the disk and
//! hold 1 to `MAX_EXTENT` bytes; a raw file's or a fixed VHD's extents must be
//! its bytes, and what they leave out zeros.
//!
//! The first input byte picks how the rest becomes a file:
//! - 0: as it is;
//! - 1: as it is, with the checksums of a footer at its end or start and of
//!   the dynamic header the footer points at made right, so that mutations
//!   get past the checksum checks;
//! - 2: a dynamic VHD built from the input: footer copy, dynamic header, BAT
//!   and blocks, with fields (size, geometry, creator, block size, BAT size
//!   and entries) taken from the input and correct checksums.
//!
//! Files that `open_source` would hand to `qemu-img` (qcow, VHDX, VMDK, VDI
//! signatures) are left out: that path runs a process and is not a parser of
//! ours.
#![no_main]
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vstream_image::formats::{open_source, MAX_EXTENT};

const SECTOR: usize = 512;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (image, fixed_sums) = match mode % 3 {
        0 => (rest.to_vec(), false),
        1 => (fix_checksums(rest.to_vec()), true),
        _ => (dynamic_vhd(rest), true),
    };
    if for_qemu_img(&image) {
        return;
    }
    let (file, path) = scratch();
    file.set_len(0).expect("truncate the scratch file");
    file.write_all_at(&image, 0)
        .expect("write the scratch file");

    let mut source = match open_source(&path, Path::new("/nonexistent")) {
        Ok(s) => s,
        Err(e) => {
            // An error names the file; that is all it must do here.
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let size = source.virtual_size();
    let format = source.format_name();
    assert!(
        matches!(format, "raw" | "vhd-fixed" | "vhd-dynamic"),
        "{format} (checksums fixed: {fixed_sums})"
    );
    if format == "raw" {
        assert_eq!(size, image.len() as u64);
    }
    let mut buf = Vec::new();
    let mut end = 0u64;
    loop {
        let offset = match source.next_extent(&mut buf) {
            Ok(Some(offset)) => offset,
            Ok(None) => break,
            Err(e) => {
                assert!(!e.to_string().is_empty());
                return;
            }
        };
        assert!(
            offset >= end,
            "extent at {offset} before the end of the last, {end}"
        );
        assert!(
            !buf.is_empty() && buf.len() <= MAX_EXTENT,
            "{} bytes",
            buf.len()
        );
        let extent_end = offset + buf.len() as u64;
        assert!(
            extent_end <= size,
            "extent to {extent_end} past the {size}-byte disk"
        );
        if format != "vhd-dynamic" {
            // Raw data: the extent is the file's bytes there, and what lies
            // between extents is zeros.
            let (o, e) = (offset as usize, extent_end as usize);
            assert_eq!(&buf[..], &image[o..e]);
            assert!(image[end as usize..o].iter().all(|&b| b == 0));
        }
        end = extent_end;
    }
    if format != "vhd-dynamic" {
        assert!(image[end as usize..size as usize].iter().all(|&b| b == 0));
    }
});

/// An anonymous scratch file (no name, gone when the process ends) and a
/// path that opens it.
fn scratch() -> &'static (File, PathBuf) {
    static SCRATCH: OnceLock<(File, PathBuf)> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let file = tempfile::tempfile().expect("a scratch file");
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        (file, path)
    })
}

/// Whether `open_source` would convert the file with `qemu-img`.
fn for_qemu_img(image: &[u8]) -> bool {
    const SIGNATURES: [&[u8]; 5] = [
        b"QFI\xfb",
        b"vhdxfile",
        b"KDMV",
        b"COWD",
        b"# Disk DescriptorFile",
    ];
    SIGNATURES.iter().any(|s| image.starts_with(s))
        || image.get(64..68) == Some(&[0x7f, 0x10, 0xda, 0xbe])
}

/// The VHD checksum of `b`: one's complement of the byte sum, without the
/// 4 bytes at `at`, which it is then written to.
fn set_checksum(b: &mut [u8], at: usize) {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(at..at + 4).contains(i))
        .fold(0u32, |acc, (_, &x)| acc.wrapping_add(u32::from(x)));
    b[at..at + 4].copy_from_slice(&(!sum).to_be_bytes());
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Mode 1: correct checksums where a footer and a dynamic header are.
fn fix_checksums(mut image: Vec<u8>) -> Vec<u8> {
    let len = image.len();
    let mut header_at = None;
    for at in [len.saturating_sub(SECTOR), 0] {
        if len >= SECTOR && image[at..].starts_with(b"conectix") {
            set_checksum(&mut image[at..at + SECTOR], 64);
            header_at = header_at.or(Some(be64(&image[at + 16..])));
        }
    }
    if let Some(at) = header_at.and_then(|a| usize::try_from(a).ok()) {
        if at.checked_add(1024).is_some_and(|e| e <= len) && image[at..].starts_with(b"cxsparse") {
            set_checksum(&mut image[at..at + 1024], 36);
        }
    }
    image
}

/// Takes bytes off the front of the input, zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes())
    }
}

/// Mode 2: a dynamic VHD whose fields come from `input`.
fn dynamic_vhd(input: &[u8]) -> Vec<u8> {
    let mut input = Input(input);
    let creators: [&[u8; 4]; 4] = [b"win ", b"qem2", b"vpc ", b"vstr"];
    let creator = creators[usize::from(input.u8() % 4)];
    let sectors = u64::from(input.u16());
    let (cylinders, heads, spt) = (input.u16() % 64, input.u8() % 17, input.u8() % 64);
    let disk_type: u32 = match input.u8() {
        0 => 2,
        1 => 4,
        2 => 7,
        _ => 3,
    };
    let block_size = 1u32 << (9 + input.u8() % 10);
    let entries = input.u8();
    let bat_at = 1536u64;

    let mut footer = [0u8; SECTOR];
    footer[..8].copy_from_slice(b"conectix");
    footer[16..24].copy_from_slice(&512u64.to_be_bytes());
    footer[28..32].copy_from_slice(creator);
    footer[48..56].copy_from_slice(&(sectors * 512).to_be_bytes());
    footer[56..58].copy_from_slice(&cylinders.to_be_bytes());
    footer[58] = heads;
    footer[59] = spt;
    footer[60..64].copy_from_slice(&disk_type.to_be_bytes());
    set_checksum(&mut footer, 64);

    let mut header = [0u8; 1024];
    header[..8].copy_from_slice(b"cxsparse");
    header[16..24].copy_from_slice(&bat_at.to_be_bytes());
    header[28..32].copy_from_slice(&u32::from(entries).to_be_bytes());
    header[32..36].copy_from_slice(&block_size.to_be_bytes());
    set_checksum(&mut header, 36);

    let mut image = Vec::new();
    image.extend_from_slice(&footer);
    image.extend_from_slice(&header);
    // BAT entries: unallocated, or a sector just after the table (where the
    // input's remaining bytes go), or any value.
    let data_sector = (bat_at as usize + usize::from(entries) * 4).div_ceil(SECTOR) as u32;
    for _ in 0..entries {
        let entry = match input.u8() % 4 {
            0 | 1 => u32::MAX,
            2 => data_sector + u32::from(input.u8()),
            _ => u32::from_be_bytes(input.bytes()),
        };
        image.extend_from_slice(&entry.to_be_bytes());
    }
    image.resize(data_sector as usize * SECTOR, 0xff);
    image.extend_from_slice(input.0);
    image.extend_from_slice(&footer);
    image
}
