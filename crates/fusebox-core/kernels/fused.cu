// fused.cu: the fused decode kernels, one launch per site (the graph path
// runs the same arithmetic as several launches; docs/architecture.md):
//
//   qk_norm         fused_qkv_<fmt>: q, k and v projections of one token, the
//                   per-head RMSNorm of q and k (Qwen3; skipped for Llama),
//                   RoPE, q to its buffer, k and v into the KV cache;
//   rope_kv_append  rope_kv_append: the same epilogue after unfused
//                   projections (per-head norm, RoPE, KV append); it takes
//                   every row of a DFlash draft block too (dflash_attn);
//   moe             fused_moe_gateup_<fmt>: gate and up of the k selected
//                   experts and SwiGLU; fused_moe_down_<fmt>: down of each
//                   expert times its router weight, summed;
//   swiglu          fused_moe_gateup_<fmt> again, for a dense MLP (one
//                   "expert", no ids): gate and up projections and SwiGLU.
//
// The GEMV work is gemv.cuh's, planned exactly as the stand-alone launches of
// the graph path (same row split, same k split), so the products are bitwise
// those of the graph path. What the graph path does in later launches is done
// here by the block that finishes a unit last: every block writes its rows,
// fences, and adds their count to the unit's counter (a head of q or k; the
// (slot, row range) of gate/up; the row range of down); the block whose add
// completes the unit runs the epilogue for it and resets the counter to zero,
// so the counters are zero again when the launch ends (CUDA-graph replays
// reuse them). Epilogues use the graph path's formulas in the same order, so
// the fused results are bitwise equal to the graph path's.
#include "common.cuh"
#include "gemv.cuh"

// Values another block of this launch wrote: read through L2 (the L1 is not
// coherent across SMs).
__device__ __forceinline__ float ld_l2(const float* p) { return __ldcg(p); }

// One attention head by one warp: x (hd values, raw projection), optional
// per-head RMSNorm with weight w, RoPE at position pos, to dst (f32, or bf16
// when dst_bf16). sm: hd floats of this warp's shared scratch. The formulas
// and summation order are those of rms_norm_warp and rope_f32 (norm_rope.cu)
// and kv_write_bf16 (attention.cu).
template <bool L2>
__device__ __forceinline__ void finish_head(const float* x, const float* __restrict__ w, float eps, int hd, int pos,
                                            const float* __restrict__ inv_freq, int style, float* sm, void* dst,
                                            bool dst_bf16, int lane) {
    if (w) {
        float ss = 0.f;
        for (int i = lane; i < hd; i += 32) {
            const float v = L2 ? ld_l2(x + i) : x[i];
            ss += v * v;
        }
        ss = warp_sum(ss);
        const float inv = 1.0f / sqrtf(ss / hd + eps);
        for (int i = lane; i < hd; i += 32) sm[i] = w[i] * ((L2 ? ld_l2(x + i) : x[i]) * inv);
    } else {
        for (int i = lane; i < hd; i += 32) sm[i] = L2 ? ld_l2(x + i) : x[i];
    }
    __syncwarp();
    const int half = hd >> 1;
    for (int i = lane; i < half; i += 32) {
        const float a = (float)pos * inv_freq[i];
        float s, c;
        sincosf(a, &s, &c);
        const int ia = style == 0 ? i : 2 * i, ib = style == 0 ? i + half : 2 * i + 1;
        const float x0 = sm[ia], x1 = sm[ib];
        const float y0 = x0 * c - x1 * s, y1 = x1 * c + x0 * s;
        if (dst_bf16) {
            ((bf16_t*)dst)[ia] = f32_to_bf16(y0);
            ((bf16_t*)dst)[ib] = f32_to_bf16(y1);
        } else {
            ((float*)dst)[ia] = y0;
            ((float*)dst)[ib] = y1;
        }
    }
    __syncwarp();
}

// A finished unit's number, collected by the block's threads for its warps.
struct Finished {
    int n;
    int unit[256];
};

// After this block wrote rows [r0, r1) of a product whose units are `per`
// rows each (counters cnt[unit]), add them to the units' counters; the units
// this block completes land in f (counters reset). Returns after a barrier.
__device__ __forceinline__ void complete_rows(int* cnt, int r0, int r1, int per, Finished& f) {
    __threadfence();  // this thread's rows are visible device-wide before the count says so
    __syncthreads();
    if (threadIdx.x == 0) f.n = 0;
    __syncthreads();
    if (r1 > r0) {
        const int u0 = r0 / per, u1 = (r1 - 1) / per;
        for (int u = u0 + (int)threadIdx.x; u <= u1; u += blockDim.x) {
            const int add = min(r1, (u + 1) * per) - max(r0, u * per);
            if (atomicAdd(cnt + u, add) + add == per) {
                cnt[u] = 0;
                f.unit[atomicAdd(&f.n, 1) & 255] = u;
            }
        }
    }
    __threadfence();
    __syncthreads();
}

