//! VHD (Microsoft Virtual Hard Disk Image Format 1.0), read and written
//! natively.
//!
//! A VHD ends in a 512-byte *footer* (cookie `conectix`, big-endian fields,
//! a checksum that is the one's complement of the byte sum). A *fixed* VHD is
//! the raw disk followed by the footer. A *dynamic* VHD starts with a copy of
//! the footer, then a 1024-byte *dynamic header* (`cxsparse`) pointing at the
//! *block allocation table* (BAT): one big-endian `u32` per block, the
//! block's file offset in 512-byte sectors or `0xFFFFFFFF` when unallocated.
//! An allocated block is a sector bitmap (bit set = sector holds data, most
//! significant bit first) padded to whole sectors, then the block's data.
//!
//! The disk size follows qemu's rules, so an import matches what
//! `qemu-img convert` makes of the same file: Virtual PC and old qemu images
//! are as large as their CHS geometry; Hyper-V, Disk2vhd, XenServer and new
//! qemu images as their `current_size` field.
//!
//! The writer produces dynamic VHDs with 2 MiB blocks and creator `vstr`.
//! Their size is rounded up to a whole CHS geometry (as `qemu-img convert`
//! does), so that readers which go by the geometry and readers which go by
//! `current_size` agree; only disks beyond the largest geometry (~127 GiB)
//! keep their exact size, which qemu then reads from `current_size` too.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::raw::{self, io_context};
use super::scan::{Regions, Scanned, Scanner};
use super::{check_extent, for_each_nonzero_run, is_zero, FormatError, ImageWriter, SourceImage};

/// The footer's first 8 bytes.
pub(crate) const COOKIE: &[u8; 8] = b"conectix";
const DYN_COOKIE: &[u8; 8] = b"cxsparse";
const FOOTER_LEN: usize = 512;
const DYN_HEADER_LEN: usize = 1024;
const SECTOR: u64 = 512;
const UNALLOCATED: u32 = 0xFFFF_FFFF;

const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const TYPE_DIFFERENCING: u32 = 4;

/// The largest disk qemu accepts, and the spec's limit: 2040 GiB.
pub(crate) const MAX_SIZE: u64 = 0xFF00_0000 * SECTOR;
/// Sectors of the largest CHS geometry, 65535 × 16 × 255.
const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;
/// Block sizes accepted on import: 512 B to 256 MiB (the bitmap of a block
/// is then at most 64 KiB).
const MAX_BLOCK_SIZE: u64 = 256 << 20;
/// At most this many BAT entries (64 MiB of table) are read.
const MAX_BAT_ENTRIES: u64 = 1 << 24;

/// Block size of the VHDs this module writes.
const WRITE_BLOCK_SIZE: u64 = 2 << 20;
/// Where the writer puts the dynamic header and the BAT.
const WRITE_DYN_HEADER_OFFSET: u64 = 512;
const WRITE_BAT_OFFSET: u64 = 1536;
/// Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00 UTC).
const VHD_EPOCH: u64 = 946_684_800;

