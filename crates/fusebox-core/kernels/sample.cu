// sample.cu: token sampling (one block) and argmax.
//
// The sampler follows crate::sample (src/sample.rs) step by step and computes
// the same bits: its float arithmetic is single IEEE operations written with
// __fmul_rn / __fadd_rn / __fdiv_rn (never contracted into FMAs), exp is the
// shared polynomial exp_neg, masses are integers (exact, order-free sums),
// and the thresholds come from the same radix selection (a selection depends
// only on the multiset of (key, weight) items, so the device may feed it a
// compacted candidate list in any order). Integer atomics and reductions
// with a total order make it deterministic run to run.
//
// It runs as five grid kernels over chunks of CH tokens, each finishing in
// its last block (the last to bump a counter in the control block, which the
// host zeroes before every call), so every pass over the vocabulary is
// spread over the whole GPU:
//   sample_scale       z = penalised logits / T into scratch; the first
//                      largest; top-k's first radix histogram (12 bits).
//                      Last block: greedy (or a non-finite max): publish the
//                      token, and the other kernels do nothing; else zmax
//                      and top-k's first digit.
//   sample_select x3   the next radix passes, one per launch: top-k's passes
//                      1 and 2 (counts), then the tokens it keeps listed for
//                      a top-p selection in the last block; or, top-p alone,
//                      its three passes over the masses.
//   sample_draw        per-chunk sums of the final masses; the last block
//                      finds the chunk where the draw lands, walks it in id
//                      order, and publishes the token.
#include "common.cuh"

#define SB 256           // threads per sampler block
#define CH 2048          // tokens per sampler block
#define TPT (CH / SB)    // tokens per thread

// ---- shared with src/sample.rs ----------------------------------------------

__device__ __forceinline__ u32 fkey(float z) {
    u32 b = __float_as_uint(z);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// NaN -> -inf, -0 -> +0
__device__ __forceinline__ float canon(float z) {
    if (z != z) return -INFINITY;
    if (z == 0.0f) return 0.0f;
    return z;
}

__device__ __forceinline__ float penalize(float l, float p) { return l > 0.0f ? __fdiv_rn(l, p) : __fmul_rn(l, p); }

__device__ __forceinline__ float exp_neg(float x) {
    if (!(x > -80.0f)) return 0.0f;
    x = fminf(x, 0.0f);
    float n = floorf(__fadd_rn(__fmul_rn(x, __uint_as_float(0x3fb8aa3bu)), 0.5f));
    float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, __uint_as_float(0x3f318000u))), __fmul_rn(n, __uint_as_float(0xb95e8083u)));
    float p = __uint_as_float(0x3ab60b61u);
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3c088889u));
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3d2aaaabu));
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3e2aaaabu));
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    return __fmul_rn(p, __uint_as_float((u32)((int)n + 127) << 23));
}

__device__ __forceinline__ u64 mass_of(float e) { return (u64)__fmul_rn(e, 1099511627776.0f); }

// floor(a * b / 2^24) for a < 2^24, without overflow
__device__ __forceinline__ u64 mul_shr24(u64 a, u64 b) {
    u64 lo = a * b, hi = __umul64hi(a, b);
    return (hi << 40) | (lo >> 24);
}

__device__ __forceinline__ u64 splitmix64(u64 x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// ---- argmax with the CPU rule: first largest, NaN never beats a number ------

// true when (av, ai) should be chosen over (bv, bi)
__device__ __forceinline__ bool am_better(float av, int ai, float bv, int bi) {
    bool an = av != av, bn = bv != bv;
    if (an != bn) return bn;
    if (!an && av != bv) return av > bv;
    return ai < bi;
}

__device__ __forceinline__ void am_warp(float& v, int& i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (am_better(ov, oi, v, i)) {
            v = ov;
            i = oi;
        }
    }
}

