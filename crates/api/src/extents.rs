//! The extent stream: how a vDisk's content travels over HTTP.
//!
//! `vstream vdisk import` sends one as the request body and `vstream vdisk
//! export` receives one as the response body. It carries only the parts of the
//! disk that hold data, so a sparse 100 GiB disk with 3 GiB written moves
//! 3 GiB, and both ends need only a bounded amount of memory (one frame).
//!
//! # Layout
//!
//! All integers are big-endian.
//!
//! ```text
//! header:     b"VSEXTNT1"  u64 virtual_size            (16 bytes)
//! frame:      u64 offset   u32 length   <length bytes>  (12 + length bytes)
//! ...
//! terminator: u64 0xFFFF_FFFF_FFFF_FFFF   u32 0         (12 bytes)
//! ```
//!
//! Frames come in strictly increasing offset order and never overlap; each
//! carries 1 to [`MAX_FRAME_LEN`] bytes and lies within the virtual size.
//! Bytes no frame covers are zeros. Nothing may follow the terminator.
//!
//! # Pieces
//!
//! * [`Decoder`]: socket-free and incremental. Feed it bytes as they arrive
//!   (from an async HTTP body, say) and pull [`Event`]s; it validates
//!   everything above and reports violations as [`ExtentError`].
//! * [`ExtentReader`]: the same over a blocking [`Read`] (an HTTP response).
//! * [`encode_header`], [`encode_frame`], [`encode_end`] append to a
//!   `Vec<u8>`; [`write_header`], [`write_frame`], [`write_end`] write to any
//!   [`Write`].
//! * [`ExtentEncoder`]: a [`Read`] that produces a whole stream from a
//!   callback handing out extents, for HTTP clients that take a reader as
//!   the request body.

use std::io::{self, Read, Write};

/// The first 8 bytes of every extent stream.
pub const MAGIC: [u8; 8] = *b"VSEXTNT1";
/// Length of the stream header: magic and virtual size.
pub const HEADER_LEN: usize = 16;
/// Length of a frame header: offset and length.
pub const FRAME_HEADER_LEN: usize = 12;
/// Largest data length one frame may carry (4 MiB).
pub const MAX_FRAME_LEN: usize = 4 << 20;
/// The offset that marks the terminator frame.
pub const END_OFFSET: u64 = u64::MAX;
/// The media type the HTTP API uses for extent streams.
pub const CONTENT_TYPE: &str = "application/vnd.vstream.extents";

/// What is wrong with an extent stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtentError {
    #[error("not an extent stream: it starts with {found:02x?} instead of \"VSEXTNT1\"")]
    BadMagic { found: [u8; 8] },
    #[error("extent frame at offset {offset} is empty (only the terminator may have length 0)")]
    EmptyFrame { offset: u64 },
    #[error(
        "extent frame at offset {offset} is {length} bytes long, over the limit of {max} bytes"
    )]
    FrameTooLarge {
        offset: u64,
        length: u64,
        max: usize,
    },
    #[error(
        "extent frame at offset {offset} with {length} bytes runs past the end of the \
         {size}-byte disk"
    )]
    PastEnd { offset: u64, length: u64, size: u64 },
    #[error(
        "extent frame at offset {offset} overlaps or comes before the previous frame, \
         which ended at {previous_end}"
    )]
    OutOfOrder { offset: u64, previous_end: u64 },
    #[error("extent stream terminator has length {length}; it must be 0")]
    BadTerminator { length: u32 },
    #[error("{bytes} bytes follow the extent stream terminator")]
    TrailingData { bytes: usize },
    #[error("extent stream ended early, {inside}")]
    Truncated { inside: &'static str },
}