/// If `tail` (the last up to 512 bytes of a file) ends in a VHD footer, its
/// length: 512, or 511 for the images some old tools wrote, whose footer
/// lacks its last (reserved, zero) byte.
pub(crate) fn footer_in_tail(tail: &[u8]) -> Option<usize> {
    if tail.len() >= FOOTER_LEN && tail[tail.len() - FOOTER_LEN..].starts_with(COOKIE) {
        Some(FOOTER_LEN)
    } else if tail.len() >= FOOTER_LEN - 1
        && tail[tail.len() - (FOOTER_LEN - 1)..].starts_with(COOKIE)
    {
        Some(FOOTER_LEN - 1)
    } else {
        None
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// One's complement of the byte sum of `b`, skipping the 4-byte checksum
/// field at `checksum_at`.
fn checksum(b: &[u8], checksum_at: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(checksum_at..checksum_at + 4).contains(i))
        .fold(0u32, |acc, (_, &x)| acc.wrapping_add(u32::from(x)));
    !sum
}

/// The footer fields this module uses.
#[derive(Debug, Clone)]
struct Footer {
    data_offset: u64,
    creator_app: [u8; 4],
    current_size: u64,
    cylinders: u16,
    heads: u8,
    sectors_per_track: u8,
    disk_type: u32,
}

impl Footer {
    /// Parses a 512-byte (or 511-byte) footer, checking cookie and checksum.
    fn parse(b: &[u8], path: &Path, what: &'static str) -> Result<Footer, FormatError> {
        if b.len() < FOOTER_LEN - 1 || !b.starts_with(COOKIE) {
            return Err(invalid(path, format!("no {what} (cookie \"conectix\")")));
        }
        let stored = be32(b, 64);
        let computed = checksum(b, 64);
        if stored != computed {
            return Err(FormatError::VhdChecksum {
                path: path.to_owned(),
                what,
                stored,
                computed,
            });
        }
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&b[28..32]);
        Ok(Footer {
            data_offset: be64(b, 16),
            creator_app,
            current_size: be64(b, 48),
            cylinders: u16::from_be_bytes([b[56], b[57]]),
            heads: b[58],
            sectors_per_track: b[59],
            disk_type: be32(b, 60),
        })
    }

    /// The disk size in bytes, decided as qemu decides it.
    fn disk_size(&self) -> u64 {
        let chs =
            u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track);
        let by_current_size = matches!(
            &self.creator_app,
            b"win " | b"qem2" | b"d2v " | b"CTXS" | b"tap\0"
        );
        if by_current_size || chs == MAX_CHS_SECTORS {
            self.current_size / SECTOR * SECTOR
        } else {
            chs * SECTOR
        }
    }
}

fn invalid(path: &Path, reason: String) -> FormatError {
    FormatError::InvalidVhd {
        path: path.to_owned(),
        reason,
    }
}

fn read_error(path: &Path, offset: u64) -> impl FnOnce(io::Error) -> FormatError + '_ {
    move |source| FormatError::Read {
        path: path.to_owned(),
        offset,
        source,
    }
}

/// Opens a file [`super::detect`] found a VHD footer in (at its start, its
/// end or both).
pub(crate) fn open(
    file: File,
    path: &Path,
    file_len: u64,
) -> Result<Box<dyn SourceImage>, FormatError> {
    let mut head = [0u8; FOOTER_LEN];
    let head_len = super::read_up_to(&file, 0, &mut head).map_err(read_error(path, 0))?;
    let mut tail = [0u8; FOOTER_LEN];
    let tail_start = file_len.saturating_sub(FOOTER_LEN as u64);
    let tail_len =
        super::read_up_to(&file, tail_start, &mut tail).map_err(read_error(path, tail_start))?;
    let tail = &tail[..tail_len];

    // The footer at the end is authoritative; a dynamic VHD also has a copy
    // at the start, which must be intact too (qemu reads that one). A fixed
    // VHD has no copy: its first sector is disk content.
    let end_footer = match footer_in_tail(tail) {
        Some(n) => Some((Footer::parse(&tail[tail.len() - n..], path, "footer")?, n)),
        None => None,
    };
    let end_is_fixed = matches!(&end_footer, Some((f, _)) if f.disk_type == TYPE_FIXED);
    let head_footer = if !end_is_fixed && head_len == FOOTER_LEN && head.starts_with(COOKIE) {
        Some(Footer::parse(&head, path, "footer copy")?)
    } else {
        None
    };
    let (footer, footer_len) = match (end_footer, head_footer) {
        (Some((f, n)), _) => (f, n as u64),
        (None, Some(f)) => {
            tracing::warn!(
                path = %path.display(),
                "VHD has no footer at its end, only the copy at its start (truncated?)"
            );
            (f, 0)
        }
        (None, None) => return Err(invalid(path, "no footer found".into())),
    };

    let size = footer.disk_size();
    if size > MAX_SIZE {
        return Err(invalid(
            path,
            format!("it claims a size of {size} bytes, more than the VHD limit of {MAX_SIZE}"),
        ));
    }
    match footer.disk_type {
        TYPE_FIXED => {
            if footer_len == 0 {
                return Err(invalid(
                    path,
                    "it is a fixed VHD without a footer at its end (truncated?)".into(),
                ));
            }
            let data_len = file_len - footer_len;
            if size > data_len {
                return Err(invalid(
                    path,
                    format!(
                        "its footer gives a size of {size} bytes but the file holds only \
                         {data_len} bytes of data (truncated?)"
                    ),
                ));
            }
            Ok(Box::new(raw::open(file, path, size, "vhd-fixed")))
        }
        TYPE_DYNAMIC => Ok(Box::new(open_dynamic(file, path, file_len, &footer, size)?)),
        TYPE_DIFFERENCING => Err(FormatError::DifferencingVhd {
            path: path.to_owned(),
        }),
        t => Err(invalid(path, format!("unknown disk type {t}"))),
    }
}

