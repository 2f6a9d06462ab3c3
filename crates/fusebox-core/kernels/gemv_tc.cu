// gemv_tc.cu: the int_dot GEMV's products (gemv.cuh, 4-bit affine weights) for
// 2 to 16 input rows on the tensor cores, each row bitwise what the one-row
// decode GEMV computes for it.
//
// Why: a speculative verify pass scores k + 1 rows and must reproduce plain
// decoding's bits, and the GEMV's own multi-row kernels are bound by the SM's
// integer pipes (8 rows cost 4-6x one row). What makes the same bits
// possible: the int_dot GEMV's per-unit dot product (32 weight values q
// against x quantized to int16 per unit) is an exact integer, whoever
// computes it. Here it is two int8 MMAs (x = 256 hi + lo: hi signed, lo
// unsigned; q unsigned), and the float work after it is the GEMV's, in the
// GEMV's order:
//   per lane slot l (unit u = 32 s + l of step s) and k slice (the steps of
//   each x window dealt round robin over `ksplit` slices, as gemv_impl deals
//   them to warps): acc = fmaf(scale * sx, (float)d, fmaf(bias, X, acc)) over
//   the slot's units in k order;
//   per slice: the warp butterfly's tree over the 32 slots ((l + l^16), then
//   ^8, ^4, ^2, ^1);
//   over slices: ((0 + slice 0) + slice 1) + ...; one slice: slice 0 as is.
// The launcher passes the one-row launch's plan (ksplit, kw), so every output
// equals the decode GEMV's.
//
// Layout. gemv_tc_x quantizes the x rows once per launch (quant_x_unit, as
// the GEMV stages them) into the MMA's B fragments: per unit and tile of 8 x
// rows, lane (g, t) holds x row g's values 8t..8t+7 as {hi of 0,2,4,6; hi of
// 1,3,5,7; lo of 0,2,4,6; lo of 1,3,5,7}; the unit's k order is the low
// nibbles of words 0..3, then the high ones, so the A fragment (16 weight rows
// x 32 values, u8) of thread (g, t) is word t of rows g and g + 8, masked.
// The main kernel: a block owns 16 NT weight rows and all 32 slots (8 warps of
// 4 slots) and walks the slices in turn; after each slice the warps' per-slot
// sums meet in shared memory for the butterfly.

#include "common.cuh"
#include "gemv.cuh"

