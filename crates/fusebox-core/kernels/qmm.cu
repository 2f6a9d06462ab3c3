// qmm.cu: out[m, n] = x[m, k] @ w[n, k]^T for MLX affine 4-bit weights
// (groups of 32, 64 or 128) and 1 <= m <= 32 input rows, on the tensor cores
// (mma.sync m16n8k16, bf16 x bf16 -> f32): the weight is read once for all m
// rows, so 16 rows cost about what one does (speculative verify, batches).
//
// Exactness across row counts. Each output element is computed by the same
// instructions in the same order whatever m is: an MMA's column does not
// depend on the other columns, the k split is planned from (n, k) alone, and
// the per-group scale and the k-split sum are per element. So row r of an
// m-row product is bitwise the one-row product (what a decode step computes).
//
// Numbers. x enters as two bf16 columns, hi = bf16(x) and lo = bf16(x - hi)
// (about 16 bits of mantissa together; bf16 alone failed the parity gate at
// relative RMS 6.6e-3), so an 8-column MMA tile carries 4 input rows. A
// weight nibble q enters as the exact bf16 128 + q (one LOP3 puts two
// nibbles into the mantissas of a bf16 pair), so per group of a row, with
// D = sum (128 + q)(hi + lo) over the group and X = sum (hi + lo) (f32, from
// qmm_prep):  sum (s q + b)(hi + lo) = s D + (b - 128 s) X.
//
// Layout. A warp owns 16 weight rows (one row tile) and one of `ksw` k slices;
// the 8 warps of a block are 8/ksw row tiles times ksw slices, which meet in
// shared memory. A k step is 64 values: thread (g = lane/4, t = lane%4) takes
// rows g and g+8 and the 16 values at 16t..16t+15 (8 bytes; a quad reads 32
// contiguous bytes of a row, whole sectors). Which k an MMA slot holds is free
// as long as x's B fragment holds the same k, so an MMA takes nibble pairs
// (i, i+4) of one word, the pairs one shift and one LOP3 give, and qmm_prep
// stores each run of 8 x values in the order 0,4,1,5,2,6,3,7 so that one
// 16-byte load is the B fragments of two MMAs. With groups of 32 a step holds
// two groups, and every MMA must stay inside one: thread t takes the words
// (8 values) at 8t and 32 + 8t of the step instead (two 4-byte loads; a quad
// reads 16 contiguous bytes twice, the same 32-byte sector), so its first word's MMAs are
// the first group's and its second word's the second's, and qmm_prep stores
// the step's eight runs of x in the order 0,4,1,5,2,6,3,7 (run 2t + i of the
// stored step is run t + 4i of x), so that x is read as for the other sizes.
#include "common.cuh"
#include "gemv.cuh"