fn open_dynamic(
    file: File,
    path: &Path,
    file_len: u64,
    footer: &Footer,
    size: u64,
) -> Result<Scanned<DynamicRegions>, FormatError> {
    let hdr_off = footer.data_offset;
    if hdr_off
        .checked_add(DYN_HEADER_LEN as u64)
        .is_none_or(|end| end > file_len)
    {
        return Err(invalid(
            path,
            format!(
                "its dynamic header offset {hdr_off} lies past the end of the {file_len}-byte file"
            ),
        ));
    }
    let mut hdr = [0u8; DYN_HEADER_LEN];
    file.read_exact_at(&mut hdr, hdr_off)
        .map_err(read_error(path, hdr_off))?;
    if !hdr.starts_with(DYN_COOKIE) {
        return Err(invalid(
            path,
            format!("no dynamic header (cookie \"cxsparse\") at offset {hdr_off}"),
        ));
    }
    let stored = be32(&hdr, 36);
    let computed = checksum(&hdr, 36);
    if stored != computed {
        return Err(FormatError::VhdChecksum {
            path: path.to_owned(),
            what: "dynamic header",
            stored,
            computed,
        });
    }
    let bat_off = be64(&hdr, 16);
    let max_entries = u64::from(be32(&hdr, 28));
    let block_size = u64::from(be32(&hdr, 32));
    if !block_size.is_power_of_two() || !(SECTOR..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(invalid(
            path,
            format!(
                "its block size {block_size} is not a power of two from {SECTOR} to {MAX_BLOCK_SIZE}"
            ),
        ));
    }
    let blocks = size.div_ceil(block_size);
    if max_entries < blocks {
        return Err(invalid(
            path,
            format!("its BAT has {max_entries} entries but a {size}-byte disk needs {blocks}"),
        ));
    }
    if blocks > MAX_BAT_ENTRIES {
        return Err(invalid(
            path,
            format!("it needs {blocks} BAT entries, more than the supported {MAX_BAT_ENTRIES}"),
        ));
    }
    let bat_len = blocks * 4;
    if bat_off
        .checked_add(bat_len)
        .is_none_or(|end| end > file_len)
    {
        return Err(invalid(
            path,
            format!(
                "its BAT ({bat_len} bytes at offset {bat_off}) extends past the end of the \
                 {file_len}-byte file"
            ),
        ));
    }
    let mut bat_bytes = vec![0u8; bat_len as usize];
    file.read_exact_at(&mut bat_bytes, bat_off)
        .map_err(read_error(path, bat_off))?;
    let bat: Vec<u32> = bat_bytes
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    drop(bat_bytes);

    let bitmap_size = (block_size / SECTOR).div_ceil(8).div_ceil(SECTOR) * SECTOR;
    for (i, &entry) in bat.iter().enumerate() {
        if entry == UNALLOCATED {
            continue;
        }
        let start = u64::from(entry) * SECTOR;
        let end = start + bitmap_size + block_size;
        if end > file_len {
            return Err(invalid(
                path,
                format!(
                    "BAT entry {i} puts block {i} at bytes {start}..{end}, past the end of the \
                     {file_len}-byte file (truncated?)"
                ),
            ));
        }
    }

    Ok(Scanned {
        regions: DynamicRegions {
            file,
            path: path.to_owned(),
            size,
            block_size,
            bitmap_size,
            bat,
            bitmap: Vec::new(),
            bitmap_block: None,
        },
        scanner: Scanner::default(),
        size,
        name: "vhd-dynamic",
        _keep: None,
    })
}

