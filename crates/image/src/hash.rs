//! Content hashes: a blake3 hash per 64 KiB logical block, a Merkle tree
//! over them, and a version's content hash from the tree's root.
//!
//! The content hash depends on the logical bytes alone, not on how they are
//! split into layers: block hashes are taken over what a reader of the whole
//! disk sees, and a block no layer touches gets the hash of zeros without
//! being read. Each sealed layer stores the inner nodes of its version's tree,
//! so sealing the next layer re-hashes only the blocks it holds and the nodes
//! above them: the cost follows the size of the change, not of the disk.

use std::collections::BTreeSet;
use std::io;

use crate::disk::Disk;
use crate::layer::{Layer, CHUNK, HASH_BLOCK};

pub type Hash = [u8; 32];

const DOMAIN: &[u8] = b"vstream content v2";
/// Children per inner node of the tree.
pub const FANOUT: usize = 64;
const NODE_PREFIX: &[u8] = &[1];

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

/// The hash of a block that no layer touches: zeros, full length except
/// perhaps the last block.
fn zero_leaf(size: u64, block: u64, full: &Hash) -> Hash {
    let len = HASH_BLOCK.min(size - block * HASH_BLOCK);
    if len == HASH_BLOCK {
        *full
    } else {
        zero_block_hash(len)
    }
}

fn node(children: &[Hash]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(NODE_PREFIX);
    for c in children {
        h.update(c);
    }
    *h.finalize().as_bytes()
}

/// The inner nodes of the Merkle tree over a disk's block hashes. Level 0
/// holds one node per `FANOUT` blocks, each level above one per `FANOUT`
/// nodes, up to a single root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    levels: Vec<Vec<Hash>>,
}

impl Tree {
    /// Nodes per level for a disk of `blocks` blocks, bottom first.
    pub fn shape(blocks: u64) -> Vec<usize> {
        let mut out = Vec::new();
        let mut n = blocks.max(1);
        loop {
            n = n.div_ceil(FANOUT as u64);
            out.push(n as usize);
            if n == 1 {
                return out;
            }
        }
    }

    /// Bytes the stored form of the tree takes for `blocks` blocks.
    pub fn stored_len(blocks: u64) -> u64 {
        Tree::shape(blocks).iter().map(|&n| n as u64 * 32).sum()
    }

    /// The tree over `leaves`, the hashes of every block in order.
    pub fn from_leaves(leaves: &[Hash]) -> Tree {
        let mut levels: Vec<Vec<Hash>> = Vec::new();
        let mut below = leaves;
        loop {
            let level: Vec<Hash> = below.chunks(FANOUT).map(node).collect();
            let done = level.len() == 1;
            levels.push(level);
            if done {
                return Tree { levels };
            }
            below = levels.last().map_or(&[], |l| l.as_slice());
        }
    }

    /// The tree of an all-zero disk of `size` bytes, built without hashing
    /// each node: every node is the full zero node except the last of a level.
    pub fn zero(size: u64) -> Tree {
        let blocks = size.div_ceil(HASH_BLOCK);
        let mut full = zero_block_hash(HASH_BLOCK);
        let mut last = zero_leaf(size, blocks - 1, &full);
        let mut count = blocks as usize;
        let mut levels = Vec::new();
        for n in Tree::shape(blocks) {
            let in_last = count - (n - 1) * FANOUT;
            let mut tail = vec![full; in_last];
            tail[in_last - 1] = last;
            let next_full = node(&[full; FANOUT]);
            last = node(&tail);
            full = next_full;
            let mut level = vec![full; n];
            level[n - 1] = last;
            levels.push(level);
            count = n;
        }
        Tree { levels }
    }

    pub fn root(&self) -> Hash {
        self.levels.last().map_or([0u8; 32], |l| l[0])
    }

    /// The content hash of a disk of `size` bytes with this tree.
    pub fn content(&self, size: u64) -> Hash {
        let mut h = blake3::Hasher::new();
        h.update(DOMAIN);
        h.update(&size.to_le_bytes());
        h.update(&self.root());
        *h.finalize().as_bytes()
    }

