// qmm.cu: out[m, n] = x[m, k] @ w[n, k]^T for MLX affine 4-bit weights
// (groups of 32, 64 or 128) and 1 <= m <= 64 input rows, on the tensor cores
// (mma.sync m16n8k16, bf16 x bf16 -> f32): the weight is read once for all m
// rows, so 16 rows cost about what one does (speculative verify, batches).
//
// Exactness across row counts. Each output element is computed by the same
// instructions in the same order whatever m is: an MMA's column does not
// depend on the other columns, the k split is planned from (n, k) alone, and
// the per-group scale and the k-split sum are per element. So row r of an
// m-row product is bitwise the one-row product (what a decode step computes).
//
// Numbers. x is rounded to bf16 once (qmm_prep). A weight nibble q enters the
// MMA as the exact bf16 128 + q (one LOP3 puts two nibbles into the mantissas
// of a bf16 pair), so per group g of a row, with D = sum (128 + q) x~ over
// the group and X = sum x~ (f32, from qmm_prep):
//   sum (s q + b) x~ = s D + (b - 128 s) X.
//
// Layout. A warp owns 16 weight rows (one row tile) and one of `ksw` k slices;
// the 8 warps of a block are 8/ksw row tiles times ksw slices, which meet in
// shared memory. A k step is 64 values: thread (g = lane/4, t = lane%4) takes
// rows g and g+8, and in each 32-value half of the step the 8 values at
// 8t..8t+7 (one u32 of nibbles). Which k an MMA slot holds is free as long as
// x's B fragment holds the same k, so MMA j of a half takes nibble pairs
// (2j, 2j+4) and (2j+1, 2j+5), the pairs (i, i+4) that one shift and one LOP3
// give, and qmm_prep stores each run of 8 x values in the order
// 0,4,1,5,2,6,3,7 so that one 16-byte load is the B fragments of both MMAs.
#include "common.cuh"
#include "gemv.cuh"

// x f32 [m, k] -> xb bf16 [mp, k] (8-value runs stored 0,4,1,5,2,6,3,7; rows
// m..mp-1 zero) and xs f32 [k / gs, mp] (each group's sum of the bf16
// values: the 8 of a thread in order, then a butterfly over the gs / 8
// threads of the group). One thread per 8 values; k % 64 == 0.
extern "C" __global__ void qmm_prep(const float* __restrict__ x, u32* __restrict__ xb, float* __restrict__ xs, int m,
                                    int mp, int k, int gs) {
    FB_PROLOGUE();
    const int per_row = k / 8, tpg = gs / 8;
    const long long total = (long long)mp * per_row;
    // every lane of a warp runs the same iterations (the butterfly needs them all)
    for (long long base = (long long)blockIdx.x * blockDim.x; base < total; base += (long long)gridDim.x * blockDim.x) {
        const long long c = base + threadIdx.x;
        const bool ok = c < total;
        const int r = ok ? (int)(c / per_row) : 0, j8 = ok ? (int)(c - (long long)r * per_row) : 0;
        u32 v[8];
        if (ok && r < m) {
            const float4* p = (const float4*)(x + (long long)r * k + 8 * j8);
            const float4 a = p[0], b = p[1];
            v[0] = f32_to_bf16(a.x), v[1] = f32_to_bf16(a.y), v[2] = f32_to_bf16(a.z), v[3] = f32_to_bf16(a.w);
            v[4] = f32_to_bf16(b.x), v[5] = f32_to_bf16(b.y), v[6] = f32_to_bf16(b.z), v[7] = f32_to_bf16(b.w);
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) v[i] = 0;
        }
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) s += bf16_to_f32((bf16_t)v[i]);
        for (int o = 1; o < tpg; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (ok) {
            uint4 q;
            q.x = v[0] | (v[4] << 16), q.y = v[1] | (v[5] << 16), q.z = v[2] | (v[6] << 16), q.w = v[3] | (v[7] << 16);
            *(uint4*)(xb + c * 4) = q;
            if (j8 % tpg == 0) xs[(long long)(j8 / tpg) * mp + r] = s;
        }
    }
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Nibbles i and i + 4 of w as the bf16 pair (128 + q_i, 128 + q_{i+4}).
template <int I> __device__ __forceinline__ u32 nib_pair(u32 w) { return lop3_and_or<0x000F000Fu>(w >> (4 * I), 0x43004300u); }