impl From<ExtentError> for io::Error {
    fn from(e: ExtentError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Appends the stream header for a disk of `virtual_size` bytes.
pub fn encode_header(out: &mut Vec<u8>, virtual_size: u64) {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&virtual_size.to_be_bytes());
}

/// Appends one frame. Checks only what it can see alone: that `data` is
/// 1..=[`MAX_FRAME_LEN`] bytes and does not reach the terminator offset.
pub fn encode_frame(out: &mut Vec<u8>, offset: u64, data: &[u8]) -> Result<(), ExtentError> {
    check_frame_alone(offset, data.len())?;
    out.reserve(FRAME_HEADER_LEN + data.len());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    Ok(())
}

/// Appends the terminator frame.
pub fn encode_end(out: &mut Vec<u8>) {
    out.extend_from_slice(&END_OFFSET.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
}

/// Writes the stream header for a disk of `virtual_size` bytes.
pub fn write_header<W: Write + ?Sized>(w: &mut W, virtual_size: u64) -> io::Result<()> {
    let mut b = [0u8; HEADER_LEN];
    b[..8].copy_from_slice(&MAGIC);
    b[8..].copy_from_slice(&virtual_size.to_be_bytes());
    w.write_all(&b)
}

/// Writes one frame; see [`encode_frame`] for what it checks. A bad frame is
/// an [`io::ErrorKind::InvalidInput`] error wrapping the [`ExtentError`].
pub fn write_frame<W: Write + ?Sized>(w: &mut W, offset: u64, data: &[u8]) -> io::Result<()> {
    check_frame_alone(offset, data.len())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    w.write_all(&frame_header(offset, data.len() as u32))?;
    w.write_all(data)
}

/// Writes the terminator frame.
pub fn write_end<W: Write + ?Sized>(w: &mut W) -> io::Result<()> {
    w.write_all(&frame_header(END_OFFSET, 0))
}

fn frame_header(offset: u64, length: u32) -> [u8; FRAME_HEADER_LEN] {
    let mut b = [0u8; FRAME_HEADER_LEN];
    b[..8].copy_from_slice(&offset.to_be_bytes());
    b[8..].copy_from_slice(&length.to_be_bytes());
    b
}

fn check_frame_alone(offset: u64, len: usize) -> Result<(), ExtentError> {
    if len == 0 {
        return Err(ExtentError::EmptyFrame { offset });
    }
    if len > MAX_FRAME_LEN {
        return Err(ExtentError::FrameTooLarge {
            offset,
            length: len as u64,
            max: MAX_FRAME_LEN,
        });
    }
    if offset.checked_add(len as u64).is_none() || offset == END_OFFSET {
        return Err(ExtentError::PastEnd {
            offset,
            length: len as u64,
            size: END_OFFSET,
        });
    }
    Ok(())
}

/// One step of decoding, from [`Decoder::next_event`].
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// The buffered bytes do not hold the next item: feed more.
    NeedMore,
    /// The stream header: the disk has `size` bytes.
    Header { size: u64 },
    /// `data` belongs at `offset`. It borrows the decoder until the next call.
    Frame { offset: u64, data: &'a [u8] },
    /// The terminator. Further calls return `End` again, or
    /// [`ExtentError::TrailingData`] once bytes arrive after it.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    FrameHeader,
    FrameData { offset: u64, len: usize },
    Ended,
}

/// What [`Decoder::advance`] found, without borrowing the buffer.
enum Step {
    NeedMore,
    Header(u64),
    Frame {
        offset: u64,
        start: usize,
        len: usize,
    },
    End,
}

/// Incremental, socket-free decoder of an extent stream.
///
/// Give it bytes with [`feed`](Decoder::feed) (or
/// [`feed_from`](Decoder::feed_from)) and call
/// [`next_event`](Decoder::next_event) until it says [`Event::NeedMore`]. When
/// the input is exhausted call [`finish`](Decoder::finish), which fails unless
/// the terminator was seen. It buffers at most one frame plus whatever was fed
/// beyond it, so feeding modest chunks and draining events after each keeps
/// memory near [`MAX_FRAME_LEN`]. Frame headers are checked before their data
/// is waited for, so a hostile length never makes it buffer more.
///
/// After an error every call returns the same error.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    pos: usize,
    state: State,
    size: Option<u64>,
    /// End of the previous frame: the next must start at or after it.
    next_min: u64,
    error: Option<ExtentError>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub fn new() -> Self {
        Decoder {
            buf: Vec::new(),
            pos: 0,
            state: State::Header,
            size: None,
            next_min: 0,
            error: None,
        }
    }

    /// The virtual size from the header, once it has been decoded.
    pub fn virtual_size(&self) -> Option<u64> {
        self.size
    }

    /// Whether the terminator has been decoded.
    pub fn is_ended(&self) -> bool {
        self.state == State::Ended
    }

    /// Bytes fed but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// How many more bytes the decoder needs before it can make progress: 0
    /// if [`next_event`](Decoder::next_event) has something to return.
    pub fn wanted(&self) -> usize {
        let need = match self.state {
            State::Header => HEADER_LEN,
            State::FrameHeader => FRAME_HEADER_LEN,
            State::FrameData { len, .. } => len,
            State::Ended => 0,
        };
        need.saturating_sub(self.buffered())
    }

    /// Adds input bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(bytes);
    }