// x f32 [m, k] -> xb bf16 [2 mp, k] (row 2r: bf16(x_r), row 2r + 1:
// bf16(x_r - that); 8-value runs stored 0,4,1,5,2,6,3,7, and with gs == 32
// the runs of each 64 in the order 0,4,1,5,2,6,3,7 too; rows of r >= m zero)
// and xs f32 [k / gs, mp] (per group, the sum of hi + lo: the 8 of a thread in
// order, then a butterfly over the gs / 8 threads of the group). One thread
// per 8 values of an input row; k % 64 == 0.
//
// Grouped (MoE) use: with `order`, row r of xb is input row order[r] / x_div
// of x (the pair's token for a shared input, x_div = slots; the pair itself,
// x_div = 1), and a negative order[r] is a zero row.
extern "C" __global__ void qmm_prep(const float* __restrict__ x, u32* __restrict__ xb, float* __restrict__ xs, int m,
                                    int mp, int k, int gs, const int* __restrict__ order, int x_div) {
    FB_PROLOGUE();
    const int per_row = k / 8, tpg = gs / 8;
    const long long total = (long long)mp * per_row;
    // every lane of a warp runs the same iterations (the butterfly needs them all)
    for (long long base = (long long)blockIdx.x * blockDim.x; base < total; base += (long long)gridDim.x * blockDim.x) {
        const long long c = base + threadIdx.x;
        const bool ok = c < total;
        const int r = ok ? (int)(c / per_row) : 0, j8 = ok ? (int)(c - (long long)r * per_row) : 0;
        u32 hi[8], lo[8];
        float s = 0.f;
        long long src = r;
        if (order && ok && r < m) {
            const int pr = order[r];
            src = pr < 0 ? -1 : pr / x_div;
        }
        if (ok && r < m && src >= 0) {
            const float4* p = (const float4*)(x + src * k + 8 * j8);
            const float4 a = p[0], b = p[1];
            const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 8; i++) {
                hi[i] = f32_to_bf16(v[i]);
                const float h = bf16_to_f32((bf16_t)hi[i]);
                lo[i] = f32_to_bf16(v[i] - h);
                s += h + bf16_to_f32((bf16_t)lo[i]);
            }
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) hi[i] = 0, lo[i] = 0;
        }
        for (int o = 1; o < tpg; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (ok) {
            // groups of 32: run a of a 64-value step is stored as run 2 (a % 4) + a / 4
            const int a8 = j8 & 7;
            const int js = gs == 32 ? (j8 & ~7) | (2 * (a8 & 3) + (a8 >> 2)) : j8;
            uint4 q;
            q.x = hi[0] | (hi[4] << 16), q.y = hi[1] | (hi[5] << 16), q.z = hi[2] | (hi[6] << 16), q.w = hi[3] | (hi[7] << 16);
            *(uint4*)(xb + ((long long)(2 * r) * per_row + js) * 4) = q;
            q.x = lo[0] | (lo[4] << 16), q.y = lo[1] | (lo[5] << 16), q.z = lo[2] | (lo[6] << 16), q.w = lo[3] | (lo[7] << 16);
            *(uint4*)(xb + ((long long)(2 * r + 1) * per_row + js) * 4) = q;
            if (j8 % tpg == 0) xs[(long long)(j8 / tpg) * mp + r] = s;
        }
    }
}

// Nibbles i and i + 4 of w as the bf16 pair (128 + q_i, 128 + q_{i+4}).
template <int I> __device__ __forceinline__ u32 nib_pair(u32 w) { return lop3_and_or<0x000F000Fu>(w >> (4 * I), 0x43004300u); }

__device__ __forceinline__ u32 ld_stream(const u32* p) {
    u32 v;
    asm volatile("ld.global.nc.L1::no_allocate.b32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ uint2 ld_stream2(const uint2* p) {
    uint2 v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.b32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}
// A scale or bias as raw bits (f32, or a 16-bit value: QmmSb), converted
// where used (sb_val). Loaded through the L1: a row's next groups share the
// 32-byte sector (streamed past the L1, every step fetched the whole sector
// from the L2 again: at one input row, twice the weight's L2 traffic).
template <bool F32> struct QmmSb { typedef u32 T; };
template <> struct QmmSb<false> { typedef unsigned short T; };
template <int SDT> __device__ __forceinline__ float sb_val(u32 r) {
    if constexpr (SDT == 0) return __uint_as_float(r);
    else if constexpr (SDT == 2) return __uint_as_float(r << 16);
    else return f16_to_f32((f16_t)r);
}

#define QMM_WARPS 8
// k steps of weights (and their scales) in flight per warp: 4, fewer where
// groups of 32 double the scales or 8 tiles of x come from the L2 (SX false),
// within the register budget. A multiple of the steps a group spans (2 for
// groups of 128): the load pointers move that many steps at a time.
template <int GS, int NT, bool SX> struct QmmDepth {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
    static constexpr int L2X8 = GS == 32 ? 1 : 2;   // 8 tiles from the L2 before Hopper
#else
    static constexpr int L2X8 = 2;
#endif
    static constexpr int v = NT >= 8 && !SX ? (GS == 64 ? 4 : L2X8) : GS == 32 ? (NT >= 8 ? 2 : 3) : 4;
};

// The MMAs of words W0 .. W0 + WN - 1 (each: four nibble pairs of rows g
// (a) and g+8 (b), two MMAs) against every 8-column tile of x, whose B
// fragments ld(j, wi) gives (tile j, word wi).
template <int NT, int W0, int WN, class Ld>
__device__ __forceinline__ void qmm_mmas(float (&d)[NT][4], const u32 (&a)[2][4], const u32 (&b)[2][4], Ld ld) {
#pragma unroll
    for (int j = 0; j < NT; j++) {
#pragma unroll
        for (int wi = W0; wi < W0 + WN; wi++) {
            const uint4 xv = ld(j, wi);
            mma_bf16(d[j], a[wi][0], b[wi][0], a[wi][1], b[wi][1], xv.x, xv.y);
            mma_bf16(d[j], a[wi][2], b[wi][2], a[wi][3], b[wi][3], xv.z, xv.w);
        }
    }
}

__device__ __forceinline__ uint4 lds128(u32 addr) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
    return v;
}