// ------------------------------------------------------------------ qk_norm
// Segments of the grid: blocks [0, bq) compute q rows (nq = heads * hd),
// [bq, bq + bk) k rows, [bq + bk, gridDim.x) v rows (nk = kv_heads * hd
// each); kq, kk: each segment's k split and gwq, gwk its row groups per warp
// (v shares k's plan). V rows go straight to cache row positions[0]; q and k
// rows to qraw/kraw, and each head is finished by the block that completes
// it. cnt: heads + kv_heads zeroed counters.
#define QKV_ARGS                                                                                                      \
    const char *__restrict__ wq, const void *__restrict__ sq, const void *__restrict__ bq_,                          \
        const char *__restrict__ wk, const void *__restrict__ sk, const void *__restrict__ bk_,                      \
        const char *__restrict__ wv, const void *__restrict__ sv, const void *__restrict__ bv_,                      \
        const float *__restrict__ x, int k, int gs, int sdt, int kw, int smem, int nq, int nk, int bq, int bk, int kq, \
        int kk, int gwq, int gwk, float *__restrict__ qraw, float *__restrict__ kraw, float *__restrict__ q_out,        \
        void *__restrict__ kc, void *__restrict__ vc, int kv_bf16, int cap, const float *__restrict__ qn,             \
        const float *__restrict__ kn, float eps, const int *__restrict__ positions, const float *__restrict__ inv_freq, \
        int style, int hd, int *__restrict__ cnt

// V rows into the cache row (skipped when the position is outside it).
struct CacheRowOut {
    void* cache;
    long long base;
    bool ok, bf16;
    __device__ __forceinline__ void store(int, int row, float v) const {
        if (!ok) return;
        if (bf16) ((bf16_t*)cache)[base + row] = f32_to_bf16(v);
        else ((float*)cache)[base + row] = v;
    }
};

template <int FMT>
__device__ __forceinline__ void qkv_impl(QKV_ARGS) {
    constexpr int R = Cfg<FMT, 1>::R;
    const int b = blockIdx.x;
    const int seg = b < bq ? 0 : b < bq + bk ? 1 : 2;
    const int lb = seg == 0 ? b : seg == 1 ? b - bq : b - bq - bk;
    const int pos = __ldg(positions);
    const bool ok = pos >= 0 && pos < cap;
    const int ks = seg == 0 ? kq : kk, gw = seg == 0 ? gwq : gwk, n = seg == 0 ? nq : nk;
    if (seg == 2) {
        const CacheRowOut o{vc, (long long)pos * nk, ok, kv_bf16 != 0};
        gemv_impl<FMT, 1>(wv, sv, bv_, x, o, nullptr, nk, k, 1, gs, sdt, ks, 1, 1, 1, 0, 0, kw, gw, smem, lb);
        return;
    }
    float* raw = seg == 0 ? qraw : kraw;
    gemv_impl<FMT, 1>(seg == 0 ? wq : wk, seg == 0 ? sq : sk, seg == 0 ? bq_ : bk_, x, RowsOut{raw, n}, nullptr, n, k,
                      1, gs, sdt, ks, 1, 1, 1, 0, 0, kw, gw, smem, lb);
    const int rows = (8 / ks) * gw * R;
    __shared__ Finished f;
    complete_rows(cnt + (seg == 0 ? 0 : nq / hd), lb * rows, min(n, (lb + 1) * rows), hd, f);
    extern __shared__ float4 fused_dsm[];  // the GEMV's ring, idle now
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float* sm = (float*)fused_dsm + warp * hd;
    for (int j = warp; j < min(f.n, 256); j += 8) {
        const int h = f.unit[j];
        if (seg == 0) {
            finish_head<true>(raw + h * hd, qn, eps, hd, pos, inv_freq, style, sm, q_out + h * hd, false, lane);
        } else if (ok) {
            const long long o = (long long)pos * nk + h * hd;
            void* dst = kv_bf16 ? (void*)((bf16_t*)kc + o) : (void*)((float*)kc + o);
            finish_head<true>(raw + h * hd, kn, eps, hd, pos, inv_freq, style, sm, dst, kv_bf16 != 0, lane);
        }
    }
}

