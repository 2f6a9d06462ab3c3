//! The paged KV cache's bookkeeping: the cache is `total` blocks of
//! `block_size` positions (16 by default), and each sequence owns a
//! [`BlockTable`], the ids of its blocks in position order. Position `p` of a
//! sequence lives in slot `table[p / block_size] * block_size + p % block_size`
//! of every layer's key and value buffers ([`BlockManager::slot`]).
//!
//! The manager hands out free blocks and takes them back; it knows nothing of
//! layers, dtypes or devices. Growing a table is all or nothing, so a sequence
//! that cannot get the blocks it asks for is left as it was and the caller
//! decides: it waits, or another sequence is preempted (its table released,
//! its tokens recomputed later). Blocks carry a reference count so that a
//! later prefix cache can share full blocks between sequences; today every
//! block has one owner.

use std::collections::VecDeque;
use std::fmt;

/// Positions per block unless the caller says otherwise.
pub const BLOCK_SIZE: usize = 16;

/// The blocks of one sequence, in position order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<u32>,
}

impl BlockTable {
    pub fn new() -> BlockTable {
        BlockTable::default()
    }

    /// Room for `blocks` block ids in all, so that growing to them does not
    /// allocate.
    pub fn reserve(&mut self, blocks: usize) {
        self.blocks.reserve(blocks.saturating_sub(self.blocks.len()));
    }

    /// The block ids, in position order (what the attention op and the KV
    /// write read, one row per sequence).
    pub fn ids(&self) -> &[u32] {
        &self.blocks
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// A table could not grow: `needed` more blocks, `free` left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfBlocks {
    pub needed: usize,
    pub free: usize,
}

impl fmt::Display for OutOfBlocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KV cache full: {} more blocks needed, {} free", self.needed, self.free)
    }
}

impl std::error::Error for OutOfBlocks {}

/// The free list and reference counts of a paged KV cache.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    refs: Vec<u32>,
    free: VecDeque<u32>,
}

