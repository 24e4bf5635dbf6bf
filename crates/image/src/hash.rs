//! Content hashes: a blake3 hash per 64 KiB logical block, and a version's
//! content hash over the list of block hashes.
//!
//! The content hash depends on the logical bytes alone, not on how they are
//! split into layers: block hashes are taken over what a reader of the whole
//! disk sees, and a block no layer touches gets the hash of zeros without
//! being read.

use std::io;

use crate::disk::Disk;
use crate::layer::HASH_BLOCK;

pub type Hash = [u8; 32];

const DOMAIN: &[u8] = b"vstream content v1";

/// Hash of one block of `len` zero bytes.
pub fn zero_block_hash(len: u64) -> Hash {
    let mut h = blake3::Hasher::new();
    let zeros = [0u8; 4096];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        h.update(&zeros[..n]);
        left -= n as u64;
    }
    *h.finalize().as_bytes()
}

/// Combines block hashes into the content hash of a disk of `size` bytes.
pub fn content_hash(size: u64, block_hashes: impl Iterator<Item = Hash>) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(DOMAIN);
    h.update(&size.to_le_bytes());
    for b in block_hashes {
        h.update(&b);
    }
    *h.finalize().as_bytes()
}

/// Content hash of an all-zero disk of `size` bytes.
pub fn zero_content_hash(size: u64) -> Hash {
    let blocks = size.div_ceil(HASH_BLOCK);
    let full = zero_block_hash(HASH_BLOCK);
    let last_len = size - (blocks - 1) * HASH_BLOCK;
    let last = zero_block_hash(last_len);
    content_hash(
        size,
        (0..blocks).map(|b| if b + 1 == blocks { last } else { full }),
    )
}

/// The hashes of a disk: each touched block's hash, and the content hash.
pub struct DiskHashes {
    pub touched: Vec<(u64, Hash)>,
    pub content: Hash,
}

/// Hashes every block of `disk` that some layer touches; the others are zeros.
pub fn hash_disk(disk: &Disk) -> io::Result<DiskHashes> {
    let size = disk.size();
    let blocks = size.div_ceil(HASH_BLOCK);
    let full_zero = zero_block_hash(HASH_BLOCK);
    let mut buf = vec![0u8; HASH_BLOCK as usize];
    let mut touched = Vec::new();
    let mut all = Vec::with_capacity(blocks as usize);
    for b in 0..blocks {
        let start = b * HASH_BLOCK;
        let len = HASH_BLOCK.min(size - start);
        let hash = if disk.layers().iter().any(|l| l.touches_block(b)) {
            let slice = &mut buf[..len as usize];
            disk.read(slice, start, false)?;
            let h = *blake3::hash(slice).as_bytes();
            touched.push((b, h));
            h
        } else if len == HASH_BLOCK {
            full_zero
        } else {
            zero_block_hash(len)
        };
        all.push(hash);
    }
    Ok(DiskHashes {
        touched,
        content: content_hash(size, all.into_iter()),
    })
}

/// Hex form of a hash, as shown to people.
pub fn to_hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Layer;
    use std::sync::Arc;

    #[test]
    fn same_bytes_same_hash_however_layered() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1 << 20;
        let a = Arc::new(Layer::create(&dir.path().join("a"), size).unwrap());
        let one = Disk::writable(vec![a.clone()], None).unwrap();
        assert_eq!(hash_disk(&one).unwrap().content, zero_content_hash(size));
        one.write(&[5u8; 10_000], 70_000, false).unwrap();
        one.write(&[6u8; 3], 500_000, false).unwrap();
        let flat = hash_disk(&one).unwrap();
        assert_ne!(flat.content, zero_content_hash(size));
        assert_eq!(flat.touched.len(), 2);

        // The same content split across two layers.
        let b = Arc::new(Layer::create(&dir.path().join("b"), size).unwrap());
        let c = Arc::new(Layer::create(&dir.path().join("c"), size).unwrap());
        Disk::writable(vec![b.clone()], None)
            .unwrap()
            .write(&[5u8; 10_000], 70_000, false)
            .unwrap();
        let two = Disk::writable(vec![b, c], None).unwrap();
        two.write(&[6u8; 3], 500_000, false).unwrap();
        assert_eq!(hash_disk(&two).unwrap().content, flat.content);

        // Writing zeros over data brings back the zero hash.
        one.write(&[0u8; 10_000], 70_000, false).unwrap();
        one.write(&[0u8; 3], 500_000, false).unwrap();
        assert_eq!(hash_disk(&one).unwrap().content, zero_content_hash(size));
    }

    #[test]
    fn partial_last_block() {
        let size = HASH_BLOCK + 512;
        assert_ne!(
            zero_content_hash(size),
            zero_content_hash(HASH_BLOCK + 1024)
        );
    }
}