// int8 MMAs (sm_80+): d = a (16 x 32 u8) . b (32 x 8, s8 or u8), s32.
__device__ __forceinline__ void mma_u8s8(int (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_u8u8(int (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One level of the warp butterfly over 32 slot values (value l meets l + O).
template <int O> __device__ __forceinline__ void butterfly_level(float (&v)[32]) {
#pragma unroll
    for (int l = 0; l < O; l++) v[l] = v[l] + v[l + O];
}

// x[m, k] (rows 16-byte aligned) -> xq[(u * mx + tile) * 32 + lane] (B
// fragments, above) and xs[u * 8 mx + row] = (scale, sum) of each unit, for
// rows < 8 mx (rows >= m: zeros). One thread per (unit, row).
extern "C" __global__ void gemv_tc_x(const float* __restrict__ x, int m, int k, int mx, uint4* __restrict__ xq,
                                     float2* __restrict__ xs) {
    FB_PROLOGUE();
    const int nunits = k / 32, rows = 8 * mx;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < nunits * rows; i += gridDim.x * blockDim.x) {
        const int u = i / rows, row = i - u * rows;
        int q[32];
        float scale = 0.f, sum = 0.f;
        if (row < m) {
            quant_x_unit<32>(x + (long long)row * k + u * 32, q, scale, sum);
        } else {
#pragma unroll
            for (int j = 0; j < 32; j++) q[j] = 0;
        }
        uint4* dst = xq + ((long long)u * mx + row / 8) * 32 + (row % 8) * 4;
#pragma unroll
        for (int t = 0; t < 4; t++) {
            u32 h[4] = {0, 0, 0, 0};
#pragma unroll
            for (int b = 0; b < 4; b++) {
                const int ev = q[8 * t + 2 * b], od = q[8 * t + 2 * b + 1];
                h[0] |= (u32)((ev >> 8) & 0xff) << (8 * b);
                h[1] |= (u32)((od >> 8) & 0xff) << (8 * b);
                h[2] |= (u32)(ev & 0xff) << (8 * b);
                h[3] |= (u32)(od & 0xff) << (8 * b);
            }
            dst[t] = make_uint4(h[0], h[1], h[2], h[3]);
        }
        xs[(long long)u * rows + row] = make_float2(scale, sum);
    }
}

// out[r, row] for r < m <= 8 MX, rows of this block: 16 NT from blockIdx.x.
// w, sc, bi, n, k, gs, sdt: the weight as the GEMV takes it (4-bit affine);
// ksplit, kw: the one-row GEMV plan's. Dynamic shared memory: 32 * 16 NT *
// 8 MX floats.
template <int MX, int NT>
__device__ __forceinline__ void gemv_tc_q4(const char* __restrict__ w, const void* __restrict__ sc,
                                           const void* __restrict__ bi, const uint4* __restrict__ xq,
                                           const float2* __restrict__ xs, float* __restrict__ out, int n, int k,
                                           int m, int gs, int sdt, int ksplit, int kw) {
    constexpr int SPW = 4, ROWS = 16 * NT, XR = 8 * MX;
    extern __shared__ float part[];  // [slot][weight row][x row]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * ROWS;
    const int nunits = k / 32, gpr = k / gs, lgs = __ffs(gs) - 1;
    const long long rowbytes = (long long)k / 2;
    const u32* wp[NT][2];
    int sbi[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int row = min(row0 + nt * 16 + g + 8 * h, n - 1);
            wp[nt][h] = (const u32*)(w + row * rowbytes) + t;
            sbi[nt][h] = row * gpr;
        }
    }
    // Experiments (FUSEBOX_NVRTC_DEFINES, off by default): -DFB_TC_EARLY loads the first
    // step's weight words before waiting for the previous kernel (gemv_tc_x), as the GEMV
    // core does; -DFB_TC_SB_AHEAD loads scales and biases a step ahead with the weights.
#ifndef FB_TC_EARLY
    fb_grid_wait();
#endif
    constexpr int PAIRS = (ROWS * XR + 255) / 256;  // (weight row, x row) pairs a thread sums up
    float tot[PAIRS];
#pragma unroll
    for (int i = 0; i < PAIRS; i++) tot[i] = 0.f;
    for (int kp = 0; kp < ksplit; kp++) {
        float acc[SPW][NT][MX][4];
#pragma unroll
        for (int j = 0; j < SPW; j++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int mx = 0; mx < MX; mx++)
#pragma unroll
                    for (int i = 0; i < 4; i++) acc[j][nt][mx][i] = 0.f;
        // this slice's steps in order: s from sw0 + kp by ksplit within each
        // window [w0, w0 + kw) (gemv_impl's order); -1 past the last
        auto window_first = [&](int w) {
            for (; w < k; w += kw) {
                const int s0 = (w >> 10) + kp, s1 = (min(w + kw, k) / 32 + 31) >> 5;
                if (s0 < s1) return s0;
            }
            return -1;
        };
        auto next_step = [&](int s) {
            const int w = (s << 10) / kw * kw;  // the window holding step s
            const int s1 = (min(w + kw, k) / 32 + 31) >> 5;
            return s + ksplit < s1 ? s + ksplit : window_first(w + kw);
        };
        // weight words of a step's units (the DRAM reads), one step ahead
        u32 wv[SPW][NT][2], wn[SPW][NT][2];
        auto load_w = [&](int s, u32 (&dst)[SPW][NT][2]) {
            const int ub = s * 32 + warp * SPW;
#pragma unroll
            for (int j = 0; j < SPW; j++)
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int h = 0; h < 2; h++)
                        dst[j][nt][h] = s >= 0 && ub + j < nunits ? __ldg(wp[nt][h] + (ub + j) * 4) : 0u;
        };
        // scales and biases of a step's units
        auto load_sb = [&](int s, float (&ds)[SPW][NT][2], float (&db)[SPW][NT][2]) {
            const int ub = s * 32 + warp * SPW;
#pragma unroll
            for (int j = 0; j < SPW; j++)
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        const long long gi = sbi[nt][h] + ((min(max(ub + j, 0), nunits - 1) * 32) >> lgs);
                        ds[j][nt][h] = ld_sb(sc, gi, sdt);
                        db[j][nt][h] = ld_sb(bi, gi, sdt);
                    }
        };
        int s = window_first(0);
        load_w(s, wn);
#ifdef FB_TC_EARLY
        fb_grid_wait();  // x comes from gemv_tc_x (returns at once after the first time)
#endif
        float sv[SPW][NT][2], bv[SPW][NT][2];
#ifdef FB_TC_SB_AHEAD
        float svn[SPW][NT][2], bvn[SPW][NT][2];
        load_sb(s, svn, bvn);
#endif
        while (s >= 0) {
#pragma unroll
            for (int j = 0; j < SPW; j++)
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    wv[j][nt][0] = wn[j][nt][0];
                    wv[j][nt][1] = wn[j][nt][1];
                }
            const int cur = s, ub = cur * 32 + warp * SPW;
#ifdef FB_TC_SB_AHEAD
#pragma unroll
            for (int j = 0; j < SPW; j++)
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        sv[j][nt][h] = svn[j][nt][h];
                        bv[j][nt][h] = bvn[j][nt][h];
                    }
            s = next_step(s);
            load_w(s, wn);
            load_sb(s, svn, bvn);
#else
            s = next_step(s);
            load_w(s, wn);
            // scales and biases of the step's units (L1/L2), before any product
            load_sb(cur, sv, bv);
#endif
#pragma unroll
            for (int mx = 0; mx < MX; mx++) {
                // this x tile's fragments and (scale, sum) of rows 2t, 2t + 1 for the step's units
                uint4 b[SPW];
                float4 sX[SPW];
#pragma unroll
                for (int j = 0; j < SPW; j++) {
                    const int u = min(ub + j, nunits - 1);
                    b[j] = __ldg(xq + ((long long)u * MX + mx) * 32 + lane);
                    sX[j] = __ldg((const float4*)(xs + (long long)u * XR + mx * 8 + 2 * t));
                }
#pragma unroll
                for (int j = 0; j < SPW; j++) {
                    if (ub + j >= nunits) continue;  // uniform over the warp
#pragma unroll
                    for (int nt = 0; nt < NT; nt++) {
                        const u32 a[4] = {wv[j][nt][0] & 0x0f0f0f0fu, wv[j][nt][1] & 0x0f0f0f0fu,
                                          (wv[j][nt][0] >> 4) & 0x0f0f0f0fu, (wv[j][nt][1] >> 4) & 0x0f0f0f0fu};
                        int dh[4] = {0, 0, 0, 0}, dl[4] = {0, 0, 0, 0};
                        mma_u8s8(dh, a, b[j].x, b[j].y);
                        mma_u8u8(dl, a, b[j].z, b[j].w);
#pragma unroll
                        for (int i = 0; i < 4; i++) {
                            const int d = dh[i] * 256 + dl[i];
                            const float sw = sv[j][nt][i >> 1], bw = bv[j][nt][i >> 1];
                            const float sx = (i & 1) ? sX[j].z : sX[j].x, X = (i & 1) ? sX[j].w : sX[j].y;
                            acc[j][nt][mx][i] = fmaf(sw * sx, (float)d, fmaf(bw, X, acc[j][nt][mx][i]));
                        }
                    }
                }
            }
        }
        // the slice's per-slot sums -> shared memory (c0, c1: weight row g, x rows
        // 2t, 2t + 1; c2, c3: weight row g + 8)
