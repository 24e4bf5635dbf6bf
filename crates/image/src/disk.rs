//! A disk as a device sees it: a stack of layers, bottom first, where each
//! chunk is read from the topmost layer that holds it, and writes (if any) go to
//! the top layer.
//!
//! ```text
//!   top (writable: the vDisk itself in Private mode, a write cache in Standard)
//!   ...
//!   base                      unallocated everywhere -> reads as zeros
//! ```
//!
//! A partial write to a chunk the top layer lacks copies the rest of that chunk
//! up from below first, under a per-chunk lock, so the top layer always holds
//! whole chunks.

use std::io;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::WriteError;
use crate::layer::{next_allocated, Layer, CHUNK, PAGE_CHUNKS};

/// One `base:allocation` extent: its length and whether it reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub zero: bool,
}

/// Which of the bottom `covers` layers of a chain holds each chunk: one byte
/// per chunk (0: none, i+1: layer i). Built once from the sealed layers'
/// bitmaps, so a read through a long chain costs one lookup, not a walk.
/// Only the spans of [`PAGE_CHUNKS`] chunks where some layer holds a chunk
/// have bytes, side by side in one allocation: its memory follows the data,
/// not the virtual size, and a lookup is still one load in one array.
#[derive(Debug)]
pub struct ChainIndex {
    /// Per span: where its bytes start in `owners`, or `NO_SPAN`.
    spans: Vec<u32>,
    owners: Vec<u8>,
    chunks: u64,
    covers: usize,
}

const NO_SPAN: u32 = u32::MAX;

impl ChainIndex {
    /// Indexes `layers`, which must be sealed (their bitmaps no longer change).
    /// `None` if there are too many layers for a byte.
    pub fn build(layers: &[Arc<Layer>]) -> Option<ChainIndex> {
        let first = layers.first()?;
        if layers.len() > 254 {
            return None;
        }
        let chunks = first.chunks();
        let mut spans = vec![NO_SPAN; chunks.div_ceil(PAGE_CHUNKS) as usize];
        let mut used = 0u32;
        for (s, slot) in spans.iter_mut().enumerate() {
            let first = s as u64 * PAGE_CHUNKS;
            if layers
                .iter()
                .any(|l| l.any_allocated(first, first + PAGE_CHUNKS))
            {
                *slot = used;
                used += 1;
            }
        }
        let mut owners = vec![0u8; used as usize * PAGE_CHUNKS as usize];
        for (i, layer) in layers.iter().enumerate() {
            layer.for_each_allocated(|c| {
                let span = spans[(c / PAGE_CHUNKS) as usize];
                if span != NO_SPAN {
                    let at = span as usize * PAGE_CHUNKS as usize + (c % PAGE_CHUNKS) as usize;
                    owners[at] = i as u8 + 1;
                }
            });
        }
        Some(ChainIndex {
            spans,
            owners,
            chunks,
            covers: layers.len(),
        })
    }

    #[inline]
    fn owner(&self, chunk: u64) -> Option<usize> {
        let span = self.spans[(chunk / PAGE_CHUNKS) as usize];
        if span == NO_SPAN {
            return None;
        }
        match self.owners[span as usize * PAGE_CHUNKS as usize + (chunk % PAGE_CHUNKS) as usize] {
            0 => None,
            n => Some(n as usize - 1),
        }
    }
}

/// What [`Disk::read_local`] managed.
#[derive(Debug, PartialEq, Eq)]
pub enum LocalRead {
    /// Every byte is in the buffer.
    Done,
    /// These runs (offset, length) are the lower disk's and still unwritten;
    /// every other byte is in the buffer.
    Missing(Vec<(u64, u64)>),
    /// With `nowait`: a layer's data is not in the page cache; read it all
    /// again where blocking is allowed.
    WouldBlock,
}

/// A stack of layers seen as one block device.
#[derive(Debug)]
pub struct Disk {
    layers: Vec<Arc<Layer>>,
    /// A lower disk lies under the bottom layer: a chunk no layer holds is
    /// its, not zeros, and the caller reads it (see [`Disk::read_local`]).
    lower: bool,
    /// Owners of the bottom layers, if indexed.
    index: Option<Arc<ChainIndex>>,
    writable: bool,
    /// Most bytes the top layer may hold, for write caches.
    limit: Option<u64>,
    /// Chunks promised to in-flight writes against `limit`.
    reserved: AtomicU64,
    /// Where new chunks go once the top layer is full (a RAM cache that
    /// overflows to disk): the same stack without the top, the overflow
    /// layer on top of it, with its own limit.
    spill: Option<Box<Disk>>,
    /// Virtual size in bytes.
    size: u64,
}

impl Disk {
    /// A read-only view of `layers` (bottom first).
    pub fn read_only(layers: Vec<Arc<Layer>>) -> Disk {
        let layers_size = layers.first().map_or(0, |l| l.size());
        Disk {
            layers,
            lower: false,
            index: None,
            writable: false,
            limit: None,
            reserved: AtomicU64::new(0),
            spill: None,
            size: layers_size,
        }
    }