// Staged x (grouped launches): every warp of a block walks the same k steps
// (ksw = 1), so a step's x tile (8 NT rows of 64 values, 128 bytes each) is
// copied to shared memory once per block (cp.async, QMM_XD steps ahead) and
// read by all 8 row tiles, instead of each warp reading it from L2: with 32
// pairs and 16 weight rows a warp, x was 16 times the weight's bytes.
#define QMM_XD 4
#define QMM_XROWW 36   // u32 words per staged row: 32 + 4 (8 rows x 4 threads' 16-byte reads hit distinct banks)
template <int NT> struct QmmStage { static constexpr int BYTES = QMM_XD * 8 * NT * QMM_XROWW * 4; };

// GS: group size; NT: 8-column tiles of x (hi and lo of 4 input rows each;
// m <= 4 NT). xs holds xsm rows per group (qmm_prep's mp); output row r goes
// to row orow[r] of out (r when orow is null). SX: x staged in shared memory
// (QmmStage<NT>::BYTES of dynamic shared memory; ksw must be 1).
// kgrid > 0: the k slices are blocks (blockIdx.y of kgrid, split as ksw
// warps would split them: the same slices, so a row's sum is bitwise the
// same), each block 8 row tiles; slice y's sums go to out + y m n (the
// partials qmm_ksum adds in slice order when kgrid > 1).
template <int GS, int NT, bool SX, int SDT>
__device__ __forceinline__ void qmm_impl(const u32* __restrict__ w, const void* __restrict__ sc,
                                         const void* __restrict__ bi, const u32* __restrict__ xb,
                                         const float* __restrict__ xs, int xsm, float* __restrict__ out,
                                         const int* __restrict__ orow, int n, int k, int m, int ksw, int kgrid) {
    constexpr int U = GS > 64 ? GS : 64;         // k per unit: whole steps and whole groups
    constexpr int GPS = GS < 64 ? 64 / GS : 1;   // groups a step ends
    constexpr int SPG = GS > 64 ? GS / 64 : 1;   // steps a group spans
    constexpr int QMM_DEPTH = QmmDepth<GS, NT, SX>::v;
    static_assert(QMM_DEPTH % SPG == 0, "the load pointers move whole groups");
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int kin = kgrid > 0 ? 1 : ksw;         // k slices inside the block
    const int nsl = kgrid > 0 ? kgrid : ksw;     // k slices in all
    const int tiles = n / 16, per_block = QMM_WARPS / kin;
    const int rt = blockIdx.x * per_block + wid / kin, ks = kgrid > 0 ? (int)blockIdx.y : wid % kin;
    const bool tile_ok = rt < tiles;
    const int row0 = tile_ok ? rt * 16 + g : g, row1 = row0 + 8;
    const int units = k / U, ng = k / GS;
    const int s0 = units * ks / nsl * (U / 64), s1 = units * (ks + 1) / nsl * (U / 64);
    const int kw = k / 8;   // u32 words per weight row
    // groups of 32: words 8s + t and 8s + 4 + t of step s; else the two at 8s + 2t
    // (these and the scale pointers below run with the loads: at step s0, then
    // QMM_DEPTH steps ahead of the MMAs)
    const u32* w0 = w + (long long)row0 * kw + (GS == 32 ? t : 2 * t) + s0 * 8;
    const u32* w1 = w + (long long)row1 * kw + (GS == 32 ? t : 2 * t) + s0 * 8;
    // scales and biases of rows g and g+8 (f32, or 16-bit values)
    typedef typename QmmSb<SDT == 0>::T SbT;
    const int g0 = s0 * 64 / GS;   // s0 is a multiple of SPG
    const SbT* sc0 = (const SbT*)sc + (long long)row0 * ng + g0;
    const SbT* sc1 = (const SbT*)sc + (long long)row1 * ng + g0;
    const SbT* bi0 = (const SbT*)bi + (long long)row0 * ng + g0;
    const SbT* bi1 = (const SbT*)bi + (long long)row1 * ng + g0;

    // the ring: per step, the thread's 8 bytes of rows g and g+8 and the
    // scale and bias of each group the step ends
    auto ld_words = [](const u32* p) {
        if constexpr (GS == 32) return make_uint2(ld_stream(p), ld_stream(p + 4));
        else return ld_stream2((const uint2*)p);
    };
    constexpr int NSB = GPS * 4;
    uint2 rw[QMM_DEPTH][2];
    u32 rs[QMM_DEPTH][NSB];
    // Step (the pointers' step) + O into ring slot P, O a compile-time offset:
    // every address is a pointer plus an immediate (indices recomputed per load
    // cost more instructions than the MMAs). The pointers' step is a multiple of SPG.
#define QMM_LOAD(P, O)                                                                                           \
    do {                                                                                                        \
        rw[P][0] = ld_words(w0 + (O) * 8), rw[P][1] = ld_words(w1 + (O) * 8);                                   \
        if (((O) + 1) % SPG == 0) {                                                                             \
            _Pragma("unroll") for (int q = 0; q < GPS; q++) {                                                   \
                const int gi = ((O) * 64 + (q + 1) * (64 / GPS) - 1) / GS;                                      \
                rs[P][4 * q + 0] = __ldg(sc0 + gi), rs[P][4 * q + 1] = __ldg(bi0 + gi);                         \
                rs[P][4 * q + 2] = __ldg(sc1 + gi), rs[P][4 * q + 3] = __ldg(bi1 + gi);                         \
            }                                                                                                   \
        }                                                                                                       \
    } while (0)
    // the pointers move QMM_DEPTH steps (a multiple of SPG) at a time
    auto advance = [&]() {
        w0 += QMM_DEPTH * 8, w1 += QMM_DEPTH * 8;
        constexpr int dg = QMM_DEPTH * 64 / GS;
        sc0 += dg, sc1 += dg, bi0 += dg, bi1 += dg;
    };
#pragma unroll
    for (int p = 0; p < QMM_DEPTH; p++)
        if (s0 + p < s1) QMM_LOAD(p, p);
    advance();
    fb_grid_wait();   // x (qmm_prep's output) is ready from here on
    extern __shared__ __attribute__((aligned(16))) u32 qmm_xstage[];   // SX: [QMM_XD][8 NT][QMM_XROWW]
    const u32 xst = smem_addr(qmm_xstage);
    constexpr u32 XSTAGE = 8 * NT * QMM_XROWW * 4;   // bytes of one staged step
    // SX: queue step s's x tile into stage s % QMM_XD (a commit group either way, so the counts stay uniform)
    auto x_load = [&](int s) {
        if (s < s1) {
            const u32 dst = xst + (u32)(s % QMM_XD) * XSTAGE;
            for (int c = threadIdx.x; c < 8 * NT * 8; c += blockDim.x) {
                const int r = c >> 3, q = c & 7;
                cp_async16(dst + (u32)((r * QMM_XROWW + 4 * q) * 4), xb + (long long)r * (k / 2) + s * 32 + 4 * q);
            }
        }
        cp_async_commit();
    };
    if constexpr (SX) {
#pragma unroll
        for (int i = 0; i < QMM_XD - 1; i++) x_load(s0 + i);
    }

    float acc[NT][2], d[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++) {
        acc[j][0] = acc[j][1] = 0.f;
#pragma unroll
        for (int i = 0; i < 4; i++) d[j][i] = 0.f;
    }
    // this thread's B fragments: x row (hi or lo) nt * 8 + g of xb
    // (runs with the MMAs: at step sb of the pass)
    const u32* xr = xb + (long long)g * (k / 2) + 8 * t + s0 * 32;
    const long long xt = (long long)8 * (k / 2);   // u32 words between 8-row tiles
    const u32 xrs = (u32)((g * QMM_XROWW + 8 * t) * 4);   // SX: xr's offset in a staged step

    for (int sb = s0; sb < s1; sb += QMM_DEPTH) {
#pragma unroll
        for (int p = 0; p < QMM_DEPTH; p++) {
            const int s = sb + p;
            if (s < s1) {
                // The ring slot is refilled (step s + QMM_DEPTH) once this step is done
                // with it, at the end: refilled here, its registers would have to move.
                // Except for 8 tiles of x read from the L2, which then run out of
                // registers (one step less ahead is the price of the late refill).
                constexpr bool LATE = SX || NT < 8;
                const uint2 c0 = rw[p][0], c1 = rw[p][1];
                u32 cs[NSB];
#pragma unroll
                for (int i = 0; i < NSB; i++) cs[i] = rs[p][i];
                if constexpr (!LATE) {
                    if (s + QMM_DEPTH < s1) QMM_LOAD(p, p);
                }
                if constexpr (SX) {
                    // step s landed for everyone, and everyone is done with step s - 1's stage: refill it
                    cp_async_wait<QMM_XD - 2>();
                    __syncthreads();
                    x_load(s + QMM_XD - 1);
                }
                u32 a[2][4], b[2][4];
                a[0][0] = nib_pair<0>(c0.x), a[0][1] = nib_pair<1>(c0.x), a[0][2] = nib_pair<2>(c0.x), a[0][3] = nib_pair<3>(c0.x);
                a[1][0] = nib_pair<0>(c0.y), a[1][1] = nib_pair<1>(c0.y), a[1][2] = nib_pair<2>(c0.y), a[1][3] = nib_pair<3>(c0.y);
                b[0][0] = nib_pair<0>(c1.x), b[0][1] = nib_pair<1>(c1.x), b[0][2] = nib_pair<2>(c1.x), b[0][3] = nib_pair<3>(c1.x);
                b[1][0] = nib_pair<0>(c1.y), b[1][1] = nib_pair<1>(c1.y), b[1][2] = nib_pair<2>(c1.y), b[1][3] = nib_pair<3>(c1.y);
#pragma unroll
                for (int q = 0; q < GPS; q++) {
                    // this thread's fragments in the staged step
                    const u32 xa = xst + (u32)(s % QMM_XD) * XSTAGE + xrs;
                    auto lds = [&](int j, int wi) { return lds128(xa + j * 8 * QMM_XROWW * 4 + wi * 16); };
                    // fragments of x rows at or past 2 m (hi and lo of each input row) are zero rows: not
                    // loaded (one input row fills 2 of a tile's 8: loading them all read 4 times the x needed)
                    auto ldg = [&](int j, int wi) {
                        return 8 * j + g < 2 * m ? __ldg((const uint4*)(xr + j * xt + p * 32 + wi * 4))
                                                 : make_uint4(0u, 0u, 0u, 0u);
                    };
                    // groups of 32: word q is group q's; else both words are the step's group
                    constexpr int W0 = 0, WN = GS == 32 ? 1 : 2;
                    if (q == 0) {
                        if constexpr (SX) qmm_mmas<NT, W0, WN>(d, a, b, lds);
                        else qmm_mmas<NT, W0, WN>(d, a, b, ldg);
                    } else {
                        if constexpr (SX) qmm_mmas<NT, 1, 1>(d, a, b, lds);
                        else qmm_mmas<NT, 1, 1>(d, a, b, ldg);
                    }
                    // a group ends here: apply its scale and bias
                    if ((s + 1) % SPG == 0) {
                        const int grp = (s * 64 + q * 32) / GS;
                        const float f0 = sb_val<SDT>(cs[4 * q + 0]), f1 = sb_val<SDT>(cs[4 * q + 2]);
                        const float bb0 = sb_val<SDT>(cs[4 * q + 1]) - 128.f * f0;
                        const float bb1 = sb_val<SDT>(cs[4 * q + 3]) - 128.f * f1;
#pragma unroll
                        for (int j = 0; j < NT; j++) {
                            const float X = xs[(long long)grp * xsm + j * 4 + t];
                            acc[j][0] = fmaf(f0, d[j][0] + d[j][1], fmaf(bb0, X, acc[j][0]));
                            acc[j][1] = fmaf(f1, d[j][2] + d[j][3], fmaf(bb1, X, acc[j][1]));
#pragma unroll
                            for (int i = 0; i < 4; i++) d[j][i] = 0.f;
                        }
                    }
                }
                if constexpr (LATE) {
                    if (s + QMM_DEPTH < s1) QMM_LOAD(p, p);
                }
            }
        }
        advance();
        xr += QMM_DEPTH * 32;
    }
#undef QMM_LOAD

    // the k slices of a row tile meet in shared memory; slice 0 adds the others in order
    if (kin > 1) {
        extern __shared__ float red[];   // [QMM_WARPS][NT * 2][32]
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int i = 0; i < 2; i++) red[(wid * NT * 2 + j * 2 + i) * 32 + lane] = acc[j][i];
        __syncthreads();
        if (ks == 0) {
            for (int o = 1; o < ksw; o++)
#pragma unroll
                for (int j = 0; j < NT; j++)
#pragma unroll
                    for (int i = 0; i < 2; i++) acc[j][i] += red[((wid + o) * NT * 2 + j * 2 + i) * 32 + lane];
        }
    }
    if ((kgrid > 0 || ks == 0) && tile_ok) {
        if (kgrid > 1) out += (long long)blockIdx.y * m * n;
#pragma unroll
        for (int j = 0; j < NT; j++) {
            const int r = j * 4 + t;
            if (r < m) {
                const long long o = (long long)(orow ? orow[r] : r) * n;
                out[o + row0] = acc[j][0];
                out[o + row1] = acc[j][1];
            }
        }
    }
}