    /// Reads once from `r`, at most `max` bytes, into the buffer; returns what
    /// `read` returned (0 at end of input).
    pub fn feed_from<R: Read + ?Sized>(&mut self, r: &mut R, max: usize) -> io::Result<usize> {
        self.compact();
        let old = self.buf.len();
        self.buf.resize(old + max, 0);
        let res = loop {
            match r.read(&mut self.buf[old..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let n = *res.as_ref().unwrap_or(&0);
        self.buf.truncate(old + n);
        res
    }

    /// Decodes the next item from the buffered bytes.
    pub fn next_event(&mut self) -> Result<Event<'_>, ExtentError> {
        Ok(match self.advance()? {
            Step::NeedMore => Event::NeedMore,
            Step::Header(size) => Event::Header { size },
            Step::Frame { offset, start, len } => Event::Frame {
                offset,
                data: &self.buf[start..start + len],
            },
            Step::End => Event::End,
        })
    }

    /// Call when the input has ended: fails unless the stream was complete.
    pub fn finish(&self) -> Result<(), ExtentError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let inside = match self.state {
            State::Ended if self.buffered() > 0 => {
                return Err(ExtentError::TrailingData {
                    bytes: self.buffered(),
                })
            }
            State::Ended => return Ok(()),
            State::Header => "inside the header",
            State::FrameHeader if self.buffered() == 0 => "before the terminator",
            State::FrameHeader => "inside a frame header",
            State::FrameData { .. } => "inside a frame's data",
        };
        Err(ExtentError::Truncated { inside })
    }

    fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    fn fail(&mut self, e: ExtentError) -> ExtentError {
        self.error = Some(e.clone());
        e
    }

    fn advance(&mut self) -> Result<Step, ExtentError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let avail = self.buffered();
        match self.state {
            State::Header => {
                if avail < HEADER_LEN {
                    return Ok(Step::NeedMore);
                }
                let h = &self.buf[self.pos..self.pos + HEADER_LEN];
                let mut magic = [0u8; 8];
                magic.copy_from_slice(&h[..8]);
                if magic != MAGIC {
                    return Err(self.fail(ExtentError::BadMagic { found: magic }));
                }
                let size = be_u64(&h[8..16]);
                self.pos += HEADER_LEN;
                self.size = Some(size);
                self.state = State::FrameHeader;
                Ok(Step::Header(size))
            }
            State::FrameHeader => {
                if avail < FRAME_HEADER_LEN {
                    return Ok(Step::NeedMore);
                }
                let h = &self.buf[self.pos..self.pos + FRAME_HEADER_LEN];
                let offset = be_u64(&h[..8]);
                let length = be_u32(&h[8..12]);
                if offset == END_OFFSET {
                    if length != 0 {
                        return Err(self.fail(ExtentError::BadTerminator { length }));
                    }
                    self.pos += FRAME_HEADER_LEN;
                    self.state = State::Ended;
                    return self.advance();
                }
                let size = self.size.unwrap_or(0);
                let len64 = u64::from(length);
                let err = if length == 0 {
                    Some(ExtentError::EmptyFrame { offset })
                } else if length as usize > MAX_FRAME_LEN {
                    Some(ExtentError::FrameTooLarge {
                        offset,
                        length: len64,
                        max: MAX_FRAME_LEN,
                    })
                } else if offset < self.next_min {
                    Some(ExtentError::OutOfOrder {
                        offset,
                        previous_end: self.next_min,
                    })
                } else if offset.checked_add(len64).is_none_or(|end| end > size) {
                    Some(ExtentError::PastEnd {
                        offset,
                        length: len64,
                        size,
                    })
                } else {
                    None
                };
                if let Some(e) = err {
                    return Err(self.fail(e));
                }
                self.pos += FRAME_HEADER_LEN;
                self.state = State::FrameData {
                    offset,
                    len: length as usize,
                };
                self.advance()
            }
            State::FrameData { offset, len } => {
                if avail < len {
                    return Ok(Step::NeedMore);
                }
                let start = self.pos;
                self.pos += len;
                self.next_min = offset + len as u64;
                self.state = State::FrameHeader;
                Ok(Step::Frame { offset, start, len })
            }
            State::Ended => {
                if avail > 0 {
                    return Err(self.fail(ExtentError::TrailingData { bytes: avail }));
                }
                Ok(Step::End)
            }
        }
    }
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// How much [`ExtentReader`] asks its reader for at a time: at least the
/// first, at most the second (more only means more buffered beyond a frame).
const READ_CHUNK: (usize, usize) = (64 << 10, 256 << 10);

/// Decodes an extent stream from a blocking reader, such as an HTTP response.
///
/// Stream errors come back as [`io::ErrorKind::InvalidData`] errors wrapping
/// an [`ExtentError`] (reach it with `get_ref()`/`into_inner()`).
pub struct ExtentReader<R> {
    inner: R,
    dec: Decoder,
    size: u64,
}

impl<R: Read> ExtentReader<R> {
    /// Reads and checks the header.
    pub fn new(mut inner: R) -> io::Result<Self> {
        let mut dec = Decoder::new();
        loop {
            match dec.advance()? {
                Step::Header(size) => return Ok(ExtentReader { inner, dec, size }),
                Step::NeedMore => fill(&mut dec, &mut inner)?,
                // The decoder yields the header before anything else.
                Step::Frame { .. } | Step::End => {
                    return Err(io::Error::other("extent decoder skipped the header"))
                }
            }
        }
    }

