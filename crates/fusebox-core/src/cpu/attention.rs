//! The CPU attention op, over a contiguous cache ([`Backend::attention`]) or
//! a paged one ([`Backend::paged_attention`]). Both run the same kernels:
//! only where a row's keys and values lie differs ([`RowMap`]), so a paged
//! cache holding the same rows gives bitwise the contiguous cache's output.
//!
//! The rows of a call are taken a sequence at a time: a run of more than
//! [`ROW_EXACT_MAX`] consecutive rows of one sequence (a prefill chunk) goes
//! through the blocked prefill path ([`attn_block`]); every other row is
//! computed as a one-row (decode) step computes it ([`attn_group`], or the
//! plain loops of [`attn`] for head dims it does not take), whatever else
//! the call holds. So a sequence's rows do not depend on the batch around it.
//!
//! [`Backend::attention`]: crate::Backend::attention
//! [`Backend::paged_attention`]: crate::Backend::paged_attention

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::attn_block::{self, KvRows, Linear, Paged, RowMap};
use super::{
    attn, attn_group, check_cache, positions_of, same_shape, with_scratch, CpuBackend, SharedMut, MAX_HEAD_DIM,
};
use crate::backend::ROW_EXACT_MAX;
use crate::dtype::DType;
use crate::kv::{LayerKv, Pages};
use crate::tensor::Tensor;

/// Where each query row's keys lie.
#[derive(Clone, Copy)]
struct Layout<'a> {
    pos: &'a [i32],
    /// Paged: each row's sequence, the block tables (`width` a row) and
    /// log2 of the block size.
    paged: Option<(&'a [i32], &'a [i32], usize, u32)>,
    kv_row: usize,
}

impl<'a> Layout<'a> {
    fn rows(&self, i: usize) -> RowMap<'a> {
        match self.paged {
            None => RowMap::Linear(Linear(self.kv_row)),
            Some((seqs, tables, width, shift)) => {
                let s = seqs[i] as usize;
                RowMap::Paged(Paged { stride: self.kv_row, table: &tables[s * width..(s + 1) * width], shift })
            }
        }
    }

    /// Keys row `i` sees.
    fn len(&self, i: usize) -> usize {
        self.pos[i] as usize + 1
    }

    fn same_seq(&self, i: usize, j: usize) -> bool {
        self.paged.is_none_or(|(s, ..)| s[i] == s[j])
    }

    /// Rows of one stretch of contiguous keys (whole blocks, when paged).
    fn stretch(&self) -> usize {
        self.paged.map_or(usize::MAX, |(.., shift)| 1 << shift)
    }

    /// Whether row `i` is in a run of more than [`ROW_EXACT_MAX`]
    /// consecutive rows of one sequence (at most that many rows looked at).
    fn in_long_run(&self, m: usize, i: usize) -> bool {
        let mut n = 1;
        let mut j = i;
        while j > 0 && n <= ROW_EXACT_MAX && self.same_seq(j - 1, i) {
            j -= 1;
            n += 1;
        }
        let mut j = i + 1;
        while j < m && n <= ROW_EXACT_MAX && self.same_seq(j, i) {
            j += 1;
            n += 1;
        }
        n > ROW_EXACT_MAX
    }
}