// The scale dtype (0 f32, 1 f16, 2 bf16) as a template argument: a run-time
// dtype cost a branch and a second predicated load per scale.
#define QMM_SDT(CALL_WITH_S)                          \
    do {                                              \
        if (sdt == 0) {                               \
            constexpr int S = 0;                      \
            CALL_WITH_S;                              \
        } else if (sdt == 1) {                        \
            constexpr int S = 1;                      \
            CALL_WITH_S;                              \
        } else {                                      \
            constexpr int S = 2;                      \
            CALL_WITH_S;                              \
        }                                             \
    } while (0)
#define QMM_ARGS                                                                                                   \
    const u32 *__restrict__ w, const void *__restrict__ sc, const void *__restrict__ bi, const u32 *__restrict__ xb, \
        const float *__restrict__ xs, float *__restrict__ out, int n, int k, int m, int sdt, int ksw
#define QMM(GS, NT, MINB)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256, MINB) qmm4_g##GS##_n##NT(QMM_ARGS) {                         \
        FB_PROLOGUE_DEFERRED();                                                                                    \
        QMM_SDT((qmm_impl<GS, NT, false, S>(w, sc, bi, xb, xs, 4 * NT, out, nullptr, n, k, m, ksw, 0)));         \
    }
// qmms4_*: the same product with x staged in shared memory for 8 row tiles and
// the k slices as blocks (grid: row blocks x ksw; QmmStage<NT>::BYTES of dynamic
// shared memory; with ksw > 1, out holds ksw partials of m x n for qmm_ksum)
#define QMMS(GS, NT, MINB)                                                                                         \
    extern "C" __global__ void __launch_bounds__(256, MINB) qmms4_g##GS##_n##NT(QMM_ARGS) {                        \
        FB_PROLOGUE_DEFERRED();                                                                                    \
        QMM_SDT((qmm_impl<GS, NT, true, S>(w, sc, bi, xb, xs, 4 * NT, out, nullptr, n, k, m, 1, ksw)));          \
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