#define QKV_PASS                                                                                                     \
    wq, sq, bq_, wk, sk, bk_, wv, sv, bv_, x, k, gs, sdt, kw, smem, nq, nk, bq, bk, kq, kk, gwq, gwk, qraw, kraw,  \
        q_out, kc, vc, kv_bf16, cap, qn, kn, eps, positions, inv_freq, style, hd, cnt
#define QKV(NAME, FMT)                                                                                               \
    extern "C" __global__ void __launch_bounds__(256, 2) NAME(QKV_ARGS) {                                            \
        FB_PROLOGUE_DEFERRED();                                                                                      \
        qkv_impl<FMT>(QKV_PASS);                                                                                     \
    }
QKV(fused_qkv_f32, 0)
QKV(fused_qkv_f16, 1)
QKV(fused_qkv_bf16, 2)
QKV(fused_qkv_q2, 3)
QKV(fused_qkv_q3, 4)
QKV(fused_qkv_q4, 5)
QKV(fused_qkv_q5, 6)
QKV(fused_qkv_q6, 7)
QKV(fused_qkv_q8, 8)
QKV(fused_qkv_q6g16, 9)
QKV(fused_qkv_q4i, 21)
QKV(fused_qkv_q8i, 24)

// ----------------------------------------------------------- rope_kv_append
// The qk_norm epilogue after unfused projections: one warp per head of one
// row (blockIdx.y; a decode step has one, a DFlash block one per block row);
// warps [0, nh) finish q heads into q_out, [nh, nh + nkv) k heads into the
// cache, [nh + nkv, nh + 2 nkv) copy v heads into the cache. 256 threads.
// qraw, q_out [rows, nh, hd]; kraw, v [rows, nkv, hd]; positions[row].
extern "C" __global__ void __launch_bounds__(256) rope_kv_append(
    const float* __restrict__ qraw, const float* __restrict__ kraw, const float* __restrict__ v,
    const float* __restrict__ qn, const float* __restrict__ kn, float eps, const int* __restrict__ positions,
    const float* __restrict__ inv_freq, int style, int hd, int nh, int nkv, int cap, float* __restrict__ q_out,
    void* __restrict__ kc, void* __restrict__ vc, int kv_bf16) {
    FB_PROLOGUE();
    __shared__ float sm[8][256];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int h = blockIdx.x * 8 + warp;
    const int row = blockIdx.y;
    const int pos = __ldg(positions + row);
    const bool ok = pos >= 0 && pos < cap;
    const long long qrow = (long long)row * nh * hd, kvrow = (long long)row * nkv * hd;
    if (h < nh) {
        finish_head<false>(qraw + qrow + h * hd, qn, eps, hd, pos, inv_freq, style, sm[warp], q_out + qrow + h * hd,
                           false, lane);
        return;
    }
    if (!ok || h >= nh + 2 * nkv) return;
    const int kh = h - nh;
    if (kh < nkv) {
        const long long o = (long long)pos * nkv * hd + kh * hd;
        void* dst = kv_bf16 ? (void*)((bf16_t*)kc + o) : (void*)((float*)kc + o);
        finish_head<false>(kraw + kvrow + kh * hd, kn, eps, hd, pos, inv_freq, style, sm[warp], dst, kv_bf16 != 0,
                           lane);
    } else {
        const int vh = kh - nkv;
        const long long o = (long long)pos * nkv * hd + vh * hd;
        for (int i = lane; i < hd; i += 32) {
            const float t = v[kvrow + vh * hd + i];
            if (kv_bf16) ((bf16_t*)vc)[o + i] = f32_to_bf16(t);
            else ((float*)vc)[o + i] = t;
        }
    }
}

// ---------------------------------------------------------------------- moe
// Shared arguments: the stacked expert weights (E experts), expert ids and
// router weights of the `slots` selected experts (device memory), the gemv
// plan (k split ks, row groups per warp gw, x window kw, shared bytes smem),
// blocks per product bs, zeroed counters cnt.
#define MOE_W                                                                                                 \
    const void *__restrict__ sc, const void *__restrict__ bi, const float *__restrict__ x, const int *__restrict__ ids, \
        int n, int k, int gs, int sdt, int slots, int experts, long long w_estride, long long sb_estride, int ks,     \
        int kw, int gw, int smem, int bs, int *__restrict__ cnt