    /// Replaces the bottom nodes `groups` (each over `FANOUT` blocks) with
    /// `values` and re-hashes the nodes above them, and no others.
    pub fn update(&mut self, changes: impl IntoIterator<Item = (usize, Hash)>) {
        let mut dirty = BTreeSet::new();
        for (g, h) in changes {
            self.levels[0][g] = h;
            dirty.insert(g / FANOUT);
        }
        for lvl in 1..self.levels.len() {
            let mut next = BTreeSet::new();
            for &i in &dirty {
                let below = &self.levels[lvl - 1];
                let end = ((i + 1) * FANOUT).min(below.len());
                let h = node(&below[i * FANOUT..end]);
                self.levels[lvl][i] = h;
                next.insert(i / FANOUT);
            }
            dirty = next;
        }
    }

    /// The stored form: every level, bottom first, 32 bytes a node.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.levels.iter().flatten().flatten().copied().collect()
    }

    /// Reads the stored form for a disk of `blocks` blocks, checking that
    /// every node above the bottom level is the hash of its children.
    pub fn from_bytes(blocks: u64, raw: &[u8]) -> Result<Tree, String> {
        let shape = Tree::shape(blocks);
        let need = Tree::stored_len(blocks) as usize;
        if raw.len() < need {
            return Err(format!("tree is {} bytes, not {need}", raw.len()));
        }
        let mut hashes = raw[..need]
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap_or([0u8; 32]));
        let levels: Vec<Vec<Hash>> = shape
            .iter()
            .map(|&n| hashes.by_ref().take(n).collect())
            .collect();
        for (lvl, pair) in levels.windows(2).enumerate() {
            let rebuilt: Vec<Hash> = pair[0].chunks(FANOUT).map(node).collect();
            if rebuilt != pair[1] {
                return Err(format!(
                    "tree level {} does not match its children",
                    lvl + 1
                ));
            }
        }
        Ok(Tree { levels })
    }
}

/// The hashes of a disk: each touched block's hash, the tree and the
/// content hash.
pub struct DiskHashes {
    pub touched: Vec<(u64, Hash)>,
    pub tree: Tree,
    pub content: Hash,
}

impl DiskHashes {
    fn new(size: u64, touched: Vec<(u64, Hash)>, tree: Tree) -> DiskHashes {
        let content = tree.content(size);
        DiskHashes {
            touched,
            tree,
            content,
        }
    }
}

/// Content hash of an all-zero disk of `size` bytes.
pub fn zero_content_hash(size: u64) -> Hash {
    Tree::zero(size).content(size)
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
        let hash = if disk.layers().iter().any(|l| l.touches_block(b)) {
            let h = read_block_hash(disk, b, &mut buf)?;
            touched.push((b, h));
            h
        } else {
            zero_leaf(size, b, &full_zero)
        };
        all.push(hash);
    }
    Ok(DiskHashes::new(size, touched, Tree::from_leaves(&all)))
}

fn read_block_hash(disk: &Disk, block: u64, buf: &mut [u8]) -> io::Result<Hash> {
    let start = block * HASH_BLOCK;
    let slice = &mut buf[..HASH_BLOCK.min(disk.size() - start) as usize];
    disk.read(slice, start, false)?;
    Ok(*blake3::hash(slice).as_bytes())
}