impl BlockManager {
    /// A cache of `total` blocks of `block_size` positions, all free.
    ///
    /// # Errors
    /// If either is zero, or `total` does not fit a `u32` block id.
    pub fn new(total: usize, block_size: usize) -> anyhow::Result<BlockManager> {
        anyhow::ensure!(block_size > 0, "KV cache: block size 0");
        anyhow::ensure!(total > 0, "KV cache: no blocks (0 blocks of {block_size} positions)");
        anyhow::ensure!(total <= u32::MAX as usize, "KV cache: {total} blocks is more than a u32 block id can name");
        Ok(BlockManager { block_size, refs: vec![0; total], free: (0..total as u32).collect() })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the cache.
    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks no sequence holds.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Blocks that hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Blocks `table` still needs to hold `positions` positions.
    pub fn needed(&self, table: &BlockTable, positions: usize) -> usize {
        self.blocks_for(positions).saturating_sub(table.len())
    }

    /// Whether `table` can grow to hold `positions` positions now.
    pub fn can_reserve(&self, table: &BlockTable, positions: usize) -> bool {
        self.needed(table, positions) <= self.free()
    }

    /// Grow `table` to hold `positions` positions (a table that already
    /// holds them is left as it is).
    ///
    /// # Errors
    /// [`OutOfBlocks`] when too few blocks are free; `table` is unchanged.
    pub fn reserve(&mut self, table: &mut BlockTable, positions: usize) -> Result<(), OutOfBlocks> {
        let needed = self.needed(table, positions);
        if needed > self.free() {
            return Err(OutOfBlocks { needed, free: self.free() });
        }
        for _ in 0..needed {
            let id = self.free.pop_front().expect("free count checked above");
            debug_assert_eq!(self.refs[id as usize], 0, "block {id} was on the free list while held");
            self.refs[id as usize] = 1;
            table.blocks.push(id);
        }
        Ok(())
    }

    /// Give back every block of `table` (a finished or preempted sequence);
    /// the table is left empty.
    ///
    /// # Panics
    /// If a block of `table` is not held (a table of another manager).
    pub fn release(&mut self, table: &mut BlockTable) {
        // last block first, so a sequence that comes back soon gets its blocks in the same order
        for id in table.blocks.drain(..).rev() {
            let r = &mut self.refs[id as usize];
            assert!(*r > 0, "KV cache: block {id} released but not held");
            *r -= 1;
            if *r == 0 {
                self.free.push_front(id);
            }
        }
    }

    /// Keep only the blocks of `table` that hold its first `positions`
    /// positions, giving back the rest (last first, so that growing again
    /// takes the same blocks in the same order).
    ///
    /// # Panics
    /// If a block of `table` is not held (a table of another manager).
    pub fn shrink(&mut self, table: &mut BlockTable, positions: usize) {
        let keep = self.blocks_for(positions).min(table.len());
        for id in table.blocks.drain(keep..).rev() {
            let r = &mut self.refs[id as usize];
            assert!(*r > 0, "KV cache: block {id} released but not held");
            *r -= 1;
            if *r == 0 {
                self.free.push_front(id);
            }
        }
    }

    /// The cache slot of position `pos` of the sequence that owns `table`.
    ///
    /// # Panics
    /// If `table` does not reach `pos`.
    pub fn slot(&self, table: &BlockTable, pos: usize) -> usize {
        let b = pos / self.block_size;
        assert!(b < table.len(), "KV cache: position {pos} is past the table's {} blocks", table.len());
        table.blocks[b] as usize * self.block_size + pos % self.block_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_sizes_are_errors() {
        assert!(BlockManager::new(0, 16).is_err());
        assert!(BlockManager::new(4, 0).is_err());
    }

    #[test]
    fn slots_follow_the_table() {
        let mut bm = BlockManager::new(4, 4).unwrap();
        let (mut a, mut b) = (BlockTable::new(), BlockTable::new());
        bm.reserve(&mut a, 1).unwrap();
        bm.reserve(&mut b, 1).unwrap();
        bm.reserve(&mut a, 5).unwrap();
        assert_eq!(a.ids(), &[0, 2]);
        assert_eq!(b.ids(), &[1]);
        assert_eq!((0..6).map(|p| bm.slot(&a, p)).collect::<Vec<_>>(), vec![0, 1, 2, 3, 8, 9]);
        assert_eq!(bm.slot(&b, 3), 7);
    }

    #[test]
    fn growing_is_all_or_nothing() {
        let mut bm = BlockManager::new(3, 16).unwrap();
        let mut a = BlockTable::new();
        bm.reserve(&mut a, 16).unwrap();
        assert_eq!((a.len(), bm.free()), (1, 2));
        // 16 positions fit one block: no new block for the same length
        bm.reserve(&mut a, 10).unwrap();
        assert_eq!(a.len(), 1);
        let before = a.clone();
        assert_eq!(bm.reserve(&mut a, 16 * 4), Err(OutOfBlocks { needed: 3, free: 2 }));
        assert_eq!((&a, bm.free()), (&before, 2));
        assert!(bm.can_reserve(&a, 48) && !bm.can_reserve(&a, 49));
        bm.release(&mut a);
        assert!(a.is_empty());
        assert_eq!(bm.free(), bm.total());
    }

    #[test]
    fn a_shrunk_table_grows_back_into_the_same_blocks() {
        let mut bm = BlockManager::new(8, 4).unwrap();
        let mut a = BlockTable::new();
        bm.reserve(&mut a, 20).unwrap();
        assert_eq!(a.ids(), &[0, 1, 2, 3, 4]);
        bm.shrink(&mut a, 9);
        assert_eq!((a.ids(), bm.free()), (&[0, 1, 2][..], 5));
        bm.shrink(&mut a, 12);
        assert_eq!(a.len(), 3, "shrinking to more than it holds keeps it");
        bm.reserve(&mut a, 20).unwrap();
        assert_eq!(a.ids(), &[0, 1, 2, 3, 4]);
        bm.shrink(&mut a, 0);
        assert!(a.is_empty() && bm.free() == bm.total());
    }

    #[test]
    fn a_preempted_sequence_makes_room_and_comes_back() {
        let mut bm = BlockManager::new(4, 16).unwrap();
        let (mut old, mut young) = (BlockTable::new(), BlockTable::new());
        bm.reserve(&mut old, 40).unwrap(); // 3 blocks
        bm.reserve(&mut young, 10).unwrap(); // 1 block
        assert_eq!(bm.free(), 0);
        // the old sequence's next token needs a fourth block: the young one is preempted
        assert!(!bm.can_reserve(&old, 49));
        bm.release(&mut young);
        bm.reserve(&mut old, 49).unwrap();
        assert_eq!((old.len(), bm.free()), (4, 0));
        // it finishes; the preempted one is admitted again (recomputed from its tokens)
        bm.release(&mut old);
        bm.reserve(&mut young, 11).unwrap();
        bm.release(&mut young);
        assert_eq!(bm.free(), bm.total());
    }

    #[test]
    #[should_panic(expected = "released but not held")]
    fn a_foreign_table_is_caught() {
        let mut a = BlockManager::new(2, 16).unwrap();
        let mut b = BlockManager::new(2, 16).unwrap();
        let mut t = BlockTable::new();
        a.reserve(&mut t, 1).unwrap();
        let mut copy = t.clone();
        a.release(&mut t);
        b.release(&mut copy);
    }

    /// Random admissions, growth, preemptions and finishes: no block is
    /// in two tables, held + free is the total, and the free count is back
    /// to full at the end.
    #[test]
    fn random_traffic_keeps_the_books() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        let mut bm = BlockManager::new(37, 16).unwrap();
        let mut seqs: Vec<(BlockTable, usize)> = Vec::new();
        for _ in 0..5000 {
            match next(4) {
                0 => {
                    let mut t = BlockTable::new();
                    let len = 1 + next(200);
                    if bm.reserve(&mut t, len).is_ok() {
                        seqs.push((t, len));
                    } else {
                        assert!(t.is_empty());
                    }
                }
                1 | 2 if !seqs.is_empty() => {
                    let i = next(seqs.len());
                    let len = seqs[i].1 + 1 + next(20);
                    if bm.reserve(&mut seqs[i].0, len).is_ok() {
                        seqs[i].1 = len;
                    } else {
                        // preempt the newest other sequence, or give up on this one
                        let j = seqs.len() - 1;
                        let mut victim = seqs.remove(if j != i { j } else { i }).0;
                        bm.release(&mut victim);
                    }
                }
                _ if !seqs.is_empty() => {
                    let i = next(seqs.len());
                    let mut t = seqs.swap_remove(i).0;
                    bm.release(&mut t);
                }
                _ => {}
            }
            let mut seen = vec![false; bm.total()];
            for (t, len) in &seqs {
                assert_eq!(t.len(), bm.blocks_for(*len));
                for &id in t.ids() {
                    assert!(!std::mem::replace(&mut seen[id as usize], true), "block {id} in two tables");
                }
            }
            assert_eq!(seen.iter().filter(|&&s| s).count() + bm.free(), bm.total());
        }
        for (mut t, _) in seqs.drain(..) {
            bm.release(&mut t);
        }
        assert_eq!(bm.free(), bm.total());
    }
}
