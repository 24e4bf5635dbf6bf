//! `vstream vdisk import NAME FILE`: streams a disk image into a vDisk.
//!
//! ```text
//!   FILE --open_source--> SourceImage --next_extent--> ImportBody (Read)
//!        --Client::import, chunked--> PUT /api/v1/vdisks/NAME/content
//!                            <-- VDiskInfo JSON
//! ```
//!
//! The upload creates the vDisk: NAME must not exist yet.
//!
//! [`ImportBody`] produces the extent stream (`vstream_api::extents`) lazily
//! as the client reads it, so memory stays at one extent plus one frame whatever
//! the image's size, and only the extents the source reports travel.

use std::cell::RefCell;
use std::io::{self, Read};
use std::path::PathBuf;
use std::rc::Rc;

use anyhow::{bail, Result};
use clap::Args;
use indicatif::ProgressBar;
use vstream_api::extents::ExtentEncoder;

use crate::client::{api_path, Client};
use crate::output::{human_size, print, progress_bar};

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Name of the new vDisk (it must not exist yet).
    pub name: String,
    /// The disk image to upload; its format is detected.
    pub file: PathBuf,
    /// The named store to keep it in (`vstream store list`; default: each
    /// server's data folder).
    #[arg(long, value_name = "STORE")]
    pub store: Option<String>,
}

pub fn run(client: &Client, a: ImportArgs) -> Result<()> {
    let file = a.file.display().to_string();
    check_name_is_free(client, &a.name)?;
    if let Some(store) = &a.store {
        check_store_exists(client, store)?;
    }
    let scratch = std::env::temp_dir();
    // Its errors name the file already.
    let mut source = vstream_image::formats::open_source(&a.file, &scratch)?;
    let size = source.virtual_size();
    let format = source.format_name();

    let bar = progress_bar(size);
    let (body, failure) = import_body(size, move |buf| source.next_extent(buf), bar.clone());
    let result = client.import(&a.name, a.store.as_deref(), body);
    bar.finish_and_clear();

    let info = match result {
        Ok(info) => info,
        Err(e) => {
            // Our side failed first: say so rather than blame the connection.
            if let Some(cause) = failure.take() {
                return Err(anyhow::Error::new(cause).context(format!("reading {file}")));
            }
            if e.is_status() {
                return Err(e.into());
            }
            // A server that stops reading part-way (a full disk, say) answers
            // and hangs up, and the client sees only the broken connection.
            return Err(anyhow::Error::new(e).context(format!(
                "uploading {file} to vDisk {} broke off (if the server refused it, \
                 its log says why)",
                a.name
            )));
        }
    };
    print(&format!(
        "imported {file} ({format}, {}) into vDisk {}: {} allocated, content hash {}\n",
        human_size(size),
        info.vdisk.name,
        human_size(info.allocated),
        info.content_hash
    ))
}