/// The allocated sectors of a dynamic VHD, as regions.
pub(crate) struct DynamicRegions {
    file: File,
    path: PathBuf,
    size: u64,
    block_size: u64,
    bitmap_size: u64,
    bat: Vec<u32>,
    /// The sector bitmap of block `bitmap_block`.
    bitmap: Vec<u8>,
    bitmap_block: Option<usize>,
}

impl DynamicRegions {
    fn load_bitmap(&mut self, block: usize, entry: u32) -> io::Result<()> {
        if self.bitmap_block == Some(block) {
            return Ok(());
        }
        let off = u64::from(entry) * SECTOR;
        self.bitmap.resize(self.bitmap_size as usize, 0);
        self.bitmap_block = None;
        self.file
            .read_exact_at(&mut self.bitmap, off)
            .map_err(|e| io_context(&self.path, off, e))?;
        self.bitmap_block = Some(block);
        Ok(())
    }

    fn sector_present(&self, sector: u64) -> bool {
        let byte = self.bitmap[(sector / 8) as usize];
        byte & (0x80 >> (sector % 8)) != 0
    }
}

impl Regions for DynamicRegions {
    fn next_region(&mut self, from: u64) -> io::Result<Option<(u64, u64)>> {
        let mut pos = from;
        while pos < self.size {
            let block = (pos / self.block_size) as usize;
            let block_start = block as u64 * self.block_size;
            let block_end = (block_start + self.block_size).min(self.size);
            let entry = self.bat[block];
            if entry == UNALLOCATED {
                pos = block_end;
                continue;
            }
            self.load_bitmap(block, entry)?;
            let sectors = (block_end - block_start).div_ceil(SECTOR);
            let mut s = (pos - block_start) / SECTOR;
            while s < sectors && !self.sector_present(s) {
                s += 1;
            }
            if s == sectors {
                pos = block_end;
                continue;
            }
            let mut e = s + 1;
            while e < sectors && self.sector_present(e) {
                e += 1;
            }
            let start = (block_start + s * SECTOR).max(pos);
            let end = (block_start + e * SECTOR).min(block_end);
            return Ok(Some((start, end)));
        }
        Ok(None)
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let block = (offset / self.block_size) as usize;
        let within = offset % self.block_size;
        debug_assert!(within + buf.len() as u64 <= self.block_size);
        let entry = self.bat[block];
        let file_off = u64::from(entry) * SECTOR + self.bitmap_size + within;
        self.file
            .read_exact_at(buf, file_off)
            .map_err(|e| io_context(&self.path, file_off, e))
    }
}

/// The VHD spec's CHS geometry for a disk of `total_sectors` sectors
/// (appendix "CHS Calculation"): `(cylinders, heads, sectors per track)`.
pub(crate) fn chs_geometry(total_sectors: u64) -> (u16, u8, u8) {
    let total = total_sectors.min(MAX_CHS_SECTORS);
    let (spt, heads, cyl_times_heads);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cyl_times_heads = total / spt;
    } else {
        let mut s = 17;
        let mut cth = total / s;
        let mut h = cth.div_ceil(1024).max(4);
        if cth >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            cth = total / s;
        }
        if cth >= h * 1024 {
            s = 63;
            h = 16;
            cth = total / s;
        }
        spt = s;
        heads = h;
        cyl_times_heads = cth;
    }
    // All three fit their fields: spt <= 255, heads <= 16, and
    // cylinders <= MAX_CHS_SECTORS / (16 * 255) = 65535 in the
    // 255-sector case (and < 1024 * 16 / heads otherwise).
    let cylinders = (cyl_times_heads / heads).min(65535);
    (cylinders as u16, heads as u8, spt as u8)
}

