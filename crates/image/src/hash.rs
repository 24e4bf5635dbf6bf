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
use std::sync::Arc;

use crate::disk::Disk;
use crate::layer::{Layer, CHUNK, HASH_BLOCK, PAGE_CHUNKS};

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
        content_of(size, &self.root())
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

    /// The stored form, level by level without a copy: concatenated, they
    /// are [`Tree::to_bytes`].
    pub fn level_bytes(&self) -> impl Iterator<Item = &[u8]> {
        self.levels.iter().map(|l| l.as_flattened())
    }

    /// The stored form: every level, bottom first, 32 bytes a node.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.levels.iter().flatten().flatten().copied().collect()
    }

    /// Reads the stored form for a disk of `blocks` blocks, checking that
    /// every node above the bottom level is the hash of its children.
    pub fn from_bytes(blocks: u64, raw: &[u8]) -> Result<Tree, String> {
        let need = Tree::stored_len(blocks) as usize;
        if raw.len() < need {
            return Err(format!("tree is {} bytes, not {need}", raw.len()));
        }
        let mut at = 0;
        Tree::read(blocks, |level| {
            let bytes = level.as_flattened_mut();
            bytes.copy_from_slice(&raw[at..at + bytes.len()]);
            at += bytes.len();
            Ok(())
        })
        .map_err(|e| e.to_string())
    }

    /// Reads the stored form for a disk of `blocks` blocks level by level,
    /// bottom first, with `fill(level)` filling each level's nodes, and
    /// checks that every node above the bottom level is the hash of its
    /// children (an `InvalidData` error if not). Holds the tree and one level
    /// being checked, not a second copy.
    pub fn read(
        blocks: u64,
        mut fill: impl FnMut(&mut [Hash]) -> io::Result<()>,
    ) -> io::Result<Tree> {
        let mut levels: Vec<Vec<Hash>> = Vec::new();
        for (lvl, n) in Tree::shape(blocks).into_iter().enumerate() {
            let mut level = vec![[0u8; 32]; n];
            fill(&mut level)?;
            if let Some(below) = levels.last() {
                let good = below
                    .chunks(FANOUT)
                    .zip(&level)
                    .all(|(children, parent)| node(children) == *parent);
                if !good {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("tree level {lvl} does not match its children"),
                    ));
                }
            }
            levels.push(level);
        }
        Ok(Tree { levels })
    }
}

/// The content hash of a disk of `size` bytes whose tree has root `root`.
pub fn content_of(size: u64, root: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(DOMAIN);
    h.update(&size.to_le_bytes());
    h.update(root);
    *h.finalize().as_bytes()
}

/// Builds the tree of a disk from its block hashes, given in order. It holds
/// fewer than `FANOUT` hashes per level, and, if asked to keep the tree, the
/// tree's levels: never one hash per block. A run of blocks that no layer
/// touches costs nothing per block: a whole aligned subtree of zero blocks
/// has one known hash.
pub struct TreeBuilder {
    size: u64,
    blocks: u64,
    pushed: u64,
    levels: usize,
    /// `pending[h]`: hashes of height `h` (0: leaves; `h`: nodes of tree
    /// level `h - 1`) waiting for their siblings.
    pending: Vec<Vec<Hash>>,
    /// `zeros[h]`: the hash of a full subtree of height `h` over zero blocks.
    zeros: Vec<Hash>,
    keep: Option<Vec<Vec<Hash>>>,
}

impl TreeBuilder {
    /// A builder for a disk of `size` bytes; with `keep`, [`TreeBuilder::finish`]
    /// gives the whole tree too.
    pub fn new(size: u64, keep: bool) -> TreeBuilder {
        let blocks = size.div_ceil(HASH_BLOCK).max(1);
        let shape = Tree::shape(blocks);
        let levels = shape.len();
        let mut zeros = vec![zero_block_hash(HASH_BLOCK)];
        for h in 0..levels {
            let below = zeros[h];
            zeros.push(node(&[below; FANOUT]));
        }
        TreeBuilder {
            size,
            blocks,
            pushed: 0,
            levels,
            pending: vec![Vec::with_capacity(FANOUT); levels + 1],
            zeros,
            keep: keep.then(|| shape.iter().map(|&n| Vec::with_capacity(n)).collect()),
        }
    }

    /// Blocks given so far.
    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    /// Adds a hash of height `h`, completing the nodes it fills.
    fn add(&mut self, mut h: usize, mut hash: Hash) {
        loop {
            if h >= 1 {
                if let Some(keep) = &mut self.keep {
                    keep[h - 1].push(hash);
                }
            }
            self.pending[h].push(hash);
            if h == self.levels || self.pending[h].len() < FANOUT {
                return;
            }
            hash = node(&self.pending[h]);
            self.pending[h].clear();
            h += 1;
        }
    }

