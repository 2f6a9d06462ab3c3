// attention_tc.cu: the prefill blocks of attention.cu (64 query vectors of one kv head) on the tensor cores,
// mma.sync m16n8k16 bf16 x bf16 -> f32, in the FlashAttention-2 layout: each of the 4 warps owns 16 query
// vectors (one MMA row tile) and keeps their scores, online softmax (f32, log2 domain) and output
// accumulators in registers; only the K/V tiles (64 keys, cp.async, two stages) go through shared memory.
// Same arguments, block packing, key splits and partials as attn_d<D>_q64 (attn_combine merges them), so the
// launch differs only in the kernel name and its shared memory.
//
// Numbers. K and V are exact in bf16 (the cache's type). The f32 operands, the scaled queries and the
// probabilities, each enter as two bf16 terms, hi = bf16(x) and lo = bf16(x - hi) (about 16 bits of mantissa
// together), and both terms multiply the same K or V fragment into one f32 accumulator: bf16 alone is 1e-3 to
// 4e-3 relative off exact attention, hi + lo 2e-6 to 7e-6 (tools/emulate/attention_tc_precision.py, at scales up
// to 16/sqrt(d); the tests' bar is 2e-5). The softmax sum l adds the f32 probabilities.
//
// Fragments (lane = 4 gq + tq). S = Q K^T: Q is the A operand (rows = query vectors, k = dims), loaded once
// from global memory; K's B fragments (k = dims, n = keys) come straight from the [key][dim] tile rows by
// ldmatrix. O += P V: the C fragments of S for keys 16j..16j+15 are the A fragment of key step j as they
// are (rows gq, gq + 8; keys 2tq, 2tq + 1, and + 8); V's B fragments (k = keys, n = dims) by ldmatrix.trans.
// A K/V row is D + 8 bf16 (row stride = 16 mod 128 bytes), so the 8 rows of an ldmatrix phase hit distinct
// banks.
#include "common.cuh"
#include "attn.cuh"

#define TC_THREADS 128
#define TC_Q 64   // query vectors per block (4 warps x 16)
#define TC_TK 64  // keys per tile

__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
// (x0, x1) as the bf16 pairs hi (x0 in the low half) and lo (the remainders), round to nearest even
__device__ __forceinline__ void split_hi_lo(float x0, float x1, u32& hi, u32& lo) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(hi) : "f"(x1), "f"(x0));
    const float r0 = x0 - __uint_as_float(hi << 16), r1 = x1 - __uint_as_float(hi & 0xffff0000u);
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(lo) : "f"(r1), "f"(r0));
}

template <int D> struct TcCfg {
    static constexpr int KROW = D + 8;       // smem K/V row (bf16)
    static constexpr int DC = D / 8;         // 16-byte chunks of a row
    static constexpr int KSTEPS = D / 16;    // MMA k steps over the dims (S = Q K^T)
    static constexpr int NTD = D / 8;        // 8-dim column tiles of O
    static constexpr int NTK = TC_TK / 8;    // 8-key column tiles of S
    static constexpr int KV_BYTES = 2 * 2 * TC_TK * KROW * 2;
    static constexpr int SMEM = KV_BYTES + TC_Q * 4;
    static_assert(KSTEPS % 2 == 0 && NTD % 2 == 0, "ldmatrix.x4 takes two k steps / two column tiles");
};