    /// The disk's virtual size, from the header.
    pub fn virtual_size(&self) -> u64 {
        self.size
    }

    /// The next frame as `(offset, data)`, or `None` after the terminator
    /// (having checked that nothing follows it).
    pub fn next_frame(&mut self) -> io::Result<Option<(u64, &[u8])>> {
        loop {
            match self.dec.advance()? {
                Step::NeedMore => fill(&mut self.dec, &mut self.inner)?,
                Step::Frame { offset, start, len } => {
                    return Ok(Some((offset, &self.dec.buf[start..start + len])))
                }
                Step::End => {
                    // Anything more on the wire is an error.
                    let mut probe = [0u8; 1];
                    let n = loop {
                        match self.inner.read(&mut probe) {
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            other => break other?,
                        }
                    };
                    if n > 0 {
                        self.dec.feed(&probe[..n]);
                        self.dec.advance()?;
                    }
                    return Ok(None);
                }
                Step::Header(_) => return Err(io::Error::other("extent header seen twice")),
            }
        }
    }

    /// Gives back the underlying reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Reads once, about what the decoder wants (bounded by [`READ_CHUNK`]);
/// end of input becomes the decoder's truncation error.
fn fill<R: Read + ?Sized>(dec: &mut Decoder, r: &mut R) -> io::Result<()> {
    let want = dec.wanted().clamp(READ_CHUNK.0, READ_CHUNK.1);
    if dec.feed_from(r, want)? == 0 {
        dec.finish()?;
    }
    Ok(())
}

/// A [`Read`] that produces a complete extent stream, for HTTP clients that
/// take the request body as a reader.
///
/// `next` is called for each extent: it fills the buffer it is given (cleared
/// beforehand) and returns the extent's offset, or `None` when there are no
/// more. Extents must come in increasing order without overlapping and lie
/// within `virtual_size`; longer ones are split into frames of at most
/// [`MAX_FRAME_LEN`], empty ones are skipped. A bad extent is an
/// [`io::ErrorKind::InvalidInput`] error. Memory: one extent plus one frame.
pub struct ExtentEncoder<F> {
    next: F,
    virtual_size: u64,
    next_min: u64,
    /// Encoded bytes waiting to be read, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    /// The current extent and how much of it is already framed.
    extent: Vec<u8>,
    extent_offset: u64,
    extent_pos: usize,
    state: EncState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EncState {
    Header,
    Frames,
    Done,
}

impl<F> ExtentEncoder<F>
where
    F: FnMut(&mut Vec<u8>) -> io::Result<Option<u64>>,
{
    pub fn new(virtual_size: u64, next: F) -> Self {
        ExtentEncoder {
            next,
            virtual_size,
            next_min: 0,
            out: Vec::new(),
            out_pos: 0,
            extent: Vec::new(),
            extent_offset: 0,
            extent_pos: 0,
            state: EncState::Header,
        }
    }

    /// Puts the next piece of the stream into `out`; false once done.
    fn refill(&mut self) -> io::Result<bool> {
        self.out.clear();
        self.out_pos = 0;
        match self.state {
            EncState::Header => {
                encode_header(&mut self.out, self.virtual_size);
                self.state = EncState::Frames;
            }
            EncState::Frames => {
                while self.extent_pos >= self.extent.len() {
                    self.extent.clear();
                    self.extent_pos = 0;
                    match (self.next)(&mut self.extent)? {
                        None => {
                            encode_end(&mut self.out);
                            self.state = EncState::Done;
                            return Ok(true);
                        }
                        Some(offset) => {
                            self.extent_offset = offset;
                            if self.extent.is_empty() {
                                continue;
                            }
                            self.check_extent(offset, self.extent.len())
                                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                        }
                    }
                }
                let len = (self.extent.len() - self.extent_pos).min(MAX_FRAME_LEN);
                let offset = self.extent_offset + self.extent_pos as u64;
                let data = &self.extent[self.extent_pos..self.extent_pos + len];
                encode_frame(&mut self.out, offset, data)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                self.extent_pos += len;
            }
            EncState::Done => return Ok(false),
        }
        Ok(true)
    }

    fn check_extent(&mut self, offset: u64, len: usize) -> Result<(), ExtentError> {
        let len64 = len as u64;
        if offset < self.next_min {
            return Err(ExtentError::OutOfOrder {
                offset,
                previous_end: self.next_min,
            });
        }
        match offset.checked_add(len64) {
            Some(end) if end <= self.virtual_size => {
                self.next_min = end;
                Ok(())
            }
            _ => Err(ExtentError::PastEnd {
                offset,
                length: len64,
                size: self.virtual_size,
            }),
        }
    }
}

impl<F> Read for ExtentEncoder<F>
where
    F: FnMut(&mut Vec<u8>) -> io::Result<Option<u64>>,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.out_pos >= self.out.len() {
            if !self.refill()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.out.len() - self.out_pos);
        buf[..n].copy_from_slice(&self.out[self.out_pos..self.out_pos + n]);
        self.out_pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Frames = Vec<(u64, Vec<u8>)>;