// MoE grouping for the grouped launches below. The pairs = m * slots (row,
// slot) entries of ids, sorted by expert into `order` (the pairs of expert 0,
// then of expert 1, ...; -1 after the last valid one), cut into chunks of at
// most 32 pairs of one expert: chunk c is table[1 + 4c ..] = (expert, first
// index into order, pairs), and table[0] is the chunk count. A pair whose
// expert is outside [0, experts) gets a zero output row here. The order
// within an expert follows the atomics, and no result depends on it: a row's
// product does not depend on the other rows of its tile.
#define QMM_GROUP_MAX_EXPERTS 1024
extern "C" __global__ void __launch_bounds__(1024) qmm_group(const int* __restrict__ ids, int pairs, int experts,
                                                             int* __restrict__ order, int* __restrict__ table,
                                                             float* __restrict__ out, int n) {
    FB_PROLOGUE();
    __shared__ int cnt[QMM_GROUP_MAX_EXPERTS], first[QMM_GROUP_MAX_EXPERTS], chunk0[QMM_GROUP_MAX_EXPERTS];
    __shared__ int valid;
    for (int e = threadIdx.x; e < experts; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int e = ids[p];
        if (e >= 0 && e < experts) {
            atomicAdd(&cnt[e], 1);
        } else {
            for (int c = 0; c < n; c++) out[(long long)p * n + c] = 0.f;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int s = 0, c = 0;
        for (int e = 0; e < experts; e++) {
            first[e] = s, chunk0[e] = c;
            s += cnt[e], c += (cnt[e] + 31) / 32;
        }
        table[0] = c;
        valid = s;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
        for (int j = 0; 32 * j < cnt[e]; j++) {
            int* t = table + 1 + 4 * (chunk0[e] + j);
            t[0] = e, t[1] = first[e] + 32 * j, t[2] = min(32, cnt[e] - 32 * j), t[3] = 0;
        }
        cnt[e] = 0;   // from here: pairs placed
    }
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int e = ids[p];
        if (e >= 0 && e < experts) order[first[e] + atomicAdd(&cnt[e], 1)] = p;
    }
    for (int r = valid + threadIdx.x; r < pairs; r += blockDim.x) order[r] = -1;
}

