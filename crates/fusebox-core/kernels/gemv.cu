// gemv.cu: out[m, n] = x[m, k] @ w[n, k]^T for small m (the decode GEMV,
// m <= 8 input rows per launch), the same for MoE experts (one (row, slot)
// pair per grid.y, the expert id read from device memory), and weight
// dequantization (embedding rows; the cuBLAS prefill operand).
//
// Weight formats (FMT):
//   0 f32, 1 f16, 2 bf16: dense rows of k values;
//   3..8: MLX affine with 2, 3, 4, 5, 6, 8 bits: each row is a little-end-first
//   bit stream of k values in u32 words, value i = scale[g] * q_i + bias[g]
//   with g = i / gs (gs = 32, 64 or 128);
//   9: 6-bit affine with gs = 16 (the layout GGUF Q6_K is converted to).
//
// Work split. A lane owns "units" of LU values of a row (one 16-byte vector
// for dense rows; 32 values = 4*bits bytes for affine, 16 for 8-bit), so
// consecutive lanes read consecutive bytes; a step is 32 units. A warp owns
// gw consecutive groups of R output rows and one of `ksplit` slices of their
// steps (slices of a row group sit in one block and meet in shared memory;
// gw > 1 only when ksplit == 1), and walks its tasks (one step of R rows)
// through a D-stage ring in shared memory: cp.async copies each lane's own
// weight words (and raw scale/bias words) D-1 tasks ahead, so loads stay in
// flight without holding registers, and a lane only ever reads what it copied
// itself (no barrier between the warp's lanes).
//
// x: affine formats stage kw values of each input row in shared memory (by
// cp.async, padded by 4 floats every 32 so lanes reading 32 consecutive
// values do not collide in banks) with the sum of every 32 (or 16) values,
// all reused by every row of the block; dense formats read x through the L1.
//
// Affine dot products take q as an exact float f = a + q * 2^-p (bits placed
// in the mantissa by one shift and one mask, or by one byte permute for
// 4-bit), so with X = sum of x over the unit:
//   sum (s q + b) x = (s 2^p) sum f x + (b - a s 2^p) X,      f32 throughout.
// The cancellation costs a few bits (4-bit, f = 0.5 + q/256: about 1e-5
// relative error against the CPU's s*q+b; the others about 1e-6).
//
// Where the time goes (H200, m = 1): bf16 runs at 72-100% of copy bandwidth
// from 4096x4096 up; 4-bit reaches 28-61% of copy, bound by the SM's integer
// (PRMT/LOP3) and bookkeeping instructions on some shapes (ncu: issue slots
// 65% busy, math-pipe throttle) and by latency on others: on 4096x12288 the
// plan leaves one block of 8 warps per SM, which issues on 40% of cycles with
// DRAM at 30% (docs/benchmark_results/qmm-one-row-h200-2026-12-06.md).
#include "common.cuh"
#include "gemv.cuh"

#define GEMV_ARGS                                                                                                  \
    const char *__restrict__ w, const void *__restrict__ sc, const void *__restrict__ bi,                          \
        const float *__restrict__ x, float *__restrict__ out, const int *__restrict__ ids, int n, int k, int m,   \
        int gs, int sdt, int ksplit, int x_div, int pairs, int experts, long long w_estride, long long sb_estride, \
        int kw, int gw, int smem
#define GEMV_PASS \
    w, sc, bi, x, out, ids, n, k, m, gs, sdt, ksplit, x_div, pairs, experts, w_estride, sb_estride, kw, gw, smem
#define GEMV_PASS_PLAIN                                                                                          \
    w, sc, bi, x, RowsOut{out, n}, ids, n, k, m, gs, sdt, ksplit, x_div, pairs, experts, w_estride, sb_estride, kw, \
        gw, smem, blockIdx.x
// NAME_m1: one input row; NAME_m2, NAME_m4, NAME_mn: up to 2, 4, 8 (m at run time).
#define GEMV(NAME, FMT)                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 2) NAME##_m1(GEMV_ARGS) { FB_PROLOGUE_DEFERRED(); gemv_impl<FMT, 1>(GEMV_PASS_PLAIN); } \
    extern "C" __global__ void __launch_bounds__(256, 2) NAME##_m2(GEMV_ARGS) { FB_PROLOGUE_DEFERRED(); gemv_impl<FMT, 2>(GEMV_PASS_PLAIN); } \
    extern "C" __global__ void __launch_bounds__(256, 2) NAME##_m4(GEMV_ARGS) { FB_PROLOGUE_DEFERRED(); gemv_impl<FMT, 4>(GEMV_PASS_PLAIN); } \
    extern "C" __global__ void __launch_bounds__(256, 1) NAME##_mn(GEMV_ARGS) { FB_PROLOGUE_DEFERRED(); gemv_impl<FMT, 8>(GEMV_PASS_PLAIN); }