/// The size in sectors a VHD of at least `size` bytes gets, and its
/// geometry: the smallest spec geometry covering the disk, and that
/// geometry's exact size; beyond the largest geometry, the size in sectors
/// (rounded up) with the largest geometry.
pub(crate) fn vhd_size_and_geometry(size: u64) -> (u64, (u16, u8, u8)) {
    let sectors = size.div_ceil(SECTOR);
    if sectors >= MAX_CHS_SECTORS {
        return (sectors, (65535, 16, 255));
    }
    let product = |g: (u16, u8, u8)| u64::from(g.0) * u64::from(g.1) * u64::from(g.2);
    // The geometry's size grows in steps of at most 16 × 255 sectors, so
    // this ends within a few thousand tries; the bound is only a backstop.
    for extra in 0..(1u64 << 20) {
        let g = chs_geometry(sectors + extra);
        if product(g) >= sectors {
            return (product(g), g);
        }
    }
    (sectors, (65535, 16, 255))
}

/// Writes a dynamic VHD; see the module docs.
pub(crate) struct VhdWriter {
    file: File,
    path: PathBuf,
    /// Size given by the caller; extents must lie within it.
    requested: u64,
    /// The VHD's virtual size (rounded up to the geometry).
    size: u64,
    footer: [u8; FOOTER_LEN],
    bat: Vec<u32>,
    /// Where the next block will go.
    next_free: u64,
    /// The block being written, its file offset and sector bitmap.
    current: Option<(usize, u64)>,
    bitmap: Vec<u8>,
    next_min: u64,
}

impl VhdWriter {
    pub(crate) fn create(path: &Path, requested: u64) -> Result<Self, FormatError> {
        if requested > MAX_SIZE {
            return Err(FormatError::TooLargeForVhd {
                path: path.to_owned(),
                size: requested,
                max: MAX_SIZE,
            });
        }
        let (sectors, (cyl, heads, spt)) = vhd_size_and_geometry(requested);
        let size = sectors * SECTOR;
        let blocks = size.div_ceil(WRITE_BLOCK_SIZE);

        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let timestamp = now.as_secs().saturating_sub(VHD_EPOCH) as u32;
        let mut id_hasher = blake3::Hasher::new();
        id_hasher.update(&now.as_nanos().to_le_bytes());
        id_hasher.update(&std::process::id().to_le_bytes());
        id_hasher.update(path.as_os_str().as_encoded_bytes());
        let unique_id = id_hasher.finalize();

        let mut f = [0u8; FOOTER_LEN];
        f[0..8].copy_from_slice(COOKIE);
        f[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: reserved bit
        f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // format 1.0
        f[16..24].copy_from_slice(&WRITE_DYN_HEADER_OFFSET.to_be_bytes());
        f[24..28].copy_from_slice(&timestamp.to_be_bytes());
        f[28..32].copy_from_slice(b"vstr");
        f[32..36].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // creator version
        f[36..40].copy_from_slice(b"Wi2k"); // creator host OS
        f[40..48].copy_from_slice(&size.to_be_bytes()); // original size
        f[48..56].copy_from_slice(&size.to_be_bytes()); // current size
        f[56..58].copy_from_slice(&cyl.to_be_bytes());
        f[58] = heads;
        f[59] = spt;
        f[60..64].copy_from_slice(&TYPE_DYNAMIC.to_be_bytes());
        f[68..84].copy_from_slice(&unique_id.as_bytes()[..16]);
        let sum = checksum(&f, 64);
        f[64..68].copy_from_slice(&sum.to_be_bytes());

        let mut h = [0u8; DYN_HEADER_LEN];
        h[0..8].copy_from_slice(DYN_COOKIE);
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes()); // data offset: unused
        h[16..24].copy_from_slice(&WRITE_BAT_OFFSET.to_be_bytes());
        h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        h[28..32].copy_from_slice(&(blocks as u32).to_be_bytes());
        h[32..36].copy_from_slice(&(WRITE_BLOCK_SIZE as u32).to_be_bytes());
        let sum = checksum(&h, 36);
        h[36..40].copy_from_slice(&sum.to_be_bytes());

        let create = |source| FormatError::Create {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(create)?;
        file.write_all_at(&f, 0).map_err(create)?;
        file.write_all_at(&h, WRITE_DYN_HEADER_OFFSET)
            .map_err(create)?;

        let bat_end = WRITE_BAT_OFFSET + (blocks * 4).div_ceil(SECTOR) * SECTOR;
        Ok(VhdWriter {
            file,
            path: path.to_owned(),
            requested,
            size,
            footer: f,
            bat: vec![UNALLOCATED; blocks as usize],
            next_free: bat_end,
            current: None,
            bitmap: vec![0u8; SECTOR as usize],
            next_min: 0,
        })
    }

    fn write_err(&self) -> impl FnOnce(io::Error) -> FormatError + '_ {
        move |source| FormatError::Write {
            path: self.path.clone(),
            source,
        }
    }