    /// A view whose top layer takes the writes, holding at most `limit` bytes.
    pub fn writable(layers: Vec<Arc<Layer>>, limit: Option<u64>) -> Result<Disk, WriteError> {
        match layers.last() {
            Some(top) if top.is_writable() && !top.is_sealed() => {}
            _ => return Err(WriteError::ReadOnly),
        }
        Ok(Disk {
            size: layers[0].size(),
            layers,
            lower: false,
            index: None,
            writable: true,
            limit,
            reserved: AtomicU64::new(0),
            spill: None,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn is_writable(&self) -> bool {
        self.writable
    }
    pub fn layers(&self) -> &[Arc<Layer>] {
        &self.layers
    }
    /// Bytes held by the writable top layer (the write cache, in Standard mode).
    pub fn top_bytes(&self) -> u64 {
        self.layers.last().map_or(0, |l| l.allocated_bytes())
    }

    /// Puts a lower disk under the bottom layer: chunks no layer holds are
    /// its, read by the caller ([`Disk::read_local`]), not zeros. A write
    /// that covers such a chunk in part must bring the rest of it.
    pub fn over_lower(mut self) -> Disk {
        if let Some(spill) = self.spill.as_mut() {
            spill.lower = true;
        }
        self.lower = true;
        self
    }

    /// A write cache in two tiers: new chunks go to `top` while it holds
    /// less than `top_limit`, then to `overflow` (up to `overflow_limit`).
    /// A chunk is written where it already is, so reads (topmost layer
    /// first) always see its newest data.
    pub fn with_overflow(
        lower: Vec<Arc<Layer>>,
        overflow: Arc<Layer>,
        overflow_limit: u64,
        top: Arc<Layer>,
        top_limit: u64,
    ) -> Result<Disk, WriteError> {
        let mut spill_layers = lower.clone();
        spill_layers.push(overflow.clone());
        let spill = Disk::writable(spill_layers, Some(overflow_limit))?;
        let mut layers = lower;
        layers.push(overflow);
        layers.push(top);
        let mut disk = Disk::writable(layers, Some(top_limit))?;
        disk.spill = Some(Box::new(spill));
        Ok(disk)
    }

    /// Bytes held by the overflow tier, if there is one.
    pub fn overflow_bytes(&self) -> Option<u64> {
        self.spill.as_ref().map(|s| s.top_bytes())
    }

    /// Uses `index` for the bottom layers it covers (they must be these
    /// layers, sealed).
    pub fn with_index(mut self, index: Arc<ChainIndex>) -> Disk {
        if index.covers <= self.layers.len() && index.chunks == self.size.div_ceil(CHUNK) {
            self.index = Some(index);
        }
        self
    }

    /// Index of the layer that holds `chunk` among `layers[..below]`, if any.
    #[inline]
    fn owner(&self, chunk: u64, below: usize) -> Option<usize> {
        match &self.index {
            Some(idx) if below >= idx.covers => (idx.covers..below)
                .rev()
                .find(|&i| self.layers[i].is_allocated(chunk))
                .or_else(|| idx.owner(chunk)),
            _ => (0..below)
                .rev()
                .find(|&i| self.layers[i].is_allocated(chunk)),
        }
    }

    /// Index of the topmost layer among `layers[..below]` that holds any
    /// chunk of hash block `block`, if any.
    pub fn block_owner(&self, block: u64, below: usize) -> Option<usize> {
        let per = crate::layer::HASH_BLOCK / CHUNK;
        let last = ((block + 1) * per).min(self.size.div_ceil(CHUNK));
        (block * per..last)
            .filter_map(|c| self.owner(c, below))
            .max()
    }

    /// Whether a layer of this disk, or its overflow tier, holds `chunk`: a
    /// write to part of it needs nothing from below.
    pub fn holds(&self, chunk: u64) -> bool {
        self.owner(chunk, self.layers.len()).is_some()
            || self.spill.as_ref().is_some_and(|s| s.holds(chunk))
    }

    /// Whether `[offset, offset+len)` lies inside the disk.
    pub fn in_range(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.size())
    }

    /// Reads `buf.len()` bytes at `offset`. With `nowait`, returns `Ok(false)`
    /// rather than block on a page-cache miss; the caller retries on a thread
    /// that may block.
    pub fn read(&self, buf: &mut [u8], offset: u64, nowait: bool) -> io::Result<bool> {
        self.read_uninit(as_uninit(buf), offset, nowait)
    }

    /// Like [`Disk::read`], into memory that need not be initialised: on
    /// `Ok(true)` every byte of `buf` has been written.
    pub fn read_uninit(
        &self,
        buf: &mut [MaybeUninit<u8>],
        offset: u64,
        nowait: bool,
    ) -> io::Result<bool> {
        self.read_below(buf, offset, self.layers.len(), nowait)
    }

    fn read_below(
        &self,
        buf: &mut [MaybeUninit<u8>],
        offset: u64,
        below: usize,
        nowait: bool,
    ) -> io::Result<bool> {
        if !self.in_range(offset, buf.len() as u64) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read past the end of the disk",
            ));
        }
        let end = offset + buf.len() as u64;
        for (pos, run_end, owner) in self.runs(offset, end, below) {
            let slice = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            match owner {
                Some(i) => {
                    if !self.layers[i].read_data(slice, pos, nowait)? {
                        return Ok(false);
                    }
                }
                None if self.lower && nowait => return Ok(false),
                None if self.lower => {
                    return Err(io::Error::other(
                        "a run of the lower disk: its reader reads it (Disk::read_local)",
                    ))
                }
                None => slice.fill(MaybeUninit::new(0)),
            }
        }
        Ok(true)
    }

    /// Splits `[offset, end)` into runs of chunks that share one owner among
    /// `layers[..below]`: `(start, end, owner)`, each read in one call.
    fn runs(
        &self,
        offset: u64,
        end: u64,
        below: usize,
    ) -> impl Iterator<Item = (u64, u64, Option<usize>)> + '_ {
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let chunk = pos / CHUNK;
            let owner = self.owner(chunk, below);
            let mut run_end = ((chunk + 1) * CHUNK).min(end);
            while run_end < end && self.owner(run_end / CHUNK, below) == owner {
                run_end = (run_end + CHUNK).min(end);
            }
            let run = (pos, run_end, owner);
            pos = run_end;
            Some(run)
        })
    }

    /// The layer that holds every byte of `[offset, offset + len)`, if one
    /// layer that this disk never writes does (any layer under a write
    /// cache, sealed or not, or any layer of a read-only view): a caller may
    /// send those bytes from the file ([`Layer::data_file`]) rather than read
    /// them. `None` when the range spans layers, holes or the lower disk, or
    /// lies in a layer this disk writes (a write cache and its overflow
    /// tier, a Private vDisk's top).
    ///
    /// A layer this disk does not write may still be written through another
    /// disk (the unsealed version of a vDisk in Private mode): its bytes may
    /// change while they are on their way from the file, as they may while
    /// they are being read; a read and a write that overlap have no order, on
    /// either path.
    pub fn read_only_span(&self, offset: u64, len: u64) -> Option<&Arc<Layer>> {
        if len == 0 || !self.in_range(offset, len) {
            return None;
        }
        let end = offset + len;
        let (_, run_end, owner) = self.runs(offset, end, self.layers.len()).next()?;
        let owner = owner?;
        (run_end == end && owner < self.first_written()).then(|| &self.layers[owner])
    }

    /// Whether every byte of `[offset, offset + len)` that the layers hold
    /// is in the page cache ([`Layer::is_cached`]); holes need no page.
    /// `false` for a run of a lower disk, past the end, or where the kernel
    /// cannot tell.
    pub fn is_cached(&self, offset: u64, len: u64) -> bool {
        if !self.in_range(offset, len) {
            return false;
        }
        self.runs(offset, offset + len, self.layers.len())
            .all(|(pos, end, owner)| match owner {
                Some(i) => self.layers[i].is_cached(pos, end - pos),
                None => !self.lower,
            })
    }

    /// Index of the lowest layer this disk writes: its top, and the overflow
    /// tier under the top if it has one; every layer's count for a read-only
    /// view.
    fn first_written(&self) -> usize {
        let n = self.layers.len();
        match (self.writable, self.spill.is_some()) {
            (false, _) => n,
            (true, false) => n.saturating_sub(1),
            (true, true) => n.saturating_sub(2),
        }
    }

    /// Reads what the layers hold of `[offset, offset + buf.len())`, and
    /// leaves the runs that belong to the lower disk unwritten: the caller
    /// fetches those (asynchronously) and fills them in. With `nowait`, answers
    /// [`LocalRead::WouldBlock`] rather than wait on a page-cache miss.
    pub fn read_local(
        &self,
        buf: &mut [MaybeUninit<u8>],
        offset: u64,
        nowait: bool,
    ) -> io::Result<LocalRead> {
        if !self.in_range(offset, buf.len() as u64) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read past the end of the disk",
            ));
        }
        let end = offset + buf.len() as u64;
        let mut missing = Vec::new();
        for (pos, run_end, owner) in self.runs(offset, end, self.layers.len()) {
            let slice = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            match owner {
                Some(i) => {
                    if !self.layers[i].read_data(slice, pos, nowait)? {
                        return Ok(LocalRead::WouldBlock);
                    }
                }
                None if self.lower => missing.push((pos, run_end - pos)),
                None => slice.fill(MaybeUninit::new(0)),
            }
        }
        Ok(if missing.is_empty() {
            LocalRead::Done
        } else {
            LocalRead::Missing(missing)
        })
    }

    /// Writes `data` at `offset`; with `fua`, it is durable on return.
    pub fn write(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), WriteError> {
        match self.write_top(data, offset, fua) {
            Err(WriteError::CacheFull { .. }) if self.spill.is_some() => {
                self.write_spilled(data, offset, fua)
            }
            other => other,
        }
    }

    /// The top tier is full: each run of chunks goes where it already is,
    /// and new ones to the overflow tier.
    fn write_spilled(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), WriteError> {
        let (Some(spill), Some(top)) = (self.spill.as_deref(), self.layers.last()) else {
            return Err(WriteError::ReadOnly);
        };
        let end = offset + data.len() as u64;
        let mut pos = offset;
        while pos < end {
            let in_top = top.is_allocated(pos / CHUNK);
            let mut run_end = ((pos / CHUNK + 1) * CHUNK).min(end);
            while run_end < end && top.is_allocated(run_end / CHUNK) == in_top {
                run_end = ((run_end / CHUNK + 1) * CHUNK).min(end);
            }
            if in_top {
                let piece = &data[(pos - offset) as usize..(run_end - offset) as usize];
                self.write_top(piece, pos, false)?;
                pos = run_end;
                continue;
            }
            // New chunks: into the top tier while they fit, then the rest
            // of the run to the overflow tier.
            while pos < run_end {
                let next = ((pos / CHUNK + 1) * CHUNK).min(run_end);
                let piece = &data[(pos - offset) as usize..(next - offset) as usize];
                match self.write_top(piece, pos, false) {
                    Ok(()) => pos = next,
                    Err(WriteError::CacheFull { .. }) => {
                        let rest = &data[(pos - offset) as usize..(run_end - offset) as usize];
                        spill.write(rest, pos, false)?;
                        pos = run_end;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_top(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), WriteError> {
        let top = self.top_for_write(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let _writing = top.begin_write()?;
        let end = offset + data.len() as u64;
        let first = offset / CHUNK;
        let last = end.div_ceil(CHUNK);
        let _reservation = self.reserve(top, first, last)?;
        let mut pos = offset;
        while pos < end {
            let chunk = pos / CHUNK;
            let chunk_start = chunk * CHUNK;
            let chunk_end = (chunk_start + CHUNK).min(self.size());
            let piece_end = chunk_end.min(end);
            let piece = &data[(pos - offset) as usize..(piece_end - offset) as usize];
            let whole = pos == chunk_start && piece_end == chunk_end;
            if whole || top.is_allocated(chunk) {
                // Write the longest run of such chunks in one call.
                let mut run_end = piece_end;
                while run_end < end {
                    let c = run_end / CHUNK;
                    let c_end = ((c + 1) * CHUNK).min(self.size());
                    if c_end <= end || top.is_allocated(c) {
                        run_end = c_end.min(end);
                    } else {
                        break;
                    }
                }
                top.write_data(
                    &data[(pos - offset) as usize..(run_end - offset) as usize],
                    pos,
                )?;
                top.set_allocated(chunk, run_end.div_ceil(CHUNK));
                pos = run_end;
                continue;
            }
            self.copy_up(top, chunk, pos, piece)?;
            pos = piece_end;
        }
        if fua {
            top.flush()?;
        }
        Ok(())
    }

    /// Writes one partial chunk into a top layer that does not hold it yet.
    fn copy_up(&self, top: &Layer, chunk: u64, pos: u64, piece: &[u8]) -> Result<(), WriteError> {
        let _lock = top.copy_up_lock(chunk);
        if top.is_allocated(chunk) {
            // Someone copied it up while we waited.
            return Ok(top.write_data(piece, pos)?);
        }
        let chunk_start = chunk * CHUNK;
        let chunk_len = CHUNK.min(self.size() - chunk_start) as usize;
        let mut full = vec![0u8; chunk_len];
        self.read_below(
            as_uninit(&mut full),
            chunk_start,
            self.layers.len() - 1,
            false,
        )?;
        let at = (pos - chunk_start) as usize;
        full[at..at + piece.len()].copy_from_slice(piece);
        top.write_data(&full, chunk_start)?;
        top.set_allocated(chunk, chunk + 1);
        Ok(())
    }

    /// Zeroes `[offset, offset+len)`. With `punch`, whole chunks become holes
    /// in the file; without it (NBD's NO_HOLE), zeros are written out.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        punch: bool,
    ) -> Result<(), WriteError> {
        // With an overflow tier, zeros are written out: `write` puts each
        // chunk in the right tier.
        if punch && self.spill.is_none() {
            return self.zero_or_trim(offset, len, fua, false);
        }
        self.top_for_write(offset, len)?;
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64);
            self.write(&zeros[..n as usize], pos, false)?;
            pos += n;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Discards `[offset, offset+len)`: whole chunks of the top layer give their
    /// space back; what a later read returns there is zeros or the older data.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), WriteError> {
        self.zero_or_trim(offset, len, fua, true)
    }

    fn zero_or_trim(&self, offset: u64, len: u64, fua: bool, trim: bool) -> Result<(), WriteError> {
        let top = self.top_for_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _writing = top.begin_write()?;
        let end = offset + len;
        let whole_first = offset.div_ceil(CHUNK);
        let whole_last = if end == self.size() {
            end.div_ceil(CHUNK)
        } else {
            end / CHUNK
        };
        if whole_first >= whole_last {
            if !trim {
                self.write(&vec![0u8; len as usize], offset, fua)?;
            }
            return Ok(());
        }
        // Edges that do not cover whole chunks.
        if !trim {
            let head = whole_first * CHUNK;
            if offset < head {
                self.write(&vec![0u8; (head - offset) as usize], offset, false)?;
            }
            let tail = (whole_last * CHUNK).min(self.size());
            if tail < end {
                self.write(&vec![0u8; (end - tail) as usize], tail, false)?;
            }
        }
        let start = whole_first * CHUNK;
        let stop = (whole_last * CHUNK).min(self.size());
        let bottom = self.layers.len() == 1 && !self.lower;
        if bottom {
            // Nothing below: an unallocated chunk already reads as zeros.
            top.punch_data(start, stop - start)?;
            top.clear_allocated(whole_first, whole_last);
        } else if trim {
            // Hide nothing, free what the top holds.
            let mut c = whole_first;
            while c < whole_last {
                if top.is_allocated(c) {
                    let mut e = c + 1;
                    while e < whole_last && top.is_allocated(e) {
                        e += 1;
                    }
                    top.punch_data(c * CHUNK, (e * CHUNK).min(self.size()) - c * CHUNK)?;
                    c = e;
                } else {
                    c += 1;
                }
            }
        } else {
            // Zeros must hide the layers below: allocate the chunks as holes.
            let _reservation = self.reserve(top, whole_first, whole_last)?;
            top.punch_data(start, stop - start)?;
            top.set_allocated(whole_first, whole_last);
        }
        if fua {
            top.flush()?;
        }
        Ok(())
    }

    fn top_for_write(&self, offset: u64, len: u64) -> Result<&Layer, WriteError> {
        if !self.writable {
            return Err(WriteError::ReadOnly);
        }
        if !self.in_range(offset, len) {
            return Err(WriteError::OutOfRange);
        }
        if self.layers.last().is_some_and(|l| l.is_sealed()) {
            // Sealed under this disk (a promote): the version is immutable now.
            return Err(WriteError::ReadOnly);
        }
        self.layers
            .last()
            .map(|l| l.as_ref())
            .ok_or(WriteError::ReadOnly)
    }

    /// Reserves room in the top layer for chunks `[first, last)` not yet there.
    fn reserve<'a>(
        &'a self,
        top: &Layer,
        first: u64,
        last: u64,
    ) -> Result<Reservation<'a>, WriteError> {
        let Some(limit) = self.limit else {
            return Ok(Reservation {
                disk: self,
                chunks: 0,
            });
        };
        let needed = (first..last).filter(|&c| !top.is_allocated(c)).count() as u64;
        if needed == 0 {
            return Ok(Reservation {
                disk: self,
                chunks: 0,
            });
        }
        let limit_chunks = limit / CHUNK;
        let mut reserved = self.reserved.load(Ordering::Acquire);
        loop {
            if top.allocated_chunks() + reserved + needed > limit_chunks {
                return Err(WriteError::CacheFull { limit });
            }
            match self.reserved.compare_exchange(
                reserved,
                reserved + needed,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(Reservation {
                        disk: self,
                        chunks: needed,
                    })
                }
                Err(now) => reserved = now,
            }
        }
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> io::Result<()> {
        if let Some(spill) = &self.spill {
            spill.flush()?;
        }
        match self.layers.last() {
            Some(top) if self.writable => top.flush(),
            _ => Ok(()),
        }
    }

    /// Whether [`Disk::flush`] now would have nothing to do.
    pub fn is_flushed(&self) -> bool {
        self.spill.as_ref().is_none_or(|s| s.is_flushed())
            && match self.layers.last() {
                Some(top) if self.writable => top.is_flushed(),
                _ => true,
            }
    }

    /// Allocation of `[offset, offset+len)`, at most `max_extents` extents.
    pub fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> Vec<Extent> {
        let end = offset.saturating_add(len).min(self.size());
        if self.lower {
            // Over a lower disk every byte is data: its own or the lower's.
            return (offset < end)
                .then_some(Extent {
                    length: end - offset,
                    zero: false,
                })
                .into_iter()
                .collect();
        }
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max_extents.max(1) {
            let unowned = |c: u64| self.owner(c, self.layers.len()).is_none();
            let zero = unowned(pos / CHUNK);
            let mut next = ((pos / CHUNK + 1) * CHUNK).min(end);
            if zero {
                // A hole runs to the next chunk a layer holds.
                let held = next_allocated(&self.layers, next / CHUNK, end.div_ceil(CHUNK));
                next = next.max((held * CHUNK).min(end));
            } else {
                while next < end && !unowned(next / CHUNK) {
                    next = (next + CHUNK).min(end);
                }
            }
            out.push(Extent {
                length: next - pos,
                zero,
            });
            pos = next;
        }
        out
    }
}

/// Views initialised bytes as possibly-uninitialised ones, for the readers
/// above (the reverse direction would be unsound; this one is not).
pub fn as_uninit(buf: &mut [u8]) -> &mut [MaybeUninit<u8>] {
    // SAFETY: same layout; callers only ever write initialised bytes into it.
    unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) }
}

