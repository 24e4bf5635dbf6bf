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

/// The block hashes of a chain from the layers' stored tables, without
/// reading data: each block takes the hash of the topmost layer touching it.
/// Every layer must have valid stored hashes.
pub fn stored_block_hashes(
    size: u64,
    layers: &[std::sync::Arc<crate::layer::Layer>],
) -> io::Result<Vec<Hash>> {
    let blocks = size.div_ceil(HASH_BLOCK);
    let full_zero = zero_block_hash(HASH_BLOCK);
    let mut out: Vec<Hash> = (0..blocks)
        .map(|b| {
            if b + 1 == blocks {
                zero_block_hash(size - b * HASH_BLOCK)
            } else {
                full_zero
            }
        })
        .collect();
    for layer in layers {
        let table = layer.stored_hashes()?;
        for (b, slot) in out.iter_mut().enumerate() {
            if layer.touches_block(b as u64) {
                *slot = table[b];
            }
        }
    }
    Ok(out)
}

/// Hashes for sealing the top layer of `disk`: the blocks it touches are read
/// through the chain and hashed; every other block's hash comes from the
/// stored tables below. Costs time in proportion to the top layer's data.
pub fn hash_top(disk: &Disk) -> io::Result<DiskHashes> {
    let layers = disk.layers();
    let Some((top, below)) = layers.split_last() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a disk without layers",
        ));
    };
    let size = disk.size();
    let mut all = stored_block_hashes(size, below)?;
    let mut buf = vec![0u8; HASH_BLOCK as usize];
    let mut touched = Vec::new();
    for (b, slot) in all.iter_mut().enumerate() {
        let b = b as u64;
        if top.touches_block(b) {
            let start = b * HASH_BLOCK;
            let slice = &mut buf[..HASH_BLOCK.min(size - start) as usize];
            disk.read(slice, start, false)?;
            *slot = *blake3::hash(slice).as_bytes();
            touched.push((b, *slot));
        }
    }
    Ok(DiskHashes {
        touched,
        content: content_hash(size, all.into_iter()),
    })
}

/// Parses the hex form.
pub fn from_hex(s: &str) -> Option<Hash> {
    if s.len() != 64 {
        return None;
    }
    let mut h = [0u8; 32];
    for (i, b) in h.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(h)
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