GEMV(gemv_f32, 0)
GEMV(gemv_f16, 1)
GEMV(gemv_bf16, 2)
GEMV(gemv_q2, 3)
GEMV(gemv_q3, 4)
GEMV(gemv_q4, 5)
GEMV(gemv_q5, 6)
GEMV(gemv_q6, 7)
GEMV(gemv_q8, 8)
GEMV(gemv_q6g16, 9)
// the int_dot site: 4- and 8-bit affine weights through integer dot products
GEMV(gemv_q4i, 21)
GEMV(gemv_q8i, 24)

// Dense rows whose starts are not 16-byte aligned (k not a multiple of the
// vector width): a warp per output row, scalar loads, up to 8 input rows.
// Same arguments as the vector kernels (sc, bi, gs, sdt, ksplit unused).
template <int T>
__device__ __forceinline__ void gemv_scalar_impl(GEMV_ARGS) {
    const int lane = threadIdx.x & 31;
    const int gwarp = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), nw = gridDim.x * (blockDim.x >> 5);
    const typename Elem<T>::t* wt = (const typename Elem<T>::t*)w;
    for (int p = blockIdx.y; p < pairs; p += gridDim.y) {
        const int e = ids ? __ldg(ids + p) : 0;
        const bool ok = e >= 0 && e < experts;
        const float* xb = x + (long long)(p / x_div) * k;
        for (int row = gwarp; row < n; row += nw) {
            float acc[8];
#pragma unroll
            for (int mm = 0; mm < 8; mm++) acc[mm] = 0.f;
            if (ok) {
                const long long wo = (long long)e * (w_estride / (long long)sizeof(typename Elem<T>::t)) + (long long)row * k;
                for (int i = lane; i < k; i += 32) {
                    const float wv = Elem<T>::load(wt, wo + i);
#pragma unroll
                    for (int mm = 0; mm < 8; mm++)
                        if (mm < m) acc[mm] = fmaf(wv, __ldg(xb + (long long)mm * k + i), acc[mm]);
                }
            }
#pragma unroll
            for (int mm = 0; mm < 8; mm++) {
                if (mm < m) {
                    const float v = warp_sum(acc[mm]);
                    if (lane == 0) out[(long long)(p + mm) * n + row] = ok ? v : 0.f;
                }
            }
        }
    }
}
extern "C" __global__ void __launch_bounds__(256) gemv_scalar_f32(GEMV_ARGS) {
    FB_PROLOGUE();
    gemv_scalar_impl<0>(GEMV_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv_scalar_f16(GEMV_ARGS) {
    FB_PROLOGUE();
    gemv_scalar_impl<1>(GEMV_PASS);
}
extern "C" __global__ void __launch_bounds__(256) gemv_scalar_bf16(GEMV_ARGS) {
    FB_PROLOGUE();
    gemv_scalar_impl<2>(GEMV_PASS);
}

// Element `col` of weight row `row` (dense dtype dt >= 0, else affine), as
// the CPU dequantizes it: scale * q + bias, rounded after each step.
__device__ __forceinline__ float dequant_at(const char* w, const void* sc, const void* bi, int dt, int bits, int gs,
                                            int sdt, long long row, int k, int col) {
    if (dt >= 0) return load_any(w, dt, row * k + col);
    const u32* q = (const u32*)(w + row * ((long long)k * bits / 8));
    const int bit = col * bits, wi = bit >> 5, o = bit & 31;
    u32 v = __ldg(q + wi) >> o;
    if (o + bits > 32) v |= __ldg(q + wi + 1) << (32 - o);
    v &= (1u << bits) - 1u;
    const long long g = row * (k / gs) + col / gs;
    return __fadd_rn(__fmul_rn(ld_sb(sc, g, sdt), (float)v), ld_sb(bi, g, sdt));
}

// 8 dequantized values to out[e0..e0 + 8] (16-byte aligned), f32 or bf16.
__device__ __forceinline__ void store8(void* __restrict__ out, long long e0, const float (&v)[8], int out_bf16) {
    if (out_bf16) {
        uint4 o;
        o.x = (u32)f32_to_bf16(v[0]) | ((u32)f32_to_bf16(v[1]) << 16);
        o.y = (u32)f32_to_bf16(v[2]) | ((u32)f32_to_bf16(v[3]) << 16);
        o.z = (u32)f32_to_bf16(v[4]) | ((u32)f32_to_bf16(v[5]) << 16);
        o.w = (u32)f32_to_bf16(v[6]) | ((u32)f32_to_bf16(v[7]) << 16);
        *(uint4*)((bf16_t*)out + e0) = o;
    } else {
        float4* o = (float4*)((float*)out + e0);
        o[0] = make_float4(v[0], v[1], v[2], v[3]);
        o[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
}

// dequant_rows for 4- and 8-bit affine rows (k % 8 == 0, nrows * k / 8 < 2^32;
// dequant_rows' arguments, dt and bits unused):
// a thread's 8 values are one u32 (4-bit) or two (8-bit) of its row and share
// one group, so it loads the scale and bias once and divides in 32 bits. The
// generic kernel spends two 64-bit divisions, a division by gs and a scale and
// bias load per value, and ran at about a fifth of the copy bandwidth (H100,
// Qwen3-8B 4-bit prefill: 32 of its 79 ms, Nsight Compute). Same values, same
// bits: s * q + b rounded as dequant_at rounds them.
template <int BITS>
__device__ __forceinline__ void dequant_affine_rows(const char* __restrict__ w, const void* __restrict__ sc,
                                                    const void* __restrict__ bi, int gs, int sdt,
                                                    const int* __restrict__ ids, int nrows, int k, int vocab,
                                                    void* __restrict__ out, int out_bf16) {
    const unsigned cpr = (unsigned)k / 8u, chunks = (unsigned)nrows * cpr;
    const int gpr = k / gs;
    for (unsigned c = blockIdx.x * blockDim.x + threadIdx.x; c < chunks; c += gridDim.x * blockDim.x) {
        const unsigned r = c / cpr;
        const int col = (int)(c - r * cpr) * 8;
        const int row = ids ? __ldg(ids + r) : (int)r;
        float v[8];
        if (row >= 0 && row < vocab) {
            const long long g = (long long)row * gpr + col / gs;
            const float s = ld_sb(sc, g, sdt), b = ld_sb(bi, g, sdt);
            const char* rp = w + (long long)row * ((long long)k * BITS / 8) + col * BITS / 8;
            if (BITS == 4) {
                const u32 x = __ldg((const u32*)rp);
#pragma unroll
                for (int i = 0; i < 8; i++) v[i] = __fadd_rn(__fmul_rn(s, (float)((x >> (4 * i)) & 15u)), b);
            } else {
                const uint2 x = __ldg((const uint2*)rp);
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    v[i] = __fadd_rn(__fmul_rn(s, (float)((x.x >> (8 * i)) & 255u)), b);
                    v[4 + i] = __fadd_rn(__fmul_rn(s, (float)((x.y >> (8 * i)) & 255u)), b);
                }
            }
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) v[i] = 0.f;
        }
        const long long e0 = (long long)c * 8;
        store8(out, e0, v, out_bf16);
    }
}
#define DEQUANT_AFFINE(NAME, BITS)                                                                                 \
    extern "C" __global__ void NAME(const char* __restrict__ w, const void* __restrict__ sc,                        \
                                    const void* __restrict__ bi, int dt, int bits, int gs, int sdt,                 \
                                    const int* __restrict__ ids, int nrows, int k, int vocab,                       \
                                    void* __restrict__ out, int out_bf16) {                                         \
        FB_PROLOGUE();                                                                                             \
        dequant_affine_rows<BITS>(w, sc, bi, gs, sdt, ids, nrows, k, vocab, out, out_bf16);                        \
    }
DEQUANT_AFFINE(dequant_rows_q4, 4)
DEQUANT_AFFINE(dequant_rows_q8, 8)

// out[r, :] = row (ids ? ids[r] : r) of the weight, dequantized, for r <
// nrows; rows outside [0, vocab) give zeros. out is f32, or bf16 when
// out_bf16. Each thread writes 8 consecutive values when k % 8 == 0.
extern "C" __global__ void dequant_rows(const char* __restrict__ w, const void* __restrict__ sc,
                                        const void* __restrict__ bi, int dt, int bits, int gs, int sdt,
                                        const int* __restrict__ ids, int nrows, int k, int vocab, void* __restrict__ out,
                                        int out_bf16) {
    FB_PROLOGUE();
    const int per = (k % 8 == 0) ? 8 : 1;
    const long long chunks = (long long)nrows * k / per;
    for (long long c = blockIdx.x * (long long)blockDim.x + threadIdx.x; c < chunks;
         c += (long long)gridDim.x * blockDim.x) {
        const long long e0 = c * per;
        const int r = (int)(e0 / k), col = (int)(e0 - (long long)r * k);
        const int row = ids ? __ldg(ids + r) : r;
        const bool ok = row >= 0 && row < vocab;
        if (per == 8) {
            float v[8];
#pragma unroll
            for (int i = 0; i < 8; i++) v[i] = ok ? dequant_at(w, sc, bi, dt, bits, gs, sdt, row, k, col + i) : 0.f;
            store8(out, e0, v, out_bf16);
        } else {
            const float v = ok ? dequant_at(w, sc, bi, dt, bits, gs, sdt, row, k, col) : 0.f;
            if (out_bf16) ((bf16_t*)out)[e0] = f32_to_bf16(v);
            else ((float*)out)[e0] = v;
        }
    }
}