// Gate and up: blocks [0, bs) of grid.x compute gate rows, [bs, 2 bs) up rows
// (n = expert width, k = hidden), grid.y = slot; graw/uraw [slots, n]. The
// second of the two blocks of a (slot, row range) writes act = silu(g) * u
// there (the formula of silu_mul_f32).
template <int FMT>
__device__ __forceinline__ void moe_gateup_impl(const char* __restrict__ wg, const char* __restrict__ wu,
                                                const void* __restrict__ su, const void* __restrict__ bu, MOE_W,
                                                float* __restrict__ graw, float* __restrict__ uraw,
                                                float* __restrict__ act) {
    constexpr int R = Cfg<FMT, 1>::R;
    const int up = blockIdx.x >= bs, lb = blockIdx.x - up * bs, p = blockIdx.y;
    float* raw = up ? uraw : graw;
    gemv_impl<FMT, 1>(up ? wu : wg, up ? su : sc, up ? bu : bi, x, RowsOut{raw, n}, ids, n, k, 1, gs, sdt, ks, slots,
                      slots, experts, w_estride, sb_estride, kw, gw, smem, lb);
    const int rows = (8 / ks) * gw * R, r0 = lb * rows, r1 = min(n, r0 + rows);
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int* c = cnt + p * bs + lb;
        last = atomicAdd(c, 1) == 1;
        if (last) *c = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    const long long o = (long long)p * n;
    for (int r = r0 + (int)threadIdx.x; r < r1; r += blockDim.x) {
        const float g = ld_l2(graw + o + r);
        act[o + r] = g / (1.0f + expf(-g)) * ld_l2(uraw + o + r);
    }
}

// Down: grid (bs, slots), rows of expert ids[slot] against act[slot] (n =
// hidden, k = expert width) into y [slots, n]; the last block of a row range
// writes out[r] = sum over slots of weight * y (moe_combine_k's order).
template <int FMT>
__device__ __forceinline__ void moe_down_impl(const char* __restrict__ w, MOE_W, const float* __restrict__ rw,
                                              float* __restrict__ y, float* __restrict__ out) {
    constexpr int R = Cfg<FMT, 1>::R;
    const int lb = blockIdx.x;
    gemv_impl<FMT, 1>(w, sc, bi, x, RowsOut{y, n}, ids, n, k, 1, gs, sdt, ks, 1, slots, experts, w_estride, sb_estride,
                      kw, gw, smem, lb);
    const int rows = (8 / ks) * gw * R, r0 = lb * rows, r1 = min(n, r0 + rows);
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(cnt + lb, 1) == slots - 1;
        if (last) cnt[lb] = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int r = r0 + (int)threadIdx.x; r < r1; r += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < slots; s++) acc = fmaf(rw[s], ld_l2(y + (long long)s * n + r), acc);
        out[r] = acc;
    }
}

#define MOE_PASS x, ids, n, k, gs, sdt, slots, experts, w_estride, sb_estride, ks, kw, gw, smem, bs, cnt
#define MOE(SUFFIX, FMT)                                                                                             \
    extern "C" __global__ void __launch_bounds__(256, 2) fused_moe_gateup_##SUFFIX(                                  \
        const char* __restrict__ wg, const char* __restrict__ wu, const void* __restrict__ su,                       \
        const void* __restrict__ bu, MOE_W, float* __restrict__ graw, float* __restrict__ uraw,                      \
        float* __restrict__ act) {                                                                                   \
        FB_PROLOGUE_DEFERRED();                                                                                      \
        moe_gateup_impl<FMT>(wg, wu, su, bu, sc, bi, MOE_PASS, graw, uraw, act);                                     \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(256, 2) fused_moe_down_##SUFFIX(                                    \
        const char* __restrict__ w, MOE_W, const float* __restrict__ rw, float* __restrict__ y,                      \
        float* __restrict__ out) {                                                                                   \
        FB_PROLOGUE_DEFERRED();                                                                                      \
        moe_down_impl<FMT>(w, sc, bi, MOE_PASS, rw, y, out);                                                         \
    }
MOE(f32, 0)
MOE(f16, 1)
MOE(bf16, 2)
MOE(q2, 3)
MOE(q3, 4)
MOE(q4, 5)
MOE(q5, 6)
MOE(q6, 7)
MOE(q8, 8)
MOE(q6g16, 9)
MOE(q4i, 21)
MOE(q8i, 24)