// Arguments as attn_body (attention.cu).
template <int D>
__device__ __forceinline__ void attn_tc_body(const float* __restrict__ q, const bf16_t* __restrict__ kc,
                                             const bf16_t* __restrict__ vc, const int* __restrict__ positions,
                                             float* __restrict__ out, float* __restrict__ part_acc,
                                             float* __restrict__ part_ml, int m, int heads, int kvh, int d, int cap,
                                             float scale_log2, int aligned, int row_tiles) {
    typedef TcCfg<D> C;
    extern __shared__ __attribute__((aligned(16))) unsigned char smem[];
    bf16_t* kv = (bf16_t*)smem;  // [2 stages][K, V][TK][KROW]
    int* pos_s = (int*)(smem + C::KV_BYTES);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
    const int nsplit = gridDim.x, split = blockIdx.x, g = blockIdx.y;
    const int G = heads / kvh;
    long u0, n_u;
    attn_vectors(TC_Q, m, G, row_tiles, u0, n_u);
    if (attn_smem_short(C::SMEM, TC_Q, u0, n_u, G, heads, d, out, part_acc, part_ml)) return;
    if (tid < TC_Q) pos_s[tid] = attn_position(positions, u0 + tid, n_u, G, cap);
    __syncthreads();
    int len, t_begin, t_end;
    attn_key_tiles(pos_s, TC_Q, TC_TK, len, t_begin, t_end);
    if (t_begin >= t_end) {
        attn_fill(TC_Q, u0, n_u, G, heads, d, 0.f, -INFINITY, 0.f, out, part_acc, part_ml);
        return;
    }

    // this thread's query vectors: rows gq and gq + 8 of the warp's tile
    const int qv0 = 16 * warp + gq;
    int pr[2] = {pos_s[qv0], pos_s[qv0 + 8]};
    int wmax = max(pr[0], pr[1]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) wmax = max(wmax, __shfl_xor_sync(0xffffffffu, wmax, o));

    // Q (scaled to the log2 domain) as hi/lo A fragments: [k step][a0..a3]
    u32 qh[C::KSTEPS][4], ql[C::KSTEPS][4];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const long u = u0 + qv0 + 8 * r;
        const float* qr = u < n_u ? q + ((u / G) * heads + (long)g * G + u % G) * d : nullptr;
#pragma unroll
        for (int kk = 0; kk < C::KSTEPS; kk++)
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                const int c = 16 * kk + 8 * hf + 2 * tq;
                float2 x = make_float2(0.f, 0.f);
                if (qr && c < d) x = *(const float2*)(qr + c);
                split_hi_lo(x.x * scale_log2, x.y * scale_log2, qh[kk][r + 2 * hf], ql[kk][r + 2 * hf]);
            }
    }

    float o[C::NTD][4];