    /// The hash of the next block.
    pub fn push(&mut self, leaf: Hash) {
        self.pushed += 1;
        self.add(0, leaf);
    }

    /// The next `n` blocks read as zeros (the last block of the disk may be short).
    pub fn push_zeros(&mut self, n: u64) {
        let n = n.min(self.blocks - self.pushed);
        let short = self.size % HASH_BLOCK;
        if n > 0 && self.pushed + n == self.blocks && short != 0 {
            self.push_full_zeros(n - 1);
            self.push(zero_block_hash(short));
        } else {
            self.push_full_zeros(n);
        }
    }

    fn push_full_zeros(&mut self, mut n: u64) {
        while n > 0 {
            // The tallest zero subtree that starts here and fits in n.
            let mut h = 0;
            let mut span = 1u64;
            while h < self.levels
                && self.pending[h].is_empty()
                && span.saturating_mul(FANOUT as u64) <= n
            {
                h += 1;
                span *= FANOUT as u64;
            }
            if let Some(keep) = &mut self.keep {
                // The zero nodes inside it, level by level (level l has height l + 1).
                let mut count = span / FANOUT as u64;
                let inside = keep.iter_mut().zip(&self.zeros[1..]);
                for (nodes, zero) in inside.take(h.saturating_sub(1)) {
                    nodes.extend(std::iter::repeat_n(*zero, count as usize));
                    count /= FANOUT as u64;
                }
            }
            self.pushed += span;
            n -= span;
            let zero = self.zeros[h];
            self.add(h, zero);
        }
    }