/// `q [m, heads, d]`'s and the cache's shapes: `(m, heads, d, kv_heads)`.
fn dims(q: &Tensor, cache: &LayerKv, out: &Tensor, op: &str) -> Result<(usize, usize, usize, usize)> {
    ensure!(q.shape().len() == 3, "{op}: expected q [rows, heads, head_dim], got {:?}", q.shape());
    let (m, heads, d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    check_cache(cache, op)?;
    let cs = cache.k.shape();
    ensure!(cs[2] == d, "{op}: cache {:?} vs q {:?}", cs, q.shape());
    let kv_heads = cs[1];
    ensure!(kv_heads > 0 && heads % kv_heads == 0, "{op}: {heads} heads over {kv_heads} kv heads");
    same_shape(q, out, op)?;
    Ok((m, heads, d, kv_heads))
}

impl CpuBackend {
    pub(super) fn attention_contiguous(
        &self,
        q: &Tensor,
        cache: &LayerKv,
        positions: &Tensor,
        scale: f32,
        out: &mut Tensor,
    ) -> Result<()> {
        let (m, _, d, kv_heads) = dims(q, cache, out, "attention")?;
        let pos = positions_of(positions, m, "attention")?;
        let cap = cache.k.shape()[0];
        if let Some(&p) = pos.iter().find(|&&p| p as usize >= cap) {
            bail!("attention: position {p} is past the cache capacity {cap}");
        }
        self.attend(q, cache, Layout { pos, paged: None, kv_row: kv_heads * d }, scale, out)
    }

    pub(super) fn attention_paged(
        &self,
        q: &Tensor,
        cache: &LayerKv,
        pages: &Pages,
        scale: f32,
        out: &mut Tensor,
    ) -> Result<()> {
        const OP: &str = "paged attention";
        let (m, _, d, kv_heads) = dims(q, cache, out, OP)?;
        let pos = positions_of(pages.positions, m, OP)?;
        let cap = cache.k.shape()[0];
        let (batch, width, shift) = pages.shape(m, cap, OP)?;
        let (seqs, tables) = (pages.seqs.as_i32()?, pages.tables.as_i32()?);
        let bs = pages.block_size;
        let blocks = cap / bs;
        for (i, (&s, &p)) in seqs.iter().zip(pos).enumerate() {
            ensure!(s >= 0 && (s as usize) < batch, "{OP}: row {i} names sequence {s} of {batch}");
            let (s, need) = (s as usize, p as usize / bs + 1);
            ensure!(need <= width, "{OP}: row {i} at position {p} needs {need} blocks; tables hold {width}");
            if let Some(&b) = tables[s * width..s * width + need].iter().find(|&&b| b < 0 || b as usize >= blocks) {
                bail!("{OP}: sequence {s} names block {b}; the cache has {blocks}");
            }
        }
        let paged = Some((seqs, tables, width, shift));
        self.attend(q, cache, Layout { pos, paged, kv_row: kv_heads * d }, scale, out)
    }

    /// Attention of every row of `q` over its keys as `lay` places them.
    fn attend(&self, q: &Tensor, cache: &LayerKv, lay: Layout, scale: f32, out: &mut Tensor) -> Result<()> {
        let (m, heads, d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        let kv_heads = cache.k.shape()[1];
        let group = heads / kv_heads;
        let f16 = cache.k.dtype() == DType::F16;
        ensure!(!f16 || d <= MAX_HEAD_DIM, "attention: head dim {d} over {MAX_HEAD_DIM} with an f16 cache");
        let qs = q.as_f32()?;
        let (ks, vs, ks16, vs16) = if f16 {
            (&[][..], &[][..], cache.k.as_u16()?, cache.v.as_u16()?)
        } else {
            (cache.k.as_f32()?, cache.v.as_f32()?, &[][..], &[][..])
        };
        let kv = |kvh: usize| {
            if f16 {
                (KvRows::F16(&ks16[kvh * d..]), KvRows::F16(&vs16[kvh * d..]))
            } else {
                (KvRows::F32(&ks[kvh * d..]), KvRows::F32(&vs[kvh * d..]))
            }
        };
        let os = out.as_f32_mut()?;
        let blocked = group <= attn_block::QB && attn_block::supported(d);
        if blocked {
            // prefill chunks: blocks of a group's heads at a few positions; a
            // task widens its kv head's rows once for a chunk of blocks
            const BLOCKS_PER_TASK: usize = 8;
            let per = attn_block::QB / group;
            let chunk = per * BLOCKS_PER_TASK;
            let optr = SharedMut(os.as_mut_ptr());
            let mut r0 = 0;
            while r0 < m {
                let mut r1 = r0 + 1;
                while r1 < m && lay.same_seq(r0, r1) {
                    r1 += 1;
                }
                let run = r0..r1;
                r0 = r1;
                if run.len() <= ROW_EXACT_MAX {
                    continue;
                }
                let chunks = run.len().div_ceil(chunk);
                let map = lay.rows(run.start);
                self.pool.install(|| {
                    (0..kv_heads * chunks).into_par_iter().for_each(|task| {
                        let (kvh, c) = (task / chunks, task % chunks);
                        let rows = run.start + c * chunk..(run.start + (c + 1) * chunk).min(run.end);
                        let len = rows.clone().map(|i| lay.len(i)).max().unwrap_or(0);
                        let (keys, values) = kv(kvh);
                        let nq_max = per * group;
                        with_scratch(2 * len * d + 2 * nq_max * d + attn_block::scratch_len(len, d), |buf| {
                            let (kf, rest) = buf.split_at_mut(len * d);
                            let (vf, rest) = rest.split_at_mut(len * d);
                            let (qb, rest) = rest.split_at_mut(nq_max * d);
                            let (ob, rest) = rest.split_at_mut(nq_max * d);
                            keys.widen(len, map, d, kf);
                            values.widen(len, map, d, vf);
                            for b0 in rows.clone().step_by(per) {
                                let block = b0..(b0 + per).min(rows.end);
                                let nq = block.len() * group;
                                let mut lens = [0usize; attn_block::QB];
                                for (ii, i) in block.clone().enumerate() {
                                    lens[ii * group..(ii + 1) * group].fill(lay.len(i));
                                    let at = (i * heads + kvh * group) * d;
                                    qb[ii * group * d..(ii + 1) * group * d].copy_from_slice(&qs[at..at + group * d]);
                                }
                                attn_block::block(&qb[..nq * d], &lens[..nq], kf, vf, scale, rest, &mut ob[..nq * d]);
                                for (ii, i) in block.enumerate() {
                                    let o = &ob[ii * group * d..(ii + 1) * group * d];
                                    // SAFETY: row i's heads of this kv head are written by this task alone, inside `os`.
                                    unsafe { optr.write_row((i * heads + kvh * group) * d, o) };
                                }
                            }
                        })
                    })
                });
            }
            if lay.paged.is_none() && m > ROW_EXACT_MAX {
                return Ok(()); // one sequence, one run: done
            }
        }
        // every other row as a one-row step computes it
        let skip = |i: usize| blocked && lay.in_long_run(m, i);
        if attn_group::supported(d) {
            // a task per (row, kv head), its group's heads together
            let f = |(idx, o): (usize, &mut [f32])| {
                let (i, kvh) = (idx / kv_heads, idx % kv_heads);
                if skip(i) {
                    return;
                }
                let len = lay.len(i);
                let (keys, values) = kv(kvh);
                let qv = &qs[idx * group * d..(idx + 1) * group * d];
                with_scratch(attn_group::scratch_len(group, len), |s| {
                    attn_group::attend(qv, d, keys, values, lay.rows(i), len, scale, s, o)
                })
            };
            self.pool.install(|| os.par_chunks_exact_mut(group * d).enumerate().for_each(f));
            return Ok(());
        }
        let kv_row = lay.kv_row;
        let f = |(idx, o): (usize, &mut [f32])| {
            let (i, h) = (idx / heads, idx % heads);
            if skip(i) {
                return;
            }
            let kvh = h / group;
            let qv = &qs[idx * d..(idx + 1) * d];
            let (len, map, stretch) = (lay.len(i), lay.rows(i), lay.stretch());
            // the loops take rows four at a time within a stretch of
            // contiguous rows; whole blocks (16) keep the grouping of one stretch
            let stretches =
                || (0..len).step_by(stretch).map(move |t0| (t0, stretch.min(len - t0), kvh * d + map.off(t0)));
            with_scratch(len, |s| {
                for (t0, n, at) in stretches() {
                    if f16 {
                        attn::scores_f16(qv, &ks16[at..], kv_row, scale, &mut s[t0..t0 + n]);
                    } else {
                        attn::scores(qv, &ks[at..], kv_row, scale, &mut s[t0..t0 + n]);
                    }
                }
                let mx = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mut sum = 0f32;
                for st in s.iter_mut() {
                    *st = (*st - mx).exp();
                    sum += *st;
                }
                let inv = 1.0 / sum;
                s.iter_mut().for_each(|st| *st *= inv);
                o.fill(0.0);
                for (t0, n, at) in stretches() {
                    if f16 {
                        attn::weighted_sum_f16_acc(&s[t0..t0 + n], &vs16[at..], kv_row, o);
                    } else {
                        attn::weighted_sum_acc(&s[t0..t0 + n], &vs[at..], kv_row, o);
                    }
                }
            })
        };
        self.pool.install(|| os.par_chunks_exact_mut(d).enumerate().for_each(f));
        Ok(())
    }
}