#pragma unroll
    for (int i = 0; i < C::NTD; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[i][e] = 0.f;
    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};

    const long kv_row = (long)kvh * d;
    const bf16_t* kbase = kc + (long)g * d;
    const bf16_t* vbase = vc + (long)g * d;
    auto load_tile = [&](int t, int st) {
        attn_load_tile<TC_TK, C::KROW, C::DC, TC_THREADS>(kv + st * (2 * TC_TK * C::KROW), kbase, vbase, kv_row,
                                                           t * TC_TK, len, d, aligned);
    };
    // ldmatrix row addresses of this lane: matrix lane / 8, row lane % 8
    const int lm = lane >> 3, lr = lane & 7;
    const u32 k_off = (u32)((lr * C::KROW + 8 * lm) * 2);                          // K: keys lr, dims 8 lm
    const u32 v_off = (u32)(((lr + 8 * (lm & 1)) * C::KROW + 8 * (lm >> 1)) * 2);  // V: keys lr (+8), dims (+8)

    load_tile(t_begin, 0);
    cp_async_commit();
    for (int t = t_begin; t < t_end; t++) {
        const int st = attn_next_tile(t, t_begin, t_end, load_tile);
        const int kb = t * TC_TK;
        if (kb <= wmax) {  // else every key of the tile is past every position of the warp
            const u32 ks = smem_addr(kv + st * (2 * TC_TK * C::KROW));
            const u32 vs = ks + TC_TK * C::KROW * 2;
            // S = Q K^T: [key tile][c0..c3]
            float s[C::NTK][4];
#pragma unroll
            for (int j = 0; j < C::NTK; j++) {
#pragma unroll
                for (int e = 0; e < 4; e++) s[j][e] = 0.f;
#pragma unroll
                for (int kk = 0; kk < C::KSTEPS; kk += 2) {
                    u32 b0, b1, b2, b3;
                    ldsm_x4(ks + (u32)((8 * j * C::KROW + 16 * kk) * 2) + k_off, b0, b1, b2, b3);
                    mma_bf16(s[j], qh[kk][0], qh[kk][1], qh[kk][2], qh[kk][3], b0, b1);
                    mma_bf16(s[j], ql[kk][0], ql[kk][1], ql[kk][2], ql[kk][3], b0, b1);
                    mma_bf16(s[j], qh[kk + 1][0], qh[kk + 1][1], qh[kk + 1][2], qh[kk + 1][3], b2, b3);
                    mma_bf16(s[j], ql[kk + 1][0], ql[kk + 1][1], ql[kk + 1][2], ql[kk + 1][3], b2, b3);
                }
            }
            // causal mask and online softmax, per row (r = 0: vector gq, r = 1: gq + 8)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float mx = -INFINITY;
#pragma unroll
                for (int j = 0; j < C::NTK; j++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int key = kb + 8 * j + 2 * tq + e;
                        float v = key > pr[r] ? -INFINITY : s[j][2 * r + e];
                        s[j][2 * r + e] = v;
                        mx = fmaxf(mx, v);
                    }
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(m_r[r], mx);
                const float m_safe = m_new == -INFINITY ? 0.f : m_new;
                const float alpha = exp2f(m_r[r] - m_safe);
                m_r[r] = m_new;
                float sum = 0.f;
#pragma unroll
                for (int j = 0; j < C::NTK; j++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const float p = exp2f(s[j][2 * r + e] - m_safe);
                        s[j][2 * r + e] = p;
                        sum += p;
                    }
                l_r[r] = l_r[r] * alpha + sum;
#pragma unroll
                for (int i = 0; i < C::NTD; i++) {
                    o[i][2 * r] *= alpha;
                    o[i][2 * r + 1] *= alpha;
                }
            }
            // O += P V, a key step (16 keys) at a time
#pragma unroll
            for (int j2 = 0; j2 < C::NTK / 2; j2++) {
                u32 ah[4], al[4];
                split_hi_lo(s[2 * j2][0], s[2 * j2][1], ah[0], al[0]);
                split_hi_lo(s[2 * j2][2], s[2 * j2][3], ah[1], al[1]);
                split_hi_lo(s[2 * j2 + 1][0], s[2 * j2 + 1][1], ah[2], al[2]);
                split_hi_lo(s[2 * j2 + 1][2], s[2 * j2 + 1][3], ah[3], al[3]);
#pragma unroll
                for (int i = 0; i < C::NTD; i += 2) {
                    u32 b0, b1, b2, b3;
                    ldsm_x4_trans(vs + (u32)((16 * j2 * C::KROW + 8 * i) * 2) + v_off, b0, b1, b2, b3);
                    mma_bf16(o[i], ah[0], ah[1], ah[2], ah[3], b0, b1);
                    mma_bf16(o[i], al[0], al[1], al[2], al[3], b0, b1);
                    mma_bf16(o[i + 1], ah[0], ah[1], ah[2], ah[3], b2, b3);
                    mma_bf16(o[i + 1], al[0], al[1], al[2], al[3], b2, b3);
                }
            }
        }
        __syncthreads();  // the stage just read is refilled next iteration
    }

    // the row sums are quad-partial until here
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float l = l_r[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const long u = u0 + qv0 + 8 * r;
        if (u >= n_u) continue;
        const long pidx = (u / G) * heads + (long)g * G + u % G;
        if (nsplit == 1) {
#pragma unroll
            for (int i = 0; i < C::NTD; i++) {
                const int c = 8 * i + 2 * tq;
                if (c < d)
                    *(float2*)(out + pidx * d + c) =
                        l > 0.f ? make_float2(o[i][2 * r] / l, o[i][2 * r + 1] / l) : make_float2(0.f, 0.f);
            }
        } else {
            const long slot = pidx * nsplit + split;
            if (l > 0.f) {
#pragma unroll
                for (int i = 0; i < C::NTD; i++) {
                    const int c = 8 * i + 2 * tq;
                    if (c < d) *(float2*)(part_acc + slot * d + c) = make_float2(o[i][2 * r], o[i][2 * r + 1]);
                }
            }
            if (tq == 0) {
                part_ml[slot * 2] = m_r[r];
                part_ml[slot * 2 + 1] = l;
            }
        }
    }
}

#define ATTN_TC_KERNEL(D)                                                                                           \
    extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)                                                    \
        attn_tc_d##D(const float* __restrict__ q, const bf16_t* __restrict__ kc, const bf16_t* __restrict__ vc,    \
                     const int* __restrict__ positions, float* __restrict__ out, float* __restrict__ part_acc,     \
                     float* __restrict__ part_ml, int m, int heads, int kvh, int d, int cap, float scale_log2,      \
                     int aligned, int row_tiles) {                                                                 \
        FB_PROLOGUE();                                                                                             \
        attn_tc_body<D>(q, kc, vc, positions, out, part_acc, part_ml, m, heads, kvh, d, cap, scale_log2, aligned, \
                        row_tiles);                                                                                \
    }

ATTN_TC_KERNEL(64)
ATTN_TC_KERNEL(128)
