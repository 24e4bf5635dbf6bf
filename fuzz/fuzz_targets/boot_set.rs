//! Hands arbitrary bytes to `BootSet::from_bytes`, the parser of a boot
//! set's file and of a peer's answer. It may not panic; a set it accepts
//! must hold only runs inside the disk, in order and apart, and come back
//! the same through `to_bytes`.
//!
//! The first input byte picks how the rest becomes a file:
//! - 0: as it is, for a disk of 1 GiB;
//! - 1: with the disk's size taken from the file's own size field (up to
//!   64 TiB) and a correct checksum appended, so that mutations get past
//!   the checksum and size checks to the pages and words.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_image::bootset::{BootSet, BOOT_BLOCK};

const MAX_SIZE: u64 = 64 << 40;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (bytes, size) = match mode % 2 {
        0 => (rest.to_vec(), 1 << 30),
        _ => {
            let size = rest
                .get(8..16)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) % MAX_SIZE)
                .unwrap_or(1 << 30);
            let mut b = rest.to_vec();
            let hash = blake3::hash(&b);
            b.extend_from_slice(hash.as_bytes());
            (b, size)
        }
    };
    let set = match BootSet::from_bytes(&bytes, size) {
        Ok(set) => set,
        Err(why) => {
            assert!(!why.is_empty());
            return;
        }
    };
    assert_eq!(set.size(), size);
    let runs = set.runs();
    let mut end = 0u64;
    for &(offset, len) in &runs {
        assert!(
            offset >= end,
            "run at {offset} before the end of the last, {end}"
        );
        assert!(offset.is_multiple_of(BOOT_BLOCK) && len > 0);
        assert!(
            offset + len <= size,
            "run to {} past the {size}-byte disk",
            offset + len
        );
        end = offset + len;
    }
    let again = BootSet::from_bytes(&set.to_bytes(), size).expect("its own bytes");
    assert_eq!(again.runs(), runs);
    assert_eq!(again.cleared(), set.cleared());
});