// Block-wide argmax; every thread gets the winner in (v, i). sv/si hold 32 entries.
__device__ __forceinline__ void am_block(float& v, int& i, float* sv, int* si) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    am_warp(v, i);
    __syncthreads();
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = i;
    }
    __syncthreads();
    if (lane < nw) {
        v = sv[lane];
        i = si[lane];
    } else {
        v = __uint_as_float(0x7fc00000u);
        i = 0x7fffffff;
    }
    am_warp(v, i);
}

// Argmax of each row of x [rows, n] into out (I32). Small rows: one warp per
// row, 8 rows per block; long rows: one block per row.
extern "C" __global__ void argmax_warp(const float* __restrict__ x, int* __restrict__ out, int rows, int n) {
    FB_PROLOGUE();
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* xr = x + (long)row * n;
    float bv = __uint_as_float(0x7fc00000u);
    int bi = 0x7fffffff;
    for (int i = lane; i < n; i += 32) {
        float v = xr[i];
        if (am_better(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    am_warp(bv, bi);
    if (lane == 0) out[row] = bi;
}

extern "C" __global__ void argmax_block(const float* __restrict__ x, int* __restrict__ out, int n) {
    FB_PROLOGUE();
    __shared__ float sv[32];
    __shared__ int si[32];
    const float* xr = x + (long)blockIdx.x * n;
    float bv = __uint_as_float(0x7fc00000u);
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i];
        if (am_better(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    am_block(bv, bi, sv, si);
    if (threadIdx.x == 0) out[blockIdx.x] = bi;
}

// ---- block-wide helpers -------------------------------------------------------

// Inclusive prefix sum over the block in thread order; `sm` holds 32 entries;
// `total` gets the block's sum. Every thread must call it.
__device__ __forceinline__ u64 scan_u64(u64 v, u64* sm, u64* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        u64 t = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += t;
    }
    __syncthreads();
    if (lane == 31) sm[warp] = v;
    __syncthreads();
    if (warp == 0) {
        u64 w = lane < nw ? sm[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            u64 t = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += t;
        }
        sm[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    if (warp > 0) v += sm[warp - 1];
    *total = sm[nw - 1];
    return v;
}

// True in the block that finishes last (all threads agree). Every thread
// fences its global writes first, so the last block sees them all.
__device__ __forceinline__ bool last_block(u32* counter, int* s_last) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) *s_last = atomicAdd(counter, 1u) == gridDim.x - 1;
    __syncthreads();
    bool last = *s_last != 0;
    if (last) __threadfence();
    return last;
}

// h[bin] += w for the lanes with w != 0, one shared-memory atomic per
// distinct bin of the warp (64-bit shared atomics are compare-and-swap loops,
// slow when many lanes hit one bin). Warp-uniform call.
__device__ __forceinline__ void hist_add(u64* h, u32 bin, u64 w) {
    const unsigned act = __ballot_sync(0xffffffffu, w != 0);
    if (act == 0) return;
    const unsigned peers = __match_any_sync(0xffffffffu, w != 0 ? bin : 0xffffffffu);
    u64 s = 0;
    for (unsigned m = act; m; m &= m - 1) {
        const int src = __ffs(m) - 1;
        const u64 x = __shfl_sync(0xffffffffu, w, src);
        if ((peers >> src) & 1u) s += x;
    }
    if (w != 0 && (int)(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd((unsigned long long*)&h[bin], (unsigned long long)s);
}

// One radix step over a histogram of nb bins (nb a multiple of blockDim):
// the largest digit d with above + (weight of bins >= d) >= need (d = 0 when
// none), as crate::sample::select. need_from_total: need = top_p_need(p24,
// total of the bins) first. Returns d; *acc = weight strictly above d's bin
// (including `above`), *at = *acc + h[d]. Whole block; ends with a barrier.
template <typename T>
__device__ u32 choose_digit(const T* h, int nb, u64 above, u64* need_io, bool need_from_total, u32 p24, u64* sm,
                            u32* s_sel, u64* s_acc, u64* s_at, u64* acc, u64* at) {
    const int q = nb / blockDim.x, b0 = threadIdx.x * q;
    u64 mine = 0;
    for (int j = 0; j < q; j++) mine += (u64)h[b0 + j];
    u64 total;
    u64 incl = scan_u64(mine, sm, &total);
    u64 need = *need_io;
    if (need_from_total) {
        u64 n = mul_shr24((u64)p24, total);
        need = n > 1 ? n : 1;
    }
    // pred(d): d == 0 || above + weight(bins >= d) >= need, true exactly for
    // d <= the answer; pred(nb) is false since above < need.
    u64 suf = above + (total - incl);
    bool pred_next = suf >= need;
    for (int j = q - 1; j >= 0; j--) {
        int d = b0 + j;
        u64 s = suf + (u64)h[d];
        bool pred = d == 0 || s >= need;
        if (pred && !pred_next) {
            *s_sel = (u32)d;
            *s_acc = suf;
            *s_at = s;
        }
        pred_next = pred;
        suf = s;
    }
    __syncthreads();
    u32 d = *s_sel;
    *acc = *s_acc;
    *at = *s_at;
    *need_io = need;
    __syncthreads();
    return d;
}

// The radix selection (passes `first`..2 of 12/10/10 bits) over a list of
// (key, weight) items in global memory written by other blocks of this
// launch, skipping keys below `min_key`; weight 1 per item unless MASS. The
// state (prefix, mask, above, need) continues a selection whose earlier
// passes were done elsewhere; with first == 0 and MASS, need comes from p24
// and the total. Returns the threshold key, *at its weight. Whole block.
template <bool MASS>
__device__ u32 list_select(const u32* lkey, const u64* lmass, u32 n, u32 min_key, int first, u32 prefix, u32 mask,
                           u64 above, u64 need, u32 p24, u64* h, u64* sm, u32* s_sel, u64* s_acc, u64* s_at, u64* at) {
    for (int pass = first; pass < 3; pass++) {
        const int shift = pass == 0 ? 20 : (pass == 1 ? 10 : 0);
        const int nb = pass == 0 ? 4096 : 1024;
        u32* hc = (u32*)h;  // counts: 32-bit bins, native shared atomics
        for (int b = threadIdx.x; b < nb; b += blockDim.x) {
            if (MASS) h[b] = 0;
            else hc[b] = 0;
        }
        __syncthreads();
        for (u32 j0 = 0; j0 < n; j0 += blockDim.x) {
            const u32 j = j0 + threadIdx.x;
            u32 k = 0;
            bool in = false;
            if (j < n) {
                k = __ldcg(lkey + j);
                in = k >= min_key && (k & mask) == prefix;
            }
            const u32 bin = (k >> shift) & (nb - 1);
            if (MASS) hist_add(h, bin, in ? __ldcg((const unsigned long long*)lmass + j) : 0);
            else if (in) atomicAdd(&hc[bin], 1u);
        }
        __syncthreads();
        u64 acc;
        u32 d = MASS ? choose_digit<u64>(h, nb, above, &need, pass == 0, p24, sm, s_sel, s_acc, s_at, &acc, at)
                     : choose_digit<u32>(hc, nb, above, &need, false, p24, sm, s_sel, s_acc, s_at, &acc, at);
        prefix |= d << shift;
        mask |= (u32)(nb - 1) << shift;
        above = acc;
    }
    return prefix;
}

// Append (key, mass) for the lanes with `take` (warp-uniform call).
__device__ __forceinline__ void list_append(bool take, u32 key, u64 m, u32* list_n, u32* lkey, u64* lmass) {
    unsigned bal = __ballot_sync(0xffffffffu, take);
    if (bal == 0) return;
    const int lane = threadIdx.x & 31, leader = __ffs(bal) - 1;
    u32 base = 0;
    if (lane == leader) base = atomicAdd(list_n, (u32)__popc(bal));
    base = __shfl_sync(0xffffffffu, base, leader);
    if (take) {
        u32 pos = base + __popc(bal & ((1u << lane) - 1u));
        lkey[pos] = key;
        lmass[pos] = m;
    }
}

// ---- the sampler -------------------------------------------------------------

// A radix selection in progress: the digits chosen so far (prefix under
// mask), the weight above them, and the weight wanted.
struct Sel {
    u32 prefix, mask;
    u64 above, need;
};

// Zeroed by the host before every call.
struct Ctl {
    u32 done[8];  // last-block counters of the kernels
    u32 mode;  // 1: the token is published, the rest do nothing
    float zmax;
    int argmax;  // the first largest z (the fallback)
    u32 list_n;  // entries in the list
    u32 thr_k;  // top-k threshold key (0: off)
    u32 thr_p;  // top-p threshold key (0: off)
    u32 pad[2];
    Sel sk, sp;  // the top-k and top-p selections
    u64 h[3][4096];  // the passes' histograms (passes 1 and 2 use 1024 bins)
};
// SAMPLE_CTL_BYTES in src/cuda/moe_sample.rs
static_assert(sizeof(Ctl) == 112 + 3 * 4096 * 8, "Ctl layout");

struct Params {
    float temp, top_p, min_p, pen;
    u32 top_k, last_n;
    u64 seed;
    bool greedy, topk_on, topp_on;
};

__device__ __forceinline__ Params load_params(const float* params, int V) {
    Params p;
    p.temp = params[0];
    p.top_k = __float_as_uint(params[1]);
    p.top_p = params[2];
    float mp = params[3];
    p.min_p = mp > 0.0f ? fminf(mp, 1.0f) : 0.0f;
    p.pen = params[4];
    p.last_n = __float_as_uint(params[5]);
    p.seed = (u64)__float_as_uint(params[6]) | ((u64)__float_as_uint(params[7]) << 32);
    p.greedy = !(p.temp > 0.0f) || p.top_k == 1u;
    p.topk_on = p.top_k > 0u && p.top_k < (u32)V;
    p.topp_on = p.top_p < 1.0f;
    return p;
}

__device__ __forceinline__ u32 top_p24(const Params& p) { return (u32)__fmul_rn(fmaxf(p.top_p, 0.0f), 16777216.0f); }

// The token to out[0], appended to the history if there is room; the state advances.
__device__ __forceinline__ void publish(int tok, int* out, int* history, int cap, int* state) {
    int len = state[0];
    u32 counter = (u32)state[1];
    out[0] = tok;
    if (len >= 0 && len < cap) history[len] = tok;
    state[0] = (int)((u32)len + 1u);
    state[1] = (int)(counter + 1u);
}

// The mass of a token: 0 below `min_key` or under min-p.
__device__ __forceinline__ u64 token_mass(float zz, u32 k, u32 min_key, float zmax, float min_p) {
    if (k < min_key) return 0;
    float e = exp_neg(__fsub_rn(zz, zmax));
    return e >= min_p ? mass_of(e) : 0;
}

// Radix pass `pass` (0: bits 31..20, 1: 19..10, 2: 9..0).
__device__ __forceinline__ int pass_shift(int pass) { return pass == 0 ? 20 : (pass == 1 ? 10 : 0); }
__device__ __forceinline__ int pass_bins(int pass) { return pass == 0 ? 4096 : 1024; }

// sample_scale: z, the first largest, the top-k pass-0 histogram.
extern "C" __global__ void __launch_bounds__(SB)
    sample_scale(const float* __restrict__ logits, const float* __restrict__ params, int* history, int cap, int* state,
                 int* out, int V, float* __restrict__ z, float* __restrict__ pv, int* __restrict__ pi, Ctl* ctl) {
    FB_PROLOGUE();
    __shared__ u32 bm[CH / 32];
    __shared__ u32 hk[4096];
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ u64 sm[32];
    __shared__ u32 s_sel;
    __shared__ u64 s_acc, s_at;
    __shared__ int s_last;
    const Params p = load_params(params, V);
    const int tid = threadIdx.x, lo = blockIdx.x * CH, hi = min(lo + CH, V);
    const bool hist_on = !p.greedy && p.topk_on;
    for (int w = tid; w < CH / 32; w += SB) bm[w] = 0;
    if (hist_on)
        for (int b = tid; b < 4096; b += SB) hk[b] = 0;
    __syncthreads();
    // (1) the penalty: mark this chunk's tokens among the last n of the history
    if (p.pen != 1.0f) {
        const int valid = min(max(state[0], 0), cap);
        const int start = p.last_n == 0u ? 0 : max(valid - (int)min(p.last_n, 0x7fffffffu), 0);
        for (int j = start + tid; j < valid; j += SB) {
            int t = history[j];
            if (t >= lo && t < hi) atomicOr(&bm[(t - lo) >> 5], 1u << ((t - lo) & 31));
        }
        __syncthreads();
    }
    float bv = __uint_as_float(0x7fc00000u);
    int bi = 0x7fffffff;
    for (int i = lo + tid; i < hi; i += SB) {
        float l = logits[i];
        const int o = i - lo;
        if ((bm[o >> 5] >> (o & 31)) & 1u) l = penalize(l, p.pen);
        float zz = p.greedy ? l : canon(__fdiv_rn(l, p.temp));
        z[i] = zz;
        if (am_better(zz, i, bv, bi)) {
            bv = zz;
            bi = i;
        }
        if (hist_on) atomicAdd(&hk[fkey(zz) >> 20], 1u);
    }
    am_block(bv, bi, sv, si);
    if (tid == 0) {
        pv[blockIdx.x] = bv;
        pi[blockIdx.x] = bi;
    }
    if (hist_on) {
        __syncthreads();
        for (int b = tid; b < 4096; b += SB) {
            u32 c = hk[b];
            if (c) atomicAdd((unsigned long long*)&ctl->h[0][b], (unsigned long long)c);
        }
    }
    if (!last_block(&ctl->done[0], &s_last)) return;
    // the first largest over all chunks (a total order: any reduction order agrees)
    bv = __uint_as_float(0x7fc00000u);
    bi = 0x7fffffff;
    for (int b = tid; b < (int)gridDim.x; b += SB) {
        float v = __ldcg(pv + b);
        int i = __ldcg(pi + b);
        if (am_better(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    am_block(bv, bi, sv, si);
    // (2) greedy, or a max that is not finite: the first largest
    if (p.greedy || !(bv > -INFINITY && bv < INFINITY)) {
        if (tid == 0) {
            publish(bi, out, history, cap, state);
            ctl->mode = 1;
        }
        return;
    }
    if (tid == 0) {
        ctl->zmax = bv;
        ctl->argmax = bi;
    }
    if (p.topk_on) {
        for (int b = tid; b < 4096; b += SB) hk[b] = (u32)__ldcg((const unsigned long long*)&ctl->h[0][b]);
        __syncthreads();
        u64 need = p.top_k, acc, at;
        u32 d = choose_digit<u32>(hk, 4096, 0, &need, false, 0, sm, &s_sel, &s_acc, &s_at, &acc, &at);
        if (tid == 0) {
            ctl->sk.prefix = d << 20;
            ctl->sk.mask = 0xfffu << 20;
            ctl->sk.above = acc;
            ctl->sk.need = need;
        }
    }
}

// sample_select, stage 1..3: the remaining radix passes, one per launch,
// over the whole grid. Top-k on: stages 1 and 2 are its passes 1 and 2
// (counts; the threshold after stage 2), and stage 3 lists the tokens at or
// above it for the top-p selection in its last block. Top-p alone: stages
// 1..3 are its passes 0..2 (masses).
extern "C" __global__ void __launch_bounds__(SB) sample_select(const float* __restrict__ params, int V,
                                                               const float* __restrict__ z, u32* lkey, u64* lmass,
                                                               Ctl* ctl, int stage) {
    FB_PROLOGUE();
    __shared__ u64 h[4096];  // the last block's bins; the chunk's bins as u32 pairs before
    __shared__ u64 sm[32];
    __shared__ u32 s_sel;
    __shared__ u64 s_acc, s_at;
    __shared__ int s_last;
    if (ctl->mode) return;
    const Params p = load_params(params, V);
    if (!p.topk_on && !p.topp_on) return;
    if (p.topk_on && stage == 3 && !p.topp_on) return;
    const int tid = threadIdx.x, lo = blockIdx.x * CH, hi = min(lo + CH, V);
    const float zmax = ctl->zmax;
    if (p.topk_on && stage == 3) {
        // the tokens kept by top-k (and min-p), for the top-p selection
        const u32 thr = ctl->thr_k;
        for (int b = lo; b < hi; b += SB) {
            const int i = b + tid;
            u32 k = 0;
            u64 m = 0;
            if (i < hi) {
                float zz = z[i];
                k = fkey(zz);
                m = token_mass(zz, k, thr, zmax, p.min_p);
            }
            list_append(m != 0, k, m, &ctl->list_n, lkey, lmass);
        }
        if (!last_block(&ctl->done[3], &s_last)) return;
        const u32 n = __ldcg(&ctl->list_n);
        u64 at;
        u32 thr_p = list_select<true>(lkey, lmass, n, 0, 0, 0, 0, 0, 1, top_p24(p), h, sm, &s_sel, &s_acc, &s_at, &at);
        if (tid == 0) ctl->thr_p = thr_p;
        return;
    }
    const bool mass_mode = !p.topk_on;
    const int pass = p.topk_on ? stage : stage - 1;
    const int shift = pass_shift(pass), nb = pass_bins(pass);
    Sel* sel = p.topk_on ? &ctl->sk : &ctl->sp;
    const u32 prefix = pass == 0 ? 0u : sel->prefix, mask = pass == 0 ? 0u : sel->mask;
    // masses go in two 20-bit halves (a chunk of 2048 tokens cannot overflow
    // either 32-bit sum), so the shared atomics are native 32-bit adds
    u32* hlo = (u32*)h;
    u32* hhi = hlo + 4096;
    for (int b = tid; b < nb; b += SB) {
        hlo[b] = 0;
        hhi[b] = 0;
    }
    __syncthreads();
    for (int i = lo + tid; i < hi; i += SB) {
        float zz = z[i];
        u32 k = fkey(zz);
        if ((k & mask) != prefix) continue;
        const u32 bin = (k >> shift) & (u32)(nb - 1);
        if (mass_mode) {
            u64 m = token_mass(zz, k, 0, zmax, p.min_p);
            if (m) {
                atomicAdd(&hlo[bin], (u32)(m & 0xfffffu));
                atomicAdd(&hhi[bin], (u32)(m >> 20));
            }
        } else {
            atomicAdd(&hlo[bin], 1u);
        }
    }
    __syncthreads();
    u64* gh = ctl->h[pass];
    for (int b = tid; b < nb; b += SB) {
        u64 w = (u64)hlo[b] + ((u64)hhi[b] << 20);
        if (w) atomicAdd((unsigned long long*)&gh[b], (unsigned long long)w);
    }
    if (!last_block(&ctl->done[stage], &s_last)) return;
    for (int b = tid; b < nb; b += SB) h[b] = __ldcg((const unsigned long long*)&gh[b]);
    __syncthreads();
    u64 need = pass == 0 ? 1 : sel->need, acc, at;
    const u64 above = pass == 0 ? 0 : sel->above;
    u32 d = choose_digit<u64>(h, nb, above, &need, mass_mode && pass == 0, top_p24(p), sm, &s_sel, &s_acc, &s_at, &acc,
                              &at);
    if (tid == 0) {
        const u32 np = prefix | (d << shift), nm = mask | ((u32)(nb - 1) << shift);
        if (pass == 2) {
            if (p.topk_on) ctl->thr_k = np;
            else ctl->thr_p = np;
        } else {
            sel->prefix = np;
            sel->mask = nm;
            sel->above = acc;
            sel->need = need;
        }
    }
}

extern "C" __global__ void __launch_bounds__(SB)
    sample_draw(const float* __restrict__ params, int* history, int cap, int* state, int* out, int V,
                const float* __restrict__ z, u64* __restrict__ pm, Ctl* ctl) {
    FB_PROLOGUE();
    __shared__ u64 sm[32];
    __shared__ int s_last, s_owner, s_tok;
    __shared__ u64 s_base;
    if (ctl->mode) return;
    const Params p = load_params(params, V);
    const int tid = threadIdx.x, lo = blockIdx.x * CH, hi = min(lo + CH, V);
    const float zmax = ctl->zmax;
    const u32 min_key = max(ctl->thr_k, ctl->thr_p);
    // (3) this chunk's final mass
    u64 mine = 0;
    for (int i = lo + tid; i < hi; i += SB) {
        float zz = z[i];
        mine += token_mass(zz, fkey(zz), min_key, zmax, p.min_p);
    }
    u64 sum;
    scan_u64(mine, sm, &sum);
    if (tid == 0) pm[blockIdx.x] = sum;
    if (!last_block(&ctl->done[4], &s_last)) return;
    // (4) r = floor(u24 * total / 2^24); the chunk where the running mass passes r
    const int nb = gridDim.x, per = (nb + SB - 1) / SB;
    const int b0 = min(tid * per, nb), b1 = min(b0 + per, nb);
    u64 part = 0;
    for (int b = b0; b < b1; b++) part += __ldcg((const unsigned long long*)pm + b);
    u64 total;
    if (tid == 0) s_owner = -1;
    u64 incl = scan_u64(part, sm, &total);
    const u32 counter = (u32)state[1];
    const u64 r = mul_shr24(splitmix64(p.seed ^ splitmix64((u64)counter)) >> 40, total);
    u64 run = incl - part;
    if (part != 0 && run <= r && r < incl) {
        for (int b = b0; b < b1; b++) {
            u64 m = __ldcg((const unsigned long long*)pm + b);
            if (r < run + m) {
                s_owner = b;
                s_base = run;
                break;
            }
            run += m;
        }
    }
    __syncthreads();
    const int owner = s_owner;
    int tok = -1;
    if (owner >= 0) {
        // walk the owner chunk in id order: thread t holds ids [c0 + t*TPT, +TPT)
        const int c0 = owner * CH + tid * TPT, c1 = min(c0 + TPT, V);
        u64 tsum = 0;
        for (int i = c0; i < c1; i++) {
            float zz = z[i];
            tsum += token_mass(zz, fkey(zz), min_key, zmax, p.min_p);
        }
        if (tid == 0) s_tok = -1;
        u64 t_incl = scan_u64(tsum, sm, &total);  // (its barriers order s_tok's reset)
        u64 c = s_base + (t_incl - tsum);
        if (tsum != 0 && c <= r && r < c + tsum) {
            // exactly one thread: the first id where the running mass passes r
            int found = -1;
            for (int i = c0; i < c1 && found < 0; i++) {
                float zz = z[i];
                c += token_mass(zz, fkey(zz), min_key, zmax, p.min_p);
                if (c > r) found = i;
            }
            s_tok = found;
        }
        __syncthreads();
        tok = s_tok;
    }
    if (tid == 0) publish(tok >= 0 ? tok : ctl->argmax, out, history, cap, state);
}
