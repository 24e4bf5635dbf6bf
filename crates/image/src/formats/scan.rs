//! From "where data may be" to data extents.
//!
//! Each format knows which ranges of its disk may hold data (a sparse file's
//! data segments, a VHD's allocated sectors): it implements [`Regions`]. The
//! [`Scanner`] reads those ranges in bounded chunks, drops the
//! [`ZERO_GRANULE`]-aligned pieces that are all zeros and glues the rest into
//! extents of at most [`MAX_EXTENT`] bytes. [`Scanned`] pairs the two into a
//! [`SourceImage`].

use std::io;

use super::{is_zero, SourceImage, MAX_EXTENT, ZERO_GRANULE};

/// How much the scanner reads at a time (at most).
const READ_CHUNK: u64 = 1 << 20;

/// The ranges of a disk that may hold data, and a way to read them.
pub(crate) trait Regions: Send {
    /// The first range `[start, end)` of the disk that may hold data and ends
    /// after `from` (it may start before `from`), or `None` if nothing after
    /// `from` does. A range must be readable with one
    /// [`read`](Regions::read) call for any part of it.
    fn next_region(&mut self, from: u64) -> io::Result<Option<(u64, u64)>>;

    /// Fills `buf` with the disk's bytes at `offset`, a span inside one
    /// range returned by [`next_region`](Regions::next_region).
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// Walks a [`Regions`] and yields data extents; see the module docs.
#[derive(Default)]
pub(crate) struct Scanner {
    /// Next disk offset to look at.
    pos: u64,
    /// The region `pos` is in, if known.
    region: Option<(u64, u64)>,
    /// Disk bytes read ahead, starting at `chunk_start`.
    chunk: Vec<u8>,
    chunk_start: u64,
    done: bool,
}

impl Scanner {
    pub(crate) fn next_extent<R: Regions + ?Sized>(
        &mut self,
        src: &mut R,
        buf: &mut Vec<u8>,
    ) -> io::Result<Option<u64>> {
        buf.clear();
        let mut start = 0u64;
        loop {
            let region_end = match self.region {
                Some((_, end)) if self.pos < end => end,
                _ => {
                    if self.done {
                        break;
                    }
                    let Some((s, e)) = src.next_region(self.pos)? else {
                        self.done = true;
                        self.region = None;
                        break;
                    };
                    if e <= self.pos || s >= e {
                        return Err(io::Error::other(format!(
                            "image reader bug: region {s}..{e} does not lie after offset {}",
                            self.pos
                        )));
                    }
                    self.region = Some((s, e));
                    let s = s.max(self.pos);
                    self.pos = s;
                    if !buf.is_empty() && s != start + buf.len() as u64 {
                        // Not contiguous with the extent so far.
                        break;
                    }
                    e
                }
            };
            let granule_end = (self.pos / ZERO_GRANULE)
                .saturating_add(1)
                .saturating_mul(ZERO_GRANULE)
                .min(region_end);
            let len = (granule_end - self.pos) as usize;
            if buf.len() + len > MAX_EXTENT {
                break;
            }
            let chunk_end = self.chunk_start + self.chunk.len() as u64;
            if self.pos < self.chunk_start || granule_end > chunk_end {
                // Read ahead up to a granule boundary, within the region.
                let ahead = (self.pos.saturating_add(READ_CHUNK) / ZERO_GRANULE * ZERO_GRANULE)
                    .max(granule_end)
                    .min(region_end);
                self.chunk.resize((ahead - self.pos) as usize, 0);
                self.chunk_start = self.pos;
                if let Err(e) = src.read(self.pos, &mut self.chunk) {
                    self.chunk.clear();
                    return Err(e);
                }
            }
            let at = (self.pos - self.chunk_start) as usize;
            let granule = &self.chunk[at..at + len];
            let pos = self.pos;
            self.pos = granule_end;
            if is_zero(granule) {
                if !buf.is_empty() {
                    break;
                }
                continue;
            }
            if buf.is_empty() {
                start = pos;
            }
            buf.extend_from_slice(granule);
        }
        Ok(if buf.is_empty() { None } else { Some(start) })
    }
}

/// A [`SourceImage`] made of a format's [`Regions`] and a [`Scanner`].
pub(crate) struct Scanned<R> {
    pub(crate) regions: R,
    pub(crate) scanner: Scanner,
    pub(crate) size: u64,
    pub(crate) name: &'static str,
    /// Kept alive as long as the source: a scratch file to delete on drop.
    pub(crate) _keep: Option<tempfile::TempPath>,
}

impl<R: Regions> SourceImage for Scanned<R> {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn next_extent(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<u64>> {
        self.scanner.next_extent(&mut self.regions, buf)
    }

    fn format_name(&self) -> &'static str {
        self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory disk whose regions are given explicitly.
    struct Mem {
        data: Vec<u8>,
        regions: Vec<(u64, u64)>,
    }

    impl Regions for Mem {
        fn next_region(&mut self, from: u64) -> io::Result<Option<(u64, u64)>> {
            Ok(self.regions.iter().copied().find(|&(_, e)| e > from))
        }
        fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let o = offset as usize;
            buf.copy_from_slice(&self.data[o..o + buf.len()]);
            Ok(())
        }
    }

    fn extents(mem: Mem) -> Vec<(u64, Vec<u8>)> {
        let mut m = mem;
        let mut s = Scanner::default();
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(off) = s.next_extent(&mut m, &mut buf).unwrap() {
            out.push((off, buf.clone()));
        }
        out
    }

    #[test]
    fn skips_zero_granules_and_splits_at_max() {
        let g = ZERO_GRANULE as usize;
        let mut data = vec![0u8; 12 << 20];
        data[5] = 1; // granule 0
        data[g * 3 + 7] = 2; // granule 3
        data[g * 4] = 3; // granule 4: joins granule 3
        for b in &mut data[(6 << 20)..(11 << 20)] {
            *b = 9; // 5 MiB of data: split at 4 MiB
        }
        let len = data.len() as u64;
        let ex = extents(Mem {
            data,
            regions: vec![(0, len)],
        });
        let summary: Vec<(u64, usize)> = ex.iter().map(|(o, d)| (*o, d.len())).collect();
        assert_eq!(
            summary,
            vec![
                (0, g),
                (3 * g as u64, 2 * g),
                (6 << 20, 4 << 20),
                (10 << 20, 1 << 20)
            ]
        );
    }

    #[test]
    fn regions_bound_extents_and_merge_when_adjacent() {
        let data = vec![1u8; 1 << 20];
        // Unaligned regions; two adjacent ones merge into one extent.
        let ex = extents(Mem {
            data,
            regions: vec![(100, 1000), (1000, 5000), (70_000, 70_001)],
        });
        let summary: Vec<(u64, usize)> = ex.iter().map(|(o, d)| (*o, d.len())).collect();
        assert_eq!(summary, vec![(100, 4900), (70_000, 1)]);
    }

    #[test]
    fn bad_region_is_an_error_not_a_loop() {
        struct Stuck;
        impl Regions for Stuck {
            fn next_region(&mut self, _from: u64) -> io::Result<Option<(u64, u64)>> {
                Ok(Some((0, 0)))
            }
            fn read(&mut self, _offset: u64, _buf: &mut [u8]) -> io::Result<()> {
                Ok(())
            }
        }
        let mut s = Scanner::default();
        assert!(s.next_extent(&mut Stuck, &mut Vec::new()).is_err());
    }
}