/// The block hashes of a chain from the layers' stored tables, without
/// reading data: each block takes the hash of the topmost layer touching it.
/// Every layer must have valid stored hashes.
pub fn stored_block_hashes(size: u64, layers: &[std::sync::Arc<Layer>]) -> io::Result<Vec<Hash>> {
    let blocks = size.div_ceil(HASH_BLOCK);
    let full_zero = zero_block_hash(HASH_BLOCK);
    let mut out: Vec<Hash> = (0..blocks)
        .map(|b| zero_leaf(size, b, &full_zero))
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

/// The tree of the version whose top layer is the last of `layers`: stored
/// with that layer when it has one, else rebuilt from the stored tables.
pub fn version_tree(size: u64, layers: &[std::sync::Arc<Layer>]) -> io::Result<Tree> {
    match layers.last() {
        None => Ok(Tree::zero(size)),
        Some(top) => match top.stored_tree()? {
            Some(tree) => Ok(tree),
            None => Ok(Tree::from_leaves(&stored_block_hashes(size, layers)?)),
        },
    }
}

/// Hashes for sealing the top layer of `disk`: the blocks it touches are
/// read through the chain and hashed, and only the tree nodes above them are
/// re-hashed, starting from the tree stored with the layer below. Costs time
/// in proportion to the top layer's data.
pub fn hash_top(disk: &Disk) -> io::Result<DiskHashes> {
    let layers = disk.layers();
    let Some((top, below)) = layers.split_last() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a disk without layers",
        ));
    };
    let size = disk.size();
    let blocks = size.div_ceil(HASH_BLOCK);
    let mut tree = version_tree(size, below)?;
    let touched_blocks = touched_blocks(top);
    let mut buf = vec![0u8; HASH_BLOCK as usize];
    let mut touched = Vec::with_capacity(touched_blocks.len());
    for &b in &touched_blocks {
        touched.push((b, read_block_hash(disk, b, &mut buf)?));
    }
    // Re-hash each bottom node over a touched block: its other children come
    // from the stored table of the topmost layer below that holds them.
    let full_zero = zero_block_hash(HASH_BLOCK);
    let mut changes = Vec::new();
    let mut next = touched.iter().peekable();
    while let Some(&&(first, _)) = next.peek() {
        let group = (first / FANOUT as u64) as usize;
        let start = group as u64 * FANOUT as u64;
        let end = (start + FANOUT as u64).min(blocks);
        let mut children = Vec::with_capacity(FANOUT);
        // The group's stored hashes of each layer below, read once each.
        let mut tables: Vec<Option<Vec<Hash>>> = vec![None; below.len()];
        for b in start..end {
            let h = match next.peek() {
                Some(&&(t, h)) if t == b => {
                    next.next();
                    h
                }
                _ => match disk.block_owner(b, below.len()) {
                    Some(i) => {
                        let table = match &mut tables[i] {
                            Some(t) => t,
                            none => none.insert(below[i].stored_block_hashes(start, end)?),
                        };
                        table[(b - start) as usize]
                    }
                    None => zero_leaf(size, b, &full_zero),
                },
            };
            children.push(h);
        }
        changes.push((group, node(&children)));
    }
    tree.update(changes);
    Ok(DiskHashes::new(size, touched, tree))
}

/// The hash blocks `layer` holds data in, ascending.
fn touched_blocks(layer: &Layer) -> Vec<u64> {
    let per = HASH_BLOCK / CHUNK;
    let mut out = Vec::new();
    layer.for_each_allocated(|c| {
        let b = c / per;
        if out.last() != Some(&b) {
            out.push(b);
        }
    });
    out
}

/// Checks the top layer of `disk` against its stored block hashes: each block
/// it touches is read through the chain and hashed. `Ok(Some(block))` names
/// the first block whose data does not match.
pub fn check_top(disk: &Disk) -> io::Result<Option<u64>> {
    let mut bad = None;
    scan_top(disk, |block, good| {
        if !good {
            bad = Some(block);
        }
        good
    })?;
    Ok(bad)
}

/// Checks every block the top layer of `disk` touches, in order, calling
/// `each(block, matches_its_stored_hash)`; `each` returns false to stop.
pub fn scan_top(disk: &Disk, each: impl FnMut(u64, bool) -> bool) -> io::Result<()> {
    scan_top_where(disk, |_| true, each)
}