    /// The root, and the tree if kept. Blocks not given are taken as zeros.
    pub fn finish(mut self) -> (Hash, Option<Tree>) {
        self.push_zeros(self.blocks - self.pushed);
        for h in 0..self.levels {
            if !self.pending[h].is_empty() {
                let hash = node(&self.pending[h]);
                self.pending[h].clear();
                self.add(h + 1, hash);
            }
        }
        let root = self.pending[self.levels]
            .first()
            .copied()
            .unwrap_or([0u8; 32]);
        (root, self.keep.map(|levels| Tree { levels }))
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

/// Blocks looked at together when hashing: those of one bitmap page, so a
/// window no layer touches is known from one look per layer.
const WINDOW: u64 = PAGE_CHUNKS / (HASH_BLOCK / CHUNK);

/// The chunks of blocks `[from, to)`.
fn chunk_range(from: u64, to: u64) -> (u64, u64) {
    let per = HASH_BLOCK / CHUNK;
    (from * per, to * per)
}

/// Hashes every block of `disk` that some layer touches; the others are
/// zeros, taken a bitmap page at a time without a look at each block.
pub fn hash_disk(disk: &Disk) -> io::Result<DiskHashes> {
    let size = disk.size();
    let blocks = size.div_ceil(HASH_BLOCK);
    let mut builder = TreeBuilder::new(size, true);
    let mut buf = vec![0u8; HASH_BLOCK as usize];
    let mut touched = Vec::new();
    let mut from = 0;
    while from < blocks {
        let to = (from + WINDOW).min(blocks);
        let (c0, c1) = chunk_range(from, to);
        let near: Vec<&Arc<Layer>> = disk
            .layers()
            .iter()
            .filter(|l| l.any_allocated(c0, c1))
            .collect();
        if near.is_empty() {
            builder.push_zeros(to - from);
        } else {
            for b in from..to {
                if near.iter().any(|l| l.touches_block(b)) {
                    let h = read_block_hash(disk, b, &mut buf)?;
                    touched.push((b, h));
                    builder.push(h);
                } else {
                    builder.push_zeros(1);
                }
            }
        }
        from = to;
    }
    let (_, tree) = builder.finish();
    let tree = tree.ok_or_else(|| io::Error::other("the tree was not kept"))?;
    Ok(DiskHashes::new(size, touched, tree))
}

fn read_block_hash(disk: &Disk, block: u64, buf: &mut [u8]) -> io::Result<Hash> {
    let start = block * HASH_BLOCK;
    let slice = &mut buf[..HASH_BLOCK.min(disk.size() - start) as usize];
    disk.read(slice, start, false)?;
    Ok(*blake3::hash(slice).as_bytes())
}

/// The tree of a chain from the layers' stored block hashes, without
/// reading data: each block takes the hash of the topmost layer touching it,
/// a block none touches the hash of zeros. `touched(block, hash)` sees each
/// block some layer touches, in order. Gives the root, and with `keep` the
/// whole tree. Every layer must have valid stored hashes.
///
/// Memory: the stored hashes of one window of blocks per layer, and the
/// tree if kept; a window no layer touches is not read at all.
pub fn stored_chain_tree(
    size: u64,
    layers: &[Arc<Layer>],
    keep: bool,
    mut touched: impl FnMut(u64, &Hash),
) -> io::Result<(Hash, Option<Tree>)> {
    let blocks = size.div_ceil(HASH_BLOCK);
    let mut builder = TreeBuilder::new(size, keep);
    let mut from = 0;
    while from < blocks {
        let to = (from + WINDOW).min(blocks);
        let (c0, c1) = chunk_range(from, to);
        let near: Vec<&Arc<Layer>> = layers.iter().filter(|l| l.any_allocated(c0, c1)).collect();
        if near.is_empty() {
            builder.push_zeros(to - from);
            from = to;
            continue;
        }
        // This window's stored hashes, read once per layer that touches it.
        let mut tables: Vec<Option<Vec<Hash>>> = vec![None; near.len()];
        for b in from..to {
            match near.iter().rposition(|l| l.touches_block(b)) {
                Some(i) => {
                    let table = match &mut tables[i] {
                        Some(t) => t,
                        none => none.insert(near[i].stored_block_hashes(from, to)?),
                    };
                    let h = table[(b - from) as usize];
                    touched(b, &h);
                    builder.push(h);
                }
                None => builder.push_zeros(1),
            }
        }
        from = to;
    }
    Ok(builder.finish())
}

/// The content hash of a chain from its layers' stored block hashes, in
/// memory bounded whatever the size (see [`stored_chain_tree`]).
pub fn stored_content_hash(size: u64, layers: &[Arc<Layer>]) -> io::Result<Hash> {
    let (root, _) = stored_chain_tree(size, layers, false, |_, _| {})?;
    Ok(content_of(size, &root))
}

/// The tree of the version whose top layer is the last of `layers`: stored
/// with that layer when it has one, else rebuilt from the stored tables.
pub fn version_tree(size: u64, layers: &[Arc<Layer>]) -> io::Result<Tree> {
    match layers.last() {
        None => Ok(Tree::zero(size)),
        Some(top) => match top.stored_tree()? {
            Some(tree) => Ok(tree),
            None => stored_chain_tree(size, layers, true, |_, _| {})?
                .1
                .ok_or_else(|| io::Error::other("the tree was not kept")),
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

    /// The streaming builder gives the tree `Tree::from_leaves` gives, with
    /// zero runs taken whole or leaf by leaf, for shapes with short right
    /// edges and sizes whose last block is short.
    #[test]
    fn builder_matches_from_leaves() {
        let full = zero_block_hash(HASH_BLOCK);
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let sizes = [
            512,
            HASH_BLOCK,
            HASH_BLOCK + 512,
            64 * HASH_BLOCK,
            65 * HASH_BLOCK,
            4096 * HASH_BLOCK,
            4097 * HASH_BLOCK - 1024,
            4160 * HASH_BLOCK,
            3 * 4096 * HASH_BLOCK + 7 * HASH_BLOCK + 512,
            262_144 * HASH_BLOCK + 65 * HASH_BLOCK,
        ];
        for size in sizes {
            let blocks = size.div_ceil(HASH_BLOCK);
            for density in [0u64, 1, 50, 100] {
                // Runs of data and of zeros, of random lengths.
                let mut leaves = Vec::with_capacity(blocks as usize);
                let mut builder = TreeBuilder::new(size, true);
                let mut quiet = TreeBuilder::new(size, false);
                while (leaves.len() as u64) < blocks {
                    let left = blocks - leaves.len() as u64;
                    let run = (1 + next() % 300_000).min(left);
                    if next() % 100 < density {
                        for _ in 0..run {
                            let h = *blake3::hash(&next().to_le_bytes()).as_bytes();
                            leaves.push(h);
                            builder.push(h);
                            quiet.push(h);
                        }
                    } else {
                        for _ in 0..run {
                            let b = leaves.len() as u64;
                            leaves.push(zero_leaf(size, b, &full));
                        }
                        if next() % 2 == 0 {
                            builder.push_zeros(run);
                        } else {
                            (0..run).for_each(|_| builder.push_zeros(1));
                        }
                        quiet.push_zeros(run);
                    }
                }
                let want = Tree::from_leaves(&leaves);
                let (root, tree) = builder.finish();
                assert_eq!(root, want.root(), "size {size} density {density}");
                assert_eq!(tree.as_ref(), Some(&want), "size {size} density {density}");
                assert_eq!(quiet.finish(), (want.root(), None));
            }
            // Nothing given at all: the zero tree.
            let (root, tree) = TreeBuilder::new(size, true).finish();
            assert_eq!(root, Tree::zero(size).root(), "size {size}");
            assert_eq!(tree, Some(Tree::zero(size)), "size {size}");
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