    /// Writes the current block's bitmap, if any.
    fn flush_bitmap(&mut self) -> io::Result<()> {
        if let Some((_, at)) = self.current.take() {
            self.file.write_all_at(&self.bitmap, at)?;
        }
        Ok(())
    }

    /// Stores a non-zero run that lies within one block.
    fn write_run(&mut self, offset: u64, run: &[u8]) -> io::Result<()> {
        let block = (offset / WRITE_BLOCK_SIZE) as usize;
        let at = match self.current {
            Some((b, at)) if b == block => at,
            _ => {
                self.flush_bitmap()?;
                // Put the block's data on a 4 KiB boundary of the file.
                let at = (self.next_free + SECTOR).div_ceil(4096) * 4096 - SECTOR;
                self.next_free = at + SECTOR + WRITE_BLOCK_SIZE;
                self.bat[block] = (at / SECTOR) as u32;
                self.bitmap.fill(0);
                self.current = Some((block, at));
                at
            }
        };
        let within = offset % WRITE_BLOCK_SIZE;
        self.file.write_all_at(run, at + SECTOR + within)?;
        let first = within / SECTOR;
        let last = (within + run.len() as u64).div_ceil(SECTOR);
        for s in first..last {
            self.bitmap[(s / 8) as usize] |= 0x80 >> (s % 8);
        }
        Ok(())
    }
}

impl ImageWriter for VhdWriter {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn write_extent(&mut self, offset: u64, data: &[u8]) -> Result<(), FormatError> {
        let end = check_extent(
            &self.path,
            offset,
            data.len(),
            self.next_min,
            self.requested,
        )?;
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let block_end = (pos / WRITE_BLOCK_SIZE + 1) * WRITE_BLOCK_SIZE;
            let n = ((block_end - pos) as usize).min(data.len() - done);
            let piece = &data[done..done + n];
            if !is_zero(piece) {
                let r = for_each_nonzero_run(pos, piece, 4096, |o, run| self.write_run(o, run));
                r.map_err(self.write_err())?;
            }
            done += n;
        }
        self.next_min = end;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<(), FormatError> {
        let r = self.flush_bitmap();
        r.map_err(self.write_err())?;
        // The table, padded to whole sectors with unallocated entries.
        let padded_len = (self.bat.len() * 4).div_ceil(SECTOR as usize) * SECTOR as usize;
        let mut bat = Vec::with_capacity(padded_len);
        for e in &self.bat {
            bat.extend_from_slice(&e.to_be_bytes());
        }
        bat.resize(padded_len, 0xFF);
        let footer_at = self.next_free;
        let file = &self.file;
        let r = file
            .write_all_at(&bat, WRITE_BAT_OFFSET)
            .and_then(|()| file.write_all_at(&self.footer, footer_at))
            .and_then(|()| file.set_len(footer_at + FOOTER_LEN as u64))
            .and_then(|()| file.sync_all());
        r.map_err(self.write_err())
    }
}