    /// Decodes `bytes` fed `chunk` bytes at a time into (size, frames).
    fn decode_chunked(bytes: &[u8], chunk: usize) -> Result<(u64, Frames), ExtentError> {
        let mut dec = Decoder::new();
        let mut size = None;
        let mut frames = Vec::new();
        let mut ended = false;
        for piece in bytes.chunks(chunk.max(1)) {
            dec.feed(piece);
            loop {
                match dec.next_event()? {
                    Event::NeedMore => break,
                    Event::Header { size: s } => size = Some(s),
                    Event::Frame { offset, data } => frames.push((offset, data.to_vec())),
                    Event::End => {
                        ended = true;
                        break;
                    }
                }
            }
        }
        dec.finish()?;
        assert!(ended);
        Ok((size.unwrap(), frames))
    }

    fn sample() -> Vec<u8> {
        let mut v = Vec::new();
        encode_header(&mut v, 1 << 20);
        encode_frame(&mut v, 0, b"hello").unwrap();
        encode_frame(&mut v, 4096, &[7u8; 1000]).unwrap();
        encode_frame(&mut v, (1 << 20) - 3, b"end").unwrap();
        encode_end(&mut v);
        v
    }

    fn header(size: u64) -> Vec<u8> {
        let mut v = Vec::new();
        encode_header(&mut v, size);
        v
    }

    fn raw_frame(v: &mut Vec<u8>, offset: u64, length: u32) {
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&length.to_be_bytes());
    }

    #[test]
    fn round_trip_any_chunking() {
        let bytes = sample();
        for chunk in [1, 2, 7, 12, 16, 100, 4096, bytes.len()] {
            let (size, frames) = decode_chunked(&bytes, chunk).unwrap();
            assert_eq!(size, 1 << 20);
            assert_eq!(frames.len(), 3);
            assert_eq!(frames[0], (0, b"hello".to_vec()));
            assert_eq!(frames[1], (4096, vec![7u8; 1000]));
            assert_eq!(frames[2], ((1 << 20) - 3, b"end".to_vec()));
        }
    }