#pragma unroll
        for (int j = 0; j < SPW; j++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int mx = 0; mx < MX; mx++)
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        const int slot = warp * SPW + j, r = nt * 16 + g + 8 * (i >> 1), c = mx * 8 + 2 * t + (i & 1);
                        part[(slot * ROWS + r) * XR + c] = acc[j][nt][mx][i];
                    }
        __syncthreads();
        // the butterfly's tree over the 32 slots, then the slices in order
#pragma unroll
        for (int pi = 0; pi < PAIRS; pi++) {
            const int p = threadIdx.x + pi * 256;
            if (p >= ROWS * XR) break;
            float v[32];
#pragma unroll
            for (int l = 0; l < 32; l++) v[l] = part[l * ROWS * XR + p];
            butterfly_level<16>(v);
            butterfly_level<8>(v);
            butterfly_level<4>(v);
            butterfly_level<2>(v);
            butterfly_level<1>(v);
            tot[pi] = ksplit == 1 ? v[0] : tot[pi] + v[0];
        }
        __syncthreads();
    }
#pragma unroll
    for (int pi = 0; pi < PAIRS; pi++) {
        const int p = threadIdx.x + pi * 256, r = p / XR, c = p % XR;
        if (p < ROWS * XR && row0 + r < n && c < m) out[(long long)c * n + row0 + r] = tot[pi];
    }
}

#define GEMV_TC_ARGS                                                                                             \
    const char *__restrict__ w, const void *__restrict__ sc, const void *__restrict__ bi,                        \
        const uint4 *__restrict__ xq, const float2 *__restrict__ xs, float *__restrict__ out, int n, int k, int m, \
        int gs, int sdt, int ksplit, int kw
#define GEMV_TC_PASS w, sc, bi, xq, xs, out, n, k, m, gs, sdt, ksplit, kw
// up to 8 (x8) and up to 16 (x16) input rows; 32 weight rows a block, or 16 (n1)
#define GEMV_TC(NAME, MX, NT, MINB)                                                    \
    extern "C" __global__ void __launch_bounds__(256, MINB) NAME(GEMV_TC_ARGS) { \
        FB_PROLOGUE_DEFERRED();                                                    \
        gemv_tc_q4<MX, NT>(GEMV_TC_PASS);                                          \
    }
GEMV_TC(gemv_tc_q4_x8, 1, 2, 1)
GEMV_TC(gemv_tc_q4_x16, 2, 2, 1)
GEMV_TC(gemv_tc_q4_x8n1, 1, 1, 2)
GEMV_TC(gemv_tc_q4_x16n1, 2, 1, 1)