// The grouped (MoE) product: block row blockIdx.y is chunk blockIdx.y of
// qmm_group's table (blocks past the chunk count return at once); its pairs'
// rows of xb (qmm_prep with `order`) against the chunk's expert, each output
// row to its pair's row of out [pairs, n]. w_estride: u32 words per expert;
// sb_estride: scale (and bias) elements per expert. The staged kernels take
// ksw = 1 and QmmStage<NT>::BYTES of dynamic shared memory.
#define QMME_ARGS                                                                                                  \
    const u32 *__restrict__ w, const void *__restrict__ sc, const void *__restrict__ bi, const u32 *__restrict__ xb, \
        const float *__restrict__ xs, int xsm, float *__restrict__ out, const int *__restrict__ order,              \
        const int *__restrict__ table, int n, int k, int sdt, int ksw, long long w_estride, long long sb_estride
#define QMME_KERNEL(NAME, SX, GS, NT, MINB)                                                                        \
    extern "C" __global__ void __launch_bounds__(256, MINB) NAME(QMME_ARGS) {                                      \
        FB_PROLOGUE_DEFERRED();                                                                                    \
        fb_grid_wait();                                                                                            \
        if ((int)blockIdx.y >= table[0]) return;                                                                   \
        const int* t = table + 1 + 4 * blockIdx.y;                                                                 \
        const int e = t[0], first = t[1], rows = t[2];                                                             \
        const long long sbo = (long long)e * sb_estride * (sdt == 0 ? 4 : 2);                                      \
        QMM_SDT((qmm_impl<GS, NT, SX, S>(w + e * w_estride, (const char*)sc + sbo, (const char*)bi + sbo,         \
                                         xb + (long long)first * k, xs + first, xsm, out, order + first, n, k,    \
                                         rows, ksw, 0)));                                                         \
    }