/// Chunks promised to one write; released when the write is done (its bits set).
struct Reservation<'a> {
    disk: &'a Disk,
    chunks: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.chunks > 0 {
            self.disk.reserved.fetch_sub(self.chunks, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn layer(dir: &std::path::Path, name: &str, size: u64) -> Arc<Layer> {
        Arc::new(Layer::create(&dir.join(name), size).unwrap())
    }

    /// A read lies in one layer's file only where that layer holds every
    /// chunk of it, nothing above does, and the disk does not write it; the
    /// file position is the data's.
    #[test]
    fn a_read_only_span_is_one_layer_the_disk_does_not_write() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1 << 20;
        let base = layer(dir.path(), "base", size);
        let base_disk = Disk::writable(vec![base.clone()], None).unwrap();
        base_disk.write(&vec![7u8; 512 << 10], 0, false).unwrap();
        base_disk.flush().unwrap();
        // Written by this disk: no.
        assert!(base_disk.read_only_span(0, 64 << 10).is_none());
        // A read-only view of it: yes.
        let view = Disk::read_only(vec![base.clone()]);
        assert!(view.read_only_span(0, 64 << 10).is_some());
        drop(base_disk);
        // Under a write cache, the unsealed base is not written by this disk
        // (as a Standard vDisk's first version is not): yes.
        let cache = layer(dir.path(), "unsealed-cache", size);
        let over = Disk::writable(vec![base.clone(), cache.clone()], None).unwrap();
        assert!(!base.is_sealed());
        assert_eq!(
            over.read_only_span(0, 64 << 10).map(|l| l.path()),
            Some(base.path())
        );
        // A cache that overflows: neither tier is sent from its file.
        let (top, overflow) = (
            layer(dir.path(), "top", size),
            layer(dir.path(), "overflow", size),
        );
        let tiers = Disk::with_overflow(
            vec![base.clone()],
            overflow.clone(),
            size,
            top.clone(),
            4096,
        )
        .unwrap();
        tiers.write(&[3u8; 4096], 0, false).unwrap();
        tiers.write(&[4u8; 8192], 64 << 10, false).unwrap();
        assert!(
            overflow.is_allocated((64 << 10) / CHUNK),
            "the second write overflowed"
        );
        assert!(tiers.read_only_span(0, 4096).is_none(), "the top tier");
        assert!(
            tiers.read_only_span(64 << 10, 8192).is_none(),
            "the overflow tier"
        );
        assert_eq!(
            tiers.read_only_span(128 << 10, 64 << 10).map(|l| l.path()),
            Some(base.path())
        );
        let base_disk = Disk::writable(vec![base.clone()], None).unwrap();
        let hashes = crate::hash::hash_disk(&base_disk).unwrap();
        base.store_hashes(&hashes, true).unwrap();
        drop(base_disk);
        let cache = layer(dir.path(), "cache", size);
        let disk = Disk::writable(vec![base.clone(), cache.clone()], None).unwrap();
        disk.write(&[1u8; 100], 200 << 10, false).unwrap();
        let span = |off: u64, len: u64| disk.read_only_span(off, len).map(|l| l.path().to_owned());
        assert_eq!(span(0, 128 << 10), Some(base.path().to_owned()));
        assert_eq!(span(4096 + 3, 100_000), Some(base.path().to_owned()));
        assert_eq!(span(128 << 10, 100 << 10), None, "over the cache's chunk");
        assert_eq!(span(200 << 10, 100), None, "in the cache (written here)");
        assert_eq!(span(480 << 10, 64 << 10), None, "into a hole");
        assert_eq!(span(600 << 10, 4096), None, "a hole");
        assert_eq!(span(size - 4096, 8192), None, "past the end");
        assert_eq!(span(0, 0), None);
        // The file holds the data where it says.
        let (fd, pos) = base.data_file(4096 + 3);
        let mut b = [0u8; 16];
        let file = std::fs::File::from(fd.try_clone_to_owned().unwrap());
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut b, pos).unwrap();
        assert_eq!(b, [7u8; 16]);
        assert!(base.is_cached(4096 + 3, 100_000), "just written: cached");
        // Through the disk: its layers' pages, and holes that need none.
        assert!(disk.is_cached(4096 + 3, 100_000));
        assert!(disk.is_cached(600 << 10, 4096), "a hole");
        assert!(!disk.is_cached(size - 4096, 8192), "past the end");
        file.sync_all().unwrap(); // clean pages, which the kernel may drop
        crate::residency::drop_cached(std::os::unix::io::AsRawFd::as_raw_fd(&file));
        let fresh = Disk::read_only(vec![Arc::new(Layer::open(base.path(), false).unwrap())]);
        assert!(!fresh.is_cached(4096 + 3, 100_000), "evicted");
        assert!(fresh.is_cached(600 << 10, 4096), "still a hole");
    }

    /// Random writes, zeroes and trims through a two-layer disk agree with a
    /// flat model, and the base underneath never changes.
    #[test]
    fn random_ops_match_a_flat_model() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1 << 20;
        let base = layer(dir.path(), "base", size);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut model = vec![0u8; size as usize];
        let base_disk = Disk::writable(vec![base.clone()], None).unwrap();
        for _ in 0..50 {
            let off = rng.gen_range(0..size - 70_000);
            let len = rng.gen_range(1..70_000usize);
            let fill: u8 = rng.gen();
            base_disk.write(&vec![fill; len], off, false).unwrap();
            model[off as usize..off as usize + len].fill(fill);
        }
        let base_image = model.clone();
        let cache = layer(dir.path(), "cache", size);
        let disk = Disk::writable(vec![base.clone(), cache], None).unwrap();
        for i in 0..300 {
            let off = rng.gen_range(0..size - 70_000);
            let len = rng.gen_range(1..70_000u64);
            match i % 4 {
                0 | 1 => {
                    let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    disk.write(&data, off, false).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                2 => {
                    disk.write_zeroes(off, len, false, i % 8 != 2).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                _ => disk.flush().unwrap(),
            }
            let mut got = vec![0u8; len as usize];
            disk.read(&mut got, off, false).unwrap();
            assert_eq!(got, &model[off as usize..(off + len) as usize], "step {i}");
        }
        let mut all = vec![0u8; size as usize];
        disk.read(&mut all, 0, false).unwrap();
        assert!(all == model);
        let mut b = vec![0u8; size as usize];
        Disk::read_only(vec![base]).read(&mut b, 0, false).unwrap();
        assert!(b == base_image, "base changed under its write cache");
    }

    /// A RAM tier that overflows to a disk tier: writes go where their chunk
    /// already is, new chunks to the disk tier once RAM is full, and the
    /// whole reads like a flat model until both are full.
    #[test]
    fn an_overflowing_cache_reads_like_a_flat_model() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1 << 20;
        let base = layer(dir.path(), "base", size);
        Disk::writable(vec![base.clone()], None)
            .unwrap()
            .write(&vec![9u8; size as usize], 0, false)
            .unwrap();
        let mut model = vec![9u8; size as usize];
        let (ram, spill) = (
            layer(dir.path(), "ram", size),
            layer(dir.path(), "spill", size),
        );
        let disk = Disk::with_overflow(
            vec![base.clone()],
            spill.clone(),
            64 * CHUNK,
            ram.clone(),
            16 * CHUNK,
        )
        .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for i in 0..200 {
            let off = rng.gen_range(0..size / 4 - 9000);
            let len = rng.gen_range(1..9000u64);
            if i % 5 == 4 {
                disk.write_zeroes(off, len, false, true).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            } else {
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                match disk.write(&data, off, false) {
                    Ok(()) => model[off as usize..(off + len) as usize].copy_from_slice(&data),
                    Err(WriteError::CacheFull { .. }) => continue,
                    Err(e) => panic!("step {i}: {e}"),
                }
            }
            let mut got = vec![0u8; len as usize];
            disk.read(&mut got, off, false).unwrap();
            assert_eq!(got, &model[off as usize..(off + len) as usize], "step {i}");
        }
        assert_eq!(ram.allocated_chunks(), 16, "RAM fills first");
        assert!(spill.allocated_chunks() > 0 && spill.allocated_chunks() <= 64);
        assert_eq!(disk.overflow_bytes(), Some(spill.allocated_bytes()));
        let mut all = vec![0u8; size as usize];
        disk.read(&mut all, 0, false).unwrap();
        assert!(all == model);
        // New chunks until both tiers are full; then a write is refused,
        // and nothing else changes.
        let mut c = size / CHUNK - 1;
        let err = loop {
            match disk.write(&[1u8; 4096], c * CHUNK, false) {
                Ok(()) => model[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize].fill(1),
                Err(e) => break e,
            }
            c -= 1;
        };
        assert!(matches!(err, WriteError::CacheFull { .. }), "{err}");
        assert_eq!((ram.allocated_chunks(), spill.allocated_chunks()), (16, 64));
        disk.read(&mut all, 0, false).unwrap();
        assert!(all == model);
        let mut b = vec![0u8; size as usize];
        Disk::read_only(vec![base]).read(&mut b, 0, false).unwrap();
        assert!(
            b.iter().all(|&x| x == 9),
            "base changed under its write cache"
        );
    }

    /// A chain read through its index reads exactly what a walk reads,
    /// with and without a writable layer on top.
    #[test]
    fn indexed_chain_reads_like_a_walk() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1 << 20;
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut layers = Vec::new();
        for i in 0..5 {
            let l = layer(dir.path(), &format!("l{i}"), size);
            let d = Disk::writable(vec![l.clone()], None).unwrap();
            for _ in 0..20 {
                let off = rng.gen_range(0..size - 9000);
                d.write(&vec![i as u8 + 1; rng.gen_range(1..9000)], off, false)
                    .unwrap();
            }
            layers.push(l);
        }
        let index = Arc::new(ChainIndex::build(&layers).unwrap());
        let walk = Disk::read_only(layers.clone());
        let fast = Disk::read_only(layers.clone()).with_index(index.clone());
        let (mut a, mut b) = (vec![0u8; size as usize], vec![1u8; size as usize]);
        walk.read(&mut a, 0, false).unwrap();
        fast.read(&mut b, 0, false).unwrap();
        assert!(a == b);
        assert_eq!(
            walk.block_status(0, size, 1 << 20),
            fast.block_status(0, size, 1 << 20)
        );
        let mut stack = layers.clone();
        stack.push(layer(dir.path(), "top", size));
        let top = Disk::writable(stack, None).unwrap().with_index(index);
        top.write(&[0xee; 3], 4095, false).unwrap();
        a[4095..4098].fill(0xee);
        top.read(&mut b, 0, false).unwrap();
        assert!(a == b, "copy-up through the index lost data");
    }

    #[test]
    fn cache_limit_gives_cache_full_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let base = layer(dir.path(), "base", 1 << 20);
        let cache = layer(dir.path(), "cache", 1 << 20);
        let disk = Disk::writable(vec![base, cache], Some(8 * CHUNK)).unwrap();
        disk.write(&[1u8; 8 * 4096], 0, false).unwrap();
        let err = disk.write(&[2u8; 4096], 64 * 4096, false).unwrap_err();
        assert!(matches!(err, WriteError::CacheFull { .. }), "{err}");
        // Overwriting what the cache holds still works.
        disk.write(&[3u8; 100], 10, false).unwrap();
        let mut b = [0u8; 4096];
        disk.read(&mut b, 0, false).unwrap();
        assert_eq!(&b[..10], &[1u8; 10]);
        assert_eq!(&b[10..110], &[3u8; 100]);
        disk.read(&mut b, 64 * 4096, false).unwrap();
        assert_eq!(b, [0u8; 4096]);
    }

    #[test]
    fn out_of_range_and_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let base = layer(dir.path(), "base", 1 << 20);
        let ro = Disk::read_only(vec![base.clone()]);
        assert!(matches!(
            ro.write(&[1], 0, false),
            Err(WriteError::ReadOnly)
        ));
        let rw = Disk::writable(vec![base], None).unwrap();
        assert!(matches!(
            rw.write(&[1, 2], (1 << 20) - 1, false),
            Err(WriteError::OutOfRange)
        ));
        let mut b = [0u8; 2];
        assert!(rw.read(&mut b, (1 << 20) - 1, false).is_err());
        assert!(rw.read(&mut b, u64::MAX, false).is_err());
    }

    #[test]
    fn block_status_reports_holes() {
        let dir = tempfile::tempdir().unwrap();
        let base = layer(dir.path(), "base", 1 << 20);
        let disk = Disk::writable(vec![base], None).unwrap();
        disk.write(&[1u8; 8192], 16384, false).unwrap();
        let ext = disk.block_status(0, 1 << 20, 100);
        assert_eq!(
            ext,
            vec![
                Extent {
                    length: 16384,
                    zero: true
                },
                Extent {
                    length: 8192,
                    zero: false
                },
                Extent {
                    length: (1 << 20) - 24576,
                    zero: true
                }
            ]
        );
        assert_eq!(disk.block_status(0, 1 << 20, 1).len(), 1);
        disk.trim(16384, 8192, false).unwrap();
        assert_eq!(disk.block_status(0, 1 << 20, 100).len(), 1);
    }

    /// Holes are passed a stretch at a time: the extents are the same
    /// wherever data lies against a stretch's edges, in either layer.
    #[test]
    fn block_status_passes_big_holes_and_finds_what_lies_in_them() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1u64 << 40;
        let base = layer(dir.path(), "base", size);
        let top = layer(dir.path(), "top", size);
        let stride = 4096 * CHUNK; // next_allocated's stretch
        base.write_data(&[1u8; 4096], 700 << 30).unwrap();
        base.set_allocated((700 << 30) / CHUNK, (700 << 30) / CHUNK + 1);
        // The last chunk of one stretch and the first of the next, on top.
        let edge = 3 * stride - CHUNK;
        top.write_data(&[2u8; 8192], edge).unwrap();
        top.set_allocated(edge / CHUNK, edge / CHUNK + 2);
        let disk = Disk::read_only(vec![base, top]);
        let ext = |zero, length| Extent { length, zero };
        assert_eq!(
            disk.block_status(0, size, 100),
            [
                ext(true, edge),
                ext(false, 2 * CHUNK),
                ext(true, (700 << 30) - edge - 2 * CHUNK),
                ext(false, CHUNK),
                ext(true, size - (700 << 30) - CHUNK),
            ]
        );
        // From inside a hole, and up to a point inside one.
        assert_eq!(
            disk.block_status(100, edge - 200, 100),
            [ext(true, edge - 200)]
        );
        assert_eq!(
            disk.block_status(edge + CHUNK, stride, 100),
            [ext(false, CHUNK), ext(true, stride - CHUNK)]
        );
    }

    /// Over a lower disk nothing is a hole: one extent of data, whatever
    /// the layers hold, and none past the end.
    #[test]
    fn block_status_over_a_lower_disk_is_all_data() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1u64 << 40;
        let top = layer(dir.path(), "top", size);
        let disk = Disk::writable(vec![top], None).unwrap().over_lower();
        disk.write(&[1u8; 8192], 16384, false).unwrap();
        let data = |length| Extent {
            length,
            zero: false,
        };
        assert_eq!(disk.block_status(0, size, 100), [data(size)]);
        assert_eq!(disk.block_status(4096, 100, 100), [data(100)]);
        assert_eq!(disk.block_status(size - 10, 100, 100), [data(10)]);
        assert!(disk.block_status(size, 100, 100).is_empty());
    }
}