/// The upload makes a new vDisk, and the server refuses a name in use. It
/// does so before reading the body, which leaves the client seeing only a broken
/// connection; asking first gives a clear answer, and before a conversion
/// through qemu-img that may take minutes. A bad token shows up here too.
fn check_name_is_free(client: &Client, name: &str) -> Result<()> {
    match client.get::<serde_json::Value>(&api_path(&["vdisks", name])) {
        Ok(_) => bail!(
            "vDisk {name} already exists: import makes a new vDisk, so delete it first \
             (vstream vdisk delete {name}) or import under another name"
        ),
        Err(e) if e.status() == Some(404) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The server refuses an unknown store before it reads the upload, and the
/// refusal would reach us only as a broken pipe: ask first.
fn check_store_exists(client: &Client, store: &str) -> Result<()> {
    if store == vstream_api::DEFAULT_STORE {
        return Ok(());
    }
    let stores = client.stores()?;
    if !stores.iter().any(|s| s.store.name == store) {
        bail!("store {store} does not exist (vstream store list; vstream store add {store} --path PATH)");
    }
    Ok(())
}

/// Where [`ImportBody`] leaves the first error it met, for after the client
/// has consumed it (it reports read errors only as a transport failure).
#[derive(Clone, Default)]
pub struct FailureSlot(Rc<RefCell<Option<io::Error>>>);

impl FailureSlot {
    pub fn take(&self) -> Option<io::Error> {
        self.0.borrow_mut().take()
    }
}

/// What [`import_body`] pulls extents from: a [`SourceImage`]'s
/// `next_extent`, or a test's closure.
///
/// [`SourceImage`]: vstream_image::formats::SourceImage
pub trait ExtentSource: FnMut(&mut Vec<u8>) -> io::Result<Option<u64>> {}

impl<F: FnMut(&mut Vec<u8>) -> io::Result<Option<u64>>> ExtentSource for F {}

/// The import request body: a [`Read`] producing the extent stream of a
/// source from its `next_extent` calls, on demand.
pub struct ImportBody<F> {
    encoder: ExtentEncoder<F>,
    failure: FailureSlot,
}

/// Makes the body for a source of `virtual_size` bytes. `next_extent` fills
/// the buffer it is given (cleared beforehand) and returns the extent's
/// offset, or `None` at the end; `bar` follows the end of the latest extent.
pub fn import_body(
    virtual_size: u64,
    mut next_extent: impl ExtentSource,
    bar: ProgressBar,
) -> (ImportBody<impl ExtentSource>, FailureSlot) {
    let next = move |buf: &mut Vec<u8>| {
        let extent = next_extent(buf)?;
        bar.set_position(match extent {
            Some(offset) => offset.saturating_add(buf.len() as u64).min(virtual_size),
            None => virtual_size,
        });
        Ok(extent)
    };
    let failure = FailureSlot::default();
    let body = ImportBody {
        encoder: ExtentEncoder::new(virtual_size, next),
        failure: failure.clone(),
    };
    (body, failure)
}

impl<F: ExtentSource> Read for ImportBody<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.encoder.read(buf).map_err(|e| {
            let copy = io::Error::new(e.kind(), e.to_string());
            self.failure.0.borrow_mut().get_or_insert(e);
            copy
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstream_api::extents::{
        encode_end, encode_frame, encode_header, Decoder, Event, ExtentReader, MAX_FRAME_LEN,
    };

    /// A source handing out `extents` in order.
    fn source(extents: Vec<(u64, Vec<u8>)>) -> impl FnMut(&mut Vec<u8>) -> io::Result<Option<u64>> {
        let mut it = extents.into_iter();
        move |buf| {
            Ok(it.next().map(|(offset, data)| {
                buf.extend_from_slice(&data);
                offset
            }))
        }
    }

    /// Reads `r` to the end `chunk` bytes at a time, as an HTTP client might.
    fn read_all_chunked(mut r: impl Read, chunk: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0; chunk];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn produces_exactly_the_encoded_stream() {
        let extents = vec![
            (0, b"boot".to_vec()),
            (4096, vec![7; 1000]),
            ((1 << 20) - 3, b"end".to_vec()),
        ];
        let mut expected = Vec::new();
        encode_header(&mut expected, 1 << 20);
        for (offset, data) in &extents {
            encode_frame(&mut expected, *offset, data).unwrap();
        }
        encode_end(&mut expected);
        for chunk in [1, 5, 12, 16, 64 << 10] {
            let (body, failure) =
                import_body(1 << 20, source(extents.clone()), ProgressBar::hidden());
            assert_eq!(
                read_all_chunked(body, chunk).unwrap(),
                expected,
                "chunk {chunk}"
            );
            assert!(failure.take().is_none());
        }
    }

    #[test]
    fn decoder_accepts_it_and_gets_the_extents_back() {
        let size = 64u64 << 20;
        let big: Vec<u8> = (0..(MAX_FRAME_LEN + 12345) as u32)
            .map(|i| (i % 253) as u8)
            .collect();
        let extents = vec![
            (512, vec![1; 10]),
            (1 << 20, big.clone()),
            (size - 4096, vec![9; 4096]),
        ];
        let (body, _) = import_body(size, source(extents), ProgressBar::hidden());
        let bytes = read_all_chunked(body, 7919).unwrap();

        // Fed in odd pieces to the socket-free decoder.
        let mut dec = Decoder::new();
        let mut frames: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut header = None;
        for piece in bytes.chunks(10_007) {
            dec.feed(piece);
            loop {
                match dec.next_event().unwrap() {
                    Event::NeedMore | Event::End => break,
                    Event::Header { size } => header = Some(size),
                    Event::Frame { offset, data } => frames.push((offset, data.to_vec())),
                }
            }
        }
        dec.finish().unwrap();
        assert_eq!(header, Some(size));
        // The long extent is split at the frame limit, nothing else changes.
        let offsets: Vec<u64> = frames.iter().map(|f| f.0).collect();
        assert_eq!(
            offsets,
            vec![512, 1 << 20, (1 << 20) + MAX_FRAME_LEN as u64, size - 4096]
        );
        let joined: Vec<u8> = frames[1..3].iter().flat_map(|f| f.1.clone()).collect();
        assert_eq!(joined, big);

        // And the blocking reader the export side uses agrees.
        let mut r = ExtentReader::new(&bytes[..]).unwrap();
        let mut n = 0;
        while r.next_frame().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 4);
    }

    #[test]
    fn empty_source_is_header_and_terminator() {
        let (body, _) = import_body(1 << 30, source(vec![]), ProgressBar::hidden());
        let bytes = read_all_chunked(body, 100).unwrap();
        let mut expected = Vec::new();
        encode_header(&mut expected, 1 << 30);
        encode_end(&mut expected);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn source_errors_are_kept_for_the_report() {
        let mut calls = 0;
        let failing = move |buf: &mut Vec<u8>| {
            calls += 1;
            if calls == 1 {
                buf.extend_from_slice(b"ok");
                Ok(Some(0))
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "image truncated at sector 9",
                ))
            }
        };
        let (body, failure) = import_body(1 << 20, failing, ProgressBar::hidden());
        let err = read_all_chunked(body, 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let kept = failure.take().expect("the error is kept");
        assert_eq!(kept.to_string(), "image truncated at sector 9");
    }

    #[test]
    fn bad_extents_from_a_source_are_errors() {
        let (body, failure) =
            import_body(100, source(vec![(90, vec![1; 20])]), ProgressBar::hidden());
        assert!(read_all_chunked(body, 4096).is_err());
        assert!(failure.take().is_some());
    }

    #[test]
    fn progress_follows_the_extents() {
        let bar = ProgressBar::hidden();
        bar.set_length(1 << 20);
        let (mut body, _) = import_body(
            1 << 20,
            source(vec![(0, vec![1; 10]), (4096, vec![2; 10])]),
            bar.clone(),
        );
        let mut buf = [0u8; 16];
        body.read_exact(&mut buf).unwrap(); // the header
        assert_eq!(bar.position(), 0);
        body.read_exact(&mut buf[..1]).unwrap(); // pulls the first extent
        assert_eq!(bar.position(), 10);
        read_all_chunked(body, 64).unwrap();
        assert_eq!(bar.position(), 1 << 20);
    }
}