// qmme4_*: x read by each warp (k split from the shape); qmmx4_*: x staged (ksw = 1)
#define QMME(GS, NT, MINB)                                                  \
    QMME_KERNEL(qmme4_g##GS##_n##NT, false, GS, NT, MINB)                   \
    QMME_KERNEL(qmmx4_g##GS##_n##NT, true, GS, NT, MINB)
QMME(32, 1, 2)
QMME(32, 2, 1)
QMME(32, 4, 1)
QMME(32, 8, 1)
QMME(64, 1, 2)
QMME(64, 2, 2)
QMME(64, 4, 1)
QMME(64, 8, 1)
QMME(128, 1, 2)
QMME(128, 2, 2)
QMME(128, 4, 1)
QMME(128, 8, 1)

QMMS(32, 1, 2)
QMMS(32, 2, 1)
QMMS(32, 4, 1)
QMMS(32, 8, 1)
QMMS(64, 1, 2)
QMMS(64, 2, 2)
QMMS(64, 4, 1)
QMMS(64, 8, 1)
QMMS(128, 1, 2)
QMMS(128, 2, 2)
QMMS(128, 4, 1)
QMMS(128, 8, 1)

// out[i] = part[0][i] + part[1][i] + ... in slice order (the order in which
// the k-split warps of qmm4_* add: the same bits), total = m n.
extern "C" __global__ void __launch_bounds__(256) qmm_ksum(const float* __restrict__ part, float* __restrict__ out,
                                                          int slices, int total) {
    FB_PROLOGUE();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        float a = part[i];
        for (int o = 1; o < slices; o++) a += part[(long long)o * total + i];
        out[i] = a;
    }
}