    #[test]
    fn write_functions_match_encode_functions() {
        let mut w = Vec::new();
        write_header(&mut w, 1 << 20).unwrap();
        write_frame(&mut w, 0, b"hello").unwrap();
        write_frame(&mut w, 4096, &[7u8; 1000]).unwrap();
        write_frame(&mut w, (1 << 20) - 3, b"end").unwrap();
        write_end(&mut w).unwrap();
        assert_eq!(w, sample());
        assert_eq!(
            write_frame(&mut w, 0, &[]).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn empty_disk() {
        let mut v = header(0);
        encode_end(&mut v);
        let (size, frames) = decode_chunked(&v, 3).unwrap();
        assert_eq!(size, 0);
        assert!(frames.is_empty());
    }

    #[test]
    fn bad_magic() {
        let mut v = b"VSEXTNT2".to_vec();
        v.extend_from_slice(&[0; 8]);
        assert!(matches!(
            decode_chunked(&v, 5),
            Err(ExtentError::BadMagic { found }) if &found == b"VSEXTNT2"
        ));
    }

    #[test]
    fn frame_past_size() {
        let mut v = header(100);
        raw_frame(&mut v, 90, 20);
        assert_eq!(
            decode_chunked(&v, 64).unwrap_err(),
            ExtentError::PastEnd {
                offset: 90,
                length: 20,
                size: 100
            }
        );
        // Offset + length overflowing u64 is past the end too.
        let mut v = header(u64::MAX - 1);
        raw_frame(&mut v, u64::MAX - 2, 10);
        assert!(matches!(
            decode_chunked(&v, 64),
            Err(ExtentError::PastEnd { .. })
        ));
    }

    #[test]
    fn overlap_and_disorder() {
        let mut v = header(1 << 20);
        encode_frame(&mut v, 100, &[1; 50]).unwrap();
        encode_frame(&mut v, 149, &[1; 5]).unwrap();
        assert_eq!(
            decode_chunked(&v, 1000).unwrap_err(),
            ExtentError::OutOfOrder {
                offset: 149,
                previous_end: 150
            }
        );
        let mut v = header(1 << 20);
        encode_frame(&mut v, 100, &[1; 50]).unwrap();
        encode_frame(&mut v, 10, &[1; 5]).unwrap();
        assert!(matches!(
            decode_chunked(&v, 1000),
            Err(ExtentError::OutOfOrder { offset: 10, .. })
        ));
        // Adjacent frames are fine.
        let mut v = header(1 << 20);
        encode_frame(&mut v, 100, &[1; 50]).unwrap();
        encode_frame(&mut v, 150, &[1; 5]).unwrap();
        encode_end(&mut v);
        assert_eq!(decode_chunked(&v, 1000).unwrap().1.len(), 2);
    }

    #[test]
    fn oversized_frame_rejected_before_its_data() {
        let mut v = header(1 << 40);
        raw_frame(&mut v, 0, (MAX_FRAME_LEN + 1) as u32);
        let mut dec = Decoder::new();
        dec.feed(&v);
        assert!(matches!(dec.next_event(), Ok(Event::Header { .. })));
        assert!(matches!(
            dec.next_event(),
            Err(ExtentError::FrameTooLarge { .. })
        ));
        // Sticky.
        assert!(matches!(
            dec.next_event(),
            Err(ExtentError::FrameTooLarge { .. })
        ));
        let mut out = Vec::new();
        assert!(matches!(
            encode_frame(&mut out, 0, &vec![0; MAX_FRAME_LEN + 1]),
            Err(ExtentError::FrameTooLarge { .. })
        ));
        assert!(out.is_empty());
        // Exactly the limit is fine.
        encode_frame(&mut out, 0, &vec![1; MAX_FRAME_LEN]).unwrap();
    }

    #[test]
    fn empty_frame_and_bad_terminator() {
        let mut v = header(100);
        raw_frame(&mut v, 5, 0);
        assert_eq!(
            decode_chunked(&v, 100).unwrap_err(),
            ExtentError::EmptyFrame { offset: 5 }
        );
        let mut v = header(100);
        raw_frame(&mut v, END_OFFSET, 3);
        v.extend_from_slice(b"abc");
        assert_eq!(
            decode_chunked(&v, 100).unwrap_err(),
            ExtentError::BadTerminator { length: 3 }
        );
    }

    #[test]
    fn data_after_end() {
        let mut v = sample();
        v.push(0);
        assert_eq!(
            decode_chunked(&v, 7).unwrap_err(),
            ExtentError::TrailingData { bytes: 1 }
        );
        // Also when the extra bytes arrive after End was reported.
        let mut dec = Decoder::new();
        dec.feed(&sample());
        while dec.next_event().unwrap() != Event::End {}
        assert_eq!(dec.next_event().unwrap(), Event::End);
        dec.feed(b"xx");
        assert_eq!(
            dec.next_event().unwrap_err(),
            ExtentError::TrailingData { bytes: 2 }
        );
    }

    #[test]
    fn truncated_streams() {
        let full = sample();
        for cut in [0, 5, 16, 20, 30, full.len() - 12, full.len() - 1] {
            let err = decode_chunked(&full[..cut], 3).unwrap_err();
            assert!(
                matches!(err, ExtentError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn wanted_is_bounded_by_frame() {
        let mut dec = Decoder::new();
        assert_eq!(dec.wanted(), HEADER_LEN);
        let mut v = header(1 << 20);
        raw_frame(&mut v, 0, 1000);
        dec.feed(&v);
        assert!(matches!(dec.next_event(), Ok(Event::Header { .. })));
        assert_eq!(dec.next_event().unwrap(), Event::NeedMore);
        assert_eq!(dec.wanted(), 1000);
        dec.feed(&[9; 400]);
        assert_eq!(dec.wanted(), 600);
    }

    #[test]
    fn reader_and_encoder_round_trip() {
        // Extents larger than a frame get split; empty ones are skipped.
        let size = 64u64 << 20;
        let mut extents: Vec<(u64, Vec<u8>)> = vec![
            (0, vec![1; 10]),
            (100, Vec::new()),
            (4096, (0..9_000_000u32).map(|i| (i % 251) as u8).collect()),
            (size - 512, vec![3; 512]),
        ]
        .into_iter()
        .rev()
        .collect();
        let enc = ExtentEncoder::new(size, move |buf: &mut Vec<u8>| {
            Ok(extents.pop().map(|(off, data)| {
                buf.extend_from_slice(&data);
                off
            }))
        });
        let mut reader = ExtentReader::new(io::BufReader::with_capacity(1000, enc)).unwrap();
        assert_eq!(reader.virtual_size(), size);
        let mut got: Vec<(u64, usize)> = Vec::new();
        let mut big = Vec::new();
        while let Some((off, data)) = reader.next_frame().unwrap() {
            assert!(data.len() <= MAX_FRAME_LEN);
            got.push((off, data.len()));
            if (4096..4096 + 9_000_000).contains(&off) {
                big.extend_from_slice(data);
            }
        }
        assert_eq!(
            got,
            vec![
                (0, 10),
                (4096, MAX_FRAME_LEN),
                (4096 + MAX_FRAME_LEN as u64, MAX_FRAME_LEN),
                (
                    4096 + 2 * MAX_FRAME_LEN as u64,
                    9_000_000 - 2 * MAX_FRAME_LEN
                ),
                (size - 512, 512),
            ]
        );
        assert!(big.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        assert!(reader.next_frame().unwrap().is_none());
    }

    #[test]
    fn encoder_rejects_bad_extents() {
        let mut calls = 0;
        let mut enc = ExtentEncoder::new(1000, move |buf: &mut Vec<u8>| {
            calls += 1;
            buf.extend_from_slice(&[1; 10]);
            Ok(Some(if calls == 1 { 500 } else { 400 }))
        });
        let mut sink = Vec::new();
        let err = enc.read_to_end(&mut sink).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);

        let mut enc = ExtentEncoder::new(1000, |buf: &mut Vec<u8>| {
            buf.extend_from_slice(&[1; 10]);
            Ok(Some(995))
        });
        assert!(enc.read_to_end(&mut Vec::new()).is_err());
    }

    #[test]
    fn reader_reports_errors() {
        // Truncated.
        let full = sample();
        let mut r = ExtentReader::new(&full[..full.len() - 4]).unwrap();
        let err = loop {
            match r.next_frame() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("truncated stream accepted"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let inner = err.into_inner().unwrap().downcast::<ExtentError>().unwrap();
        assert!(matches!(*inner, ExtentError::Truncated { .. }));
        // Trailing data.
        let mut v = sample();
        v.extend_from_slice(b"junk");
        let mut r2 = ExtentReader::new(&v[..]).unwrap();
        let mut res = r2.next_frame();
        while let Ok(Some(_)) = res {
            res = r2.next_frame();
        }
        assert!(res.is_err());
        // Bad magic.
        assert!(ExtentReader::new(&b"GARBAGE_GARBAGE_"[..]).is_err());
        assert!(ExtentReader::new(&b"VSEX"[..]).is_err());
    }
}