__device__ __forceinline__ u32 ld_stream(const u32* p) {
    u32 v;
    asm volatile("ld.global.nc.L1::no_allocate.b32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
// A scale or bias as raw bits (f32, or a 16-bit value), converted where used.
__device__ __forceinline__ u32 ld_sb_raw(const void* p, long long i, int sdt) {
    if (sdt == 0) return ld_stream((const u32*)p + i);
    unsigned short h;
    asm volatile("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(h) : "l"((const unsigned short*)p + i));
    return h;
}
__device__ __forceinline__ float sb_val(u32 r, int sdt) { return sdt == 0 ? __uint_as_float(r) : sb_f32((unsigned short)r, sdt); }

#define QMM_WARPS 8
#define QMM_DEPTH 4   // k steps of weights (and their scales) in flight per warp

// GS: group size; NT: 8-row tiles of x (m <= 8 NT). mp = 8 NT (qmm_prep's padded rows).
template <int GS, int NT>
__device__ __forceinline__ void qmm_impl(const u32* __restrict__ w, const void* __restrict__ sc,
                                         const void* __restrict__ bi, const u32* __restrict__ xb,
                                         const float* __restrict__ xs, float* __restrict__ out, int n, int k, int m,
                                         int sdt, int ksw) {
    constexpr int U = GS > 64 ? GS : 64;   // k per unit: whole steps and whole groups
    constexpr int GPS = GS < 64 ? 64 / GS : 1;   // groups a step ends
    constexpr int SPG = GS > 64 ? GS / 64 : 1;   // steps a group spans
    constexpr int MP = NT * 8;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int tiles = n / 16, per_block = QMM_WARPS / ksw;
    const int rt = blockIdx.x * per_block + wid / ksw, ks = wid % ksw;
    const bool tile_ok = rt < tiles;
    const int row0 = tile_ok ? rt * 16 + g : g, row1 = row0 + 8;
    const int units = k / U, ng = k / GS;
    const int s0 = units * ks / ksw * (U / 64), s1 = units * (ks + 1) / ksw * (U / 64);
    const int kw = k / 8;   // u32 words per weight row
    const u32* w0 = w + (long long)row0 * kw;
    const u32* w1 = w + (long long)row1 * kw;
    const long long sb0 = (long long)row0 * ng, sb1 = (long long)row1 * ng;

    // the ring: per step, the 4 weight words (row g halves 0/1, row g+8
    // halves 0/1) and the scale and bias of each group the step ends
    constexpr int NSB = GPS * 4;
    u32 rw[QMM_DEPTH][4], rs[QMM_DEPTH][NSB];
#pragma unroll
    for (int p = 0; p < QMM_DEPTH; p++) {
        const int s = s0 + p;
        if (s < s1) {
            rw[p][0] = ld_stream(w0 + s * 8 + t), rw[p][1] = ld_stream(w0 + s * 8 + 4 + t);
            rw[p][2] = ld_stream(w1 + s * 8 + t), rw[p][3] = ld_stream(w1 + s * 8 + 4 + t);
            if ((s + 1) % SPG == 0) {
#pragma unroll
                for (int q = 0; q < GPS; q++) {
                    const int grp = (s * 64 + (q + 1) * (64 / GPS) - 1) / GS;
                    rs[p][4 * q + 0] = ld_sb_raw(sc, sb0 + grp, sdt), rs[p][4 * q + 1] = ld_sb_raw(bi, sb0 + grp, sdt);
                    rs[p][4 * q + 2] = ld_sb_raw(sc, sb1 + grp, sdt), rs[p][4 * q + 3] = ld_sb_raw(bi, sb1 + grp, sdt);
                }
            }
        }
    }
    fb_grid_wait();   // x (qmm_prep's output) is ready from here on

    float acc[NT][4], d[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[j][i] = 0.f, d[j][i] = 0.f;
    // x rows of this thread's B fragments: row nt * 8 + g of xb
    const u32* xr = xb + (long long)g * (k / 2);
    const long long xt = (long long)8 * (k / 2);   // u32 words between 8-row tiles

    for (int sb = s0; sb < s1; sb += QMM_DEPTH) {
#pragma unroll
        for (int p = 0; p < QMM_DEPTH; p++) {
            const int s = sb + p;
            if (s < s1) {
                u32 cw[4], cs[NSB];
#pragma unroll
                for (int i = 0; i < 4; i++) cw[i] = rw[p][i];
#pragma unroll
                for (int i = 0; i < NSB; i++) cs[i] = rs[p][i];
                const int sn = s + QMM_DEPTH;
                if (sn < s1) {
                    rw[p][0] = ld_stream(w0 + sn * 8 + t), rw[p][1] = ld_stream(w0 + sn * 8 + 4 + t);
                    rw[p][2] = ld_stream(w1 + sn * 8 + t), rw[p][3] = ld_stream(w1 + sn * 8 + 4 + t);
                    if ((sn + 1) % SPG == 0) {
#pragma unroll
                        for (int q = 0; q < GPS; q++) {
                            const int grp = (sn * 64 + (q + 1) * (64 / GPS) - 1) / GS;
                            rs[p][4 * q + 0] = ld_sb_raw(sc, sb0 + grp, sdt), rs[p][4 * q + 1] = ld_sb_raw(bi, sb0 + grp, sdt);
                            rs[p][4 * q + 2] = ld_sb_raw(sc, sb1 + grp, sdt), rs[p][4 * q + 3] = ld_sb_raw(bi, sb1 + grp, sdt);
                        }
                    }
                }
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const u32 a = cw[h], b = cw[2 + h];
                    const u32 a0 = nib_pair<0>(a), a1 = nib_pair<1>(a), a2 = nib_pair<2>(a), a3 = nib_pair<3>(a);
                    const u32 b0 = nib_pair<0>(b), b1 = nib_pair<1>(b), b2 = nib_pair<2>(b), b3 = nib_pair<3>(b);
#pragma unroll
                    for (int j = 0; j < NT; j++) {
                        const uint4 xv = __ldg((const uint4*)(xr + j * xt + s * 32 + h * 16 + t * 4));
                        mma_bf16(d[j], a0, b0, a1, b1, xv.x, xv.y);
                        mma_bf16(d[j], a2, b2, a3, b3, xv.z, xv.w);
                    }
                    // a group ends after this half: apply its scale and bias
                    if (GS == 32 || (h == 1 && (s + 1) % SPG == 0)) {
                        const int q = GS == 32 ? h : 0;
                        const int grp = (s * 64 + h * 32) / GS;
                        const float sc0 = sb_val(cs[4 * q + 0], sdt), sc1 = sb_val(cs[4 * q + 2], sdt);
                        const float bb0 = sb_val(cs[4 * q + 1], sdt) - 128.f * sc0;
                        const float bb1 = sb_val(cs[4 * q + 3], sdt) - 128.f * sc1;
#pragma unroll
                        for (int j = 0; j < NT; j++) {
                            const float2 X = *(const float2*)(xs + (long long)grp * MP + j * 8 + 2 * t);
                            acc[j][0] = fmaf(sc0, d[j][0], fmaf(bb0, X.x, acc[j][0]));
                            acc[j][1] = fmaf(sc0, d[j][1], fmaf(bb0, X.y, acc[j][1]));
                            acc[j][2] = fmaf(sc1, d[j][2], fmaf(bb1, X.x, acc[j][2]));
                            acc[j][3] = fmaf(sc1, d[j][3], fmaf(bb1, X.y, acc[j][3]));
#pragma unroll
                            for (int i = 0; i < 4; i++) d[j][i] = 0.f;
                        }
                    }
                }
            }
        }
    }

    // the k slices of a row tile meet in shared memory; slice 0 adds the others in order
    if (ksw > 1) {
        extern __shared__ float red[];   // [QMM_WARPS][NT * 4][32]
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) red[(wid * NT * 4 + j * 4 + i) * 32 + lane] = acc[j][i];
        __syncthreads();
        if (ks == 0) {
            for (int o = 1; o < ksw; o++)
#pragma unroll
                for (int j = 0; j < NT; j++)
#pragma unroll
                    for (int i = 0; i < 4; i++) acc[j][i] += red[((wid + o) * NT * 4 + j * 4 + i) * 32 + lane];
        }
    }
    if (ks == 0 && tile_ok) {
#pragma unroll
        for (int j = 0; j < NT; j++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int col = j * 8 + 2 * t + (i & 1), row = i < 2 ? row0 : row1;
                if (col < m) out[(long long)col * n + row] = acc[j][i];
            }
        }
    }
}

#define QMM_ARGS                                                                                                   \
    const u32 *__restrict__ w, const void *__restrict__ sc, const void *__restrict__ bi, const u32 *__restrict__ xb, \
        const float *__restrict__ xs, float *__restrict__ out, int n, int k, int m, int sdt, int ksw
#define QMM(GS, NT, MINB)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256, MINB) qmm4_g##GS##_n##NT(QMM_ARGS) {                         \
        FB_PROLOGUE_DEFERRED();                                                                                    \
        qmm_impl<GS, NT>(w, sc, bi, xb, xs, out, n, k, m, sdt, ksw);                                               \
    }
QMM(32, 1, 2)
QMM(32, 2, 1)
QMM(32, 4, 1)
QMM(32, 8, 1)
QMM(64, 1, 2)
QMM(64, 2, 2)
QMM(64, 4, 1)
QMM(64, 8, 1)
QMM(128, 1, 2)
QMM(128, 2, 2)
QMM(128, 4, 1)
QMM(128, 8, 1)