/// Like [`scan_top`], for the touched blocks `b` with `want(b)` only.
pub fn scan_top_where(
    disk: &Disk,
    want: impl Fn(u64) -> bool,
    mut each: impl FnMut(u64, bool) -> bool,
) -> io::Result<()> {
    let Some(top) = disk.layers().last() else {
        return Ok(());
    };
    let mut buf = vec![0u8; HASH_BLOCK as usize];
    for b in touched_blocks(top).into_iter().filter(|&b| want(b)) {
        let good = read_block_hash(disk, b, &mut buf)? == top.stored_block_hash(b)?;
        if !each(b, good) {
            break;
        }
    }
    Ok(())
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
    fn zero_tree_is_the_tree_of_zero_leaves() {
        for size in [
            512,
            HASH_BLOCK,
            HASH_BLOCK + 512,
            17 * HASH_BLOCK,
            300 * HASH_BLOCK - 4096,
            4096 * HASH_BLOCK + 1024,
        ] {
            let blocks = size.div_ceil(HASH_BLOCK);
            let full = zero_block_hash(HASH_BLOCK);
            let leaves: Vec<Hash> = (0..blocks).map(|b| zero_leaf(size, b, &full)).collect();
            assert_eq!(Tree::zero(size), Tree::from_leaves(&leaves), "size {size}");
        }
    }

    #[test]
    fn updated_tree_equals_rebuilt_tree() {
        let blocks = 1000u64;
        let mut leaves: Vec<Hash> = (0..blocks)
            .map(|b| *blake3::hash(&b.to_le_bytes()).as_bytes())
            .collect();
        let mut tree = Tree::from_leaves(&leaves);
        for b in [0u64, 17, 18, 999, 500] {
            leaves[b as usize] = [b as u8; 32];
        }
        let groups: BTreeSet<usize> = [0usize, 17, 18, 999, 500]
            .iter()
            .map(|b| b / FANOUT)
            .collect();
        tree.update(groups.iter().map(|&g| {
            let end = ((g + 1) * FANOUT).min(leaves.len());
            (g, node(&leaves[g * FANOUT..end]))
        }));
        assert_eq!(tree, Tree::from_leaves(&leaves));
        let bytes = tree.to_bytes();
        assert_eq!(bytes.len() as u64, Tree::stored_len(blocks));
        assert_eq!(Tree::from_bytes(blocks, &bytes).unwrap(), tree);
        let mut bad = bytes.clone();
        bad[40] ^= 1;
        let err = Tree::from_bytes(blocks, &bad).unwrap_err();
        assert!(err.contains("does not match"), "{err}");
        assert!(Tree::from_bytes(blocks, &bytes[..64]).is_err());
    }

    /// Sealing layer after layer with `hash_top` gives what hashing the whole
    /// chain gives, for chains of many layers and odd sizes.
    #[test]
    fn hash_top_matches_hash_disk_through_a_chain() {
        let dir = tempfile::tempdir().unwrap();
        let size = 70 * HASH_BLOCK + 1536;
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut layers: Vec<Arc<Layer>> = Vec::new();
        for i in 0..6 {
            let top = Arc::new(Layer::create(&dir.path().join(format!("l{i}")), size).unwrap());
            let mut chain = layers.clone();
            chain.push(top.clone());
            let disk = Disk::writable(chain.clone(), None).unwrap();
            for _ in 0..(next() % 12) {
                let len = 1 + next() % 100_000;
                let off = next() % (size - len);
                let byte = if next() % 4 == 0 { 0 } else { next() as u8 };
                disk.write(&vec![byte; len as usize], off, false).unwrap();
            }
            disk.flush().unwrap();
            let ro = Disk::read_only(chain.clone());
            let top_hashes = hash_top(&ro).unwrap();
            let full = hash_disk(&ro).unwrap();
            assert_eq!(top_hashes.content, full.content, "layer {i}");
            assert_eq!(top_hashes.tree, full.tree, "layer {i}");
            top.store_hashes(&top_hashes, true).unwrap();
            assert_eq!(top.stored_tree().unwrap(), Some(full.tree));
            layers.push(top);
        }
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
