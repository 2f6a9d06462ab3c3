// attention.cu: KV-cache writes and causal grouped-query attention over a bf16 cache.
//
// Cache layout: k, v bf16 [capacity, kv_heads, d]. Queries/outputs f32 [m, heads, d].
// Query row i attends to cache rows 0..=positions[i]; head h reads kv head h / G (G = heads / kv_heads).
//
// One kernel family serves decode and prefill ("attn_d<D>_q<Q>"). A block takes Q "query vectors" of one kv
// head: query vectors of kv head g are numbered u = row * G + j (head g * G + j), and block z takes
// u in [z * Q, z * Q + Q), so all G heads of a group (and, for prefill, several rows) share every K/V tile
// the block loads. K/V tiles of TK keys stream through shared memory (cp.async, 16-byte, two stages) with an
// online softmax in f32 (log2 domain). The key range [0, len) of a block (len = 1 + the largest position of
// its rows, read from device memory) is cut into gridDim.x splits of whole tiles; with more than one split,
// each block writes (max, sum, unnormalised acc) partials and attn_combine merges them. The grid depends
// only on shapes and the capacity, never on the length, so a decode step can be captured as a CUDA graph.
//
// Decode blocks (Q <= 8: m * G small) give each warp its own quarter of every tile with its own online
// softmax (one barrier per tile) and merge the warps at the end; prefill blocks (Q = 64, or 32 for d 256)
// compute the whole tile's scores, a block-wide softmax step, then P V. Both are scalar f32 FMA.
#include "common.cuh"
#include "attn.cuh"

#define ATTN_THREADS 128

// 8 bf16 (one 16-byte word) to f32
__device__ __forceinline__ void bf16x8_to_f32(uint4 w, float* f) {
    f[0] = __uint_as_float(w.x << 16);
    f[1] = __uint_as_float(w.x & 0xffff0000u);
    f[2] = __uint_as_float(w.y << 16);
    f[3] = __uint_as_float(w.y & 0xffff0000u);
    f[4] = __uint_as_float(w.z << 16);
    f[5] = __uint_as_float(w.z & 0xffff0000u);
    f[6] = __uint_as_float(w.w << 16);
    f[7] = __uint_as_float(w.w & 0xffff0000u);
}

// ------------------------------------------------------------------ kv_write
// Row i of k and v (f32 [m, row]) into cache row positions[i] (bf16 [cap, row]); rows whose position is
// outside [0, cap) are skipped. grid (m, 2): y = 0 keys, 1 values. vec4: row % 4 == 0 and pointers aligned.
extern "C" __global__ void kv_write_bf16(const float* __restrict__ k, const float* __restrict__ v,
                                         const int* __restrict__ positions, bf16_t* __restrict__ kc,
                                         bf16_t* __restrict__ vc, int row, int cap, int vec4) {
    FB_PROLOGUE();
    int i = blockIdx.x;
    int p = positions[i];
    if (p < 0 || p >= cap) return;
    const float* src = (blockIdx.y == 0 ? k : v) + (long)i * row;
    bf16_t* dst = (blockIdx.y == 0 ? kc : vc) + (long)p * row;
    if (vec4) {
        int n4 = row >> 2;
        for (int j = threadIdx.x; j < n4; j += blockDim.x) {
            float4 x = ((const float4*)src)[j];
            uint2 o;
            o.x = (u32)f32_to_bf16(x.x) | ((u32)f32_to_bf16(x.y) << 16);
            o.y = (u32)f32_to_bf16(x.z) | ((u32)f32_to_bf16(x.w) << 16);
            ((uint2*)dst)[j] = o;
        }
    } else {
        for (int j = threadIdx.x; j < row; j += blockDim.x) dst[j] = f32_to_bf16(src[j]);
    }
}

// ------------------------------------------------------------------ attention
// Compile-time shape of a block. D: head_dim rounded up to a power of two (the real d <= D, d % 8 == 0;
// missing dims are zero). Q: query vectors per block.
template <int D, int Q> struct AttnCfg {
    static constexpr int NT = ATTN_THREADS;
    static constexpr bool DECODE = Q <= 8;
    static constexpr int DC = D / 8;  // 16-byte chunks per K/V row
    // decode QK: DSP threads per key (each a share of the dims, all Q queries), keys in a warp fastest
    static constexpr int DSP = DC < 4 ? DC : 4;
    static constexpr int TK = DECODE ? NT / DSP : 32;  // keys per tile
    // smem K/V row (bf16): 16 bytes of padding (32 for d 8) keep same-chunk reads of 8 rows conflict-free
    static constexpr int KROW = D == 8 ? 24 : D + 8;
    static constexpr int QROW = D + 4;                   // smem Q row (f32), padded 16 bytes
    static constexpr int QP = (Q % 4 == 0) ? Q + 4 : Q;  // smem score row (f32) per key
    // prefill QK: a thread computes KPT keys x QPTK queries
    static constexpr int KPT = Q >= 16 ? 2 : 1;
    static constexpr int KT = TK / KPT;  // key threads per query group
    static constexpr int NQG = NT / KT;  // query groups
    static constexpr int QPTK = (Q + NQG - 1) / NQG;
    // PV: a thread owns 8 dims x QPT queries over every KS-th key of a tile
    static constexpr int QPT = Q < 8 ? Q : 8;
    static constexpr int QG = Q / QPT;
    static constexpr int DG = DC;
    static constexpr int KS = NT / (DG * QG);
    // shared memory (bytes): [K/V stages | reduction] [Q] [scores] [m, l, alpha, pos]
    static constexpr int KV_BYTES = 2 * 2 * TK * KROW * 2;
    // after the loop: prefill sums KS partial accumulators; decode merges its 4 warps' (acc, max, sum)
    static constexpr int RED_BYTES = DECODE ? 4 * Q * D * 4 + 2 * 4 * Q * 4 : KS * Q * D * 4;
    static constexpr int REGION0 = KV_BYTES > RED_BYTES ? KV_BYTES : RED_BYTES;
    static constexpr int Q_BYTES = Q * QROW * 4;
    static constexpr int P_BYTES = TK * QP * 4;
    static constexpr int ST_BYTES = 4 * Q * 4;
    static constexpr int SMEM = REGION0 + Q_BYTES + P_BYTES + ST_BYTES;
    static_assert(NT % KT == 0, "key threads");
    static_assert(DG * QG <= NT && NT % (DG * QG) == 0, "pv threads");
    static_assert(Q % QPT == 0, "pv queries");
    static_assert(TK % 32 == 0, "tile");
    static_assert(!DECODE || TK * DSP == NT, "decode qk threads");
};

// q f32 [m, heads, d]; kc, vc bf16 [cap, kvh, d]; out f32 [m, heads, d] (used when gridDim.x == 1);
// part_acc f32 [m * heads, splits, d], part_ml f32 [m * heads, splits, 2] (used when gridDim.x > 1).
// scale_log2 = scale * log2(e). aligned: kc, vc 16-byte aligned (else synchronous 2-byte loads).
// row_tiles: query tiles per row when rows are taken one at a time (gridDim.z = m * row_tiles), 0 when packed.
// PAGED (the _pg kernels, rows one at a time only): tables, seqs, width, shift give a paged cache: row r's
// keys are those of sequence seqs[r], whose block table is tables[seqs[r] * width ..] (blocks of
// 1 << shift rows). Without PAGED they are unused and the kernel is the contiguous one it always was.
template <int D, int Q, bool PAGED>
__device__ __forceinline__ void attn_body(const float* __restrict__ q, const bf16_t* __restrict__ kc,
                                          const bf16_t* __restrict__ vc, const int* __restrict__ positions,
                                          float* __restrict__ out, float* __restrict__ part_acc,
                                          float* __restrict__ part_ml, int m, int heads, int kvh, int d, int cap,
                                          float scale_log2, int aligned, int row_tiles,
                                          const int* __restrict__ tables, const int* __restrict__ seqs, int width,
                                          int shift) {
    typedef AttnCfg<D, Q> C;
    extern __shared__ __attribute__((aligned(16))) unsigned char smem[];
    bf16_t* kv = (bf16_t*)smem;                                     // [2 stages][K, V][TK][KROW]
    float* red = (float*)smem;                                      // [KS][Q][D] (after the loop)
    float* qs = (float*)(smem + C::REGION0);                        // [Q][QROW]
    float* ps = (float*)(smem + C::REGION0 + C::Q_BYTES);           // [TK][QP]
    float* m_s = (float*)(smem + C::REGION0 + C::Q_BYTES + C::P_BYTES);
    float* l_s = m_s + Q;
    float* a_s = l_s + Q;
    int* pos_s = (int*)(a_s + Q);

    const int tid = threadIdx.x;
    const int nsplit = gridDim.x, split = blockIdx.x;
    const int g = blockIdx.y;
    const int G = heads / kvh;
    long n_u, u0;
    attn_vectors(Q, m, G, row_tiles, u0, n_u);

    if (attn_smem_short(C::SMEM, Q, u0, n_u, G, heads, d, out, part_acc, part_ml)) return;

    // per-query setup: position (-1 = no keys), running max and sum, scaled q in smem
    for (int i = tid; i < Q; i += C::NT) {
        pos_s[i] = attn_position(positions, u0 + i, n_u, G, cap);
        m_s[i] = -INFINITY;
        l_s[i] = 0.f;
        a_s[i] = 0.f;
    }
    for (int i = tid; i < Q * D; i += C::NT) {
        int qi = i / D, c = i % D;
        long u = u0 + qi;
        float x = 0.f;
        if (u < n_u && c < d) {
            long row = u / G, h = (long)g * G + u % G;
            x = q[(row * heads + h) * d + c] * scale_log2;
        }
        qs[qi * C::QROW + c] = x;
    }
    __syncthreads();
    int len, t_begin, t_end;
    attn_key_tiles(pos_s, Q, C::TK, len, t_begin, t_end);

    if (t_begin >= t_end) {
        // nothing to do (beyond the length): an empty partial, or zeros for rows without keys
        attn_fill(Q, u0, n_u, G, heads, d, 0.f, -INFINITY, 0.f, out, part_acc, part_ml);
        return;
    }

    const long kv_row = (long)kvh * d;  // elements between consecutive cache rows
    const bf16_t* kbase = kc + (long)g * d;
    const bf16_t* vbase = vc + (long)g * d;
    // a paged cache: this block's row's block table (rows are one at a time then)
    const int* tab = PAGED ? tables + (long)__ldg(seqs + u0 / G) * width : nullptr;

    // queue the loads of key tile `t` into stage `st`
    auto load_tile = [&](int t, int st) {
        attn_load_tile<C::TK, C::KROW, C::DC, C::NT>(kv + st * (2 * C::TK * C::KROW), kbase, vbase, kv_row,
                                                     t * C::TK, len, d, aligned, tab, PAGED ? shift : 0);
    };

    const int warp = tid >> 5, lane = tid & 31;
    if constexpr (C::DECODE) {
        // Each warp owns KW keys of every tile and keeps its own online softmax; one barrier per tile.
        constexpr int KW = 32 / C::DSP;    // keys per warp per tile
        constexpr int KSUB = 32 / C::DC;   // PV: key subsets per warp
        constexpr int KPL = KW / KSUB;     // PV: keys per lane
        static_assert(KW * 4 == C::TK && KPL * KSUB == KW, "decode layout");
        const int qk_r = lane % KW, part = lane / KW;  // QK: key within the warp, share of the dims
        const int dg = lane % C::DC, ksub = lane / C::DC;  // PV: 8 dims, key subset
        float* pw = ps + warp * KW * C::QP;                 // this warp's probabilities [KW][QP]
        float m_w[Q], l_w[Q], acc[Q][8];
#pragma unroll
        for (int i = 0; i < Q; i++) {
            m_w[i] = -INFINITY;
            l_w[i] = 0.f;
#pragma unroll
            for (int c = 0; c < 8; c++) acc[i][c] = 0.f;
        }
        load_tile(t_begin, 0);
        cp_async_commit();
        for (int t = t_begin; t < t_end; t++) {
            const int st = (t - t_begin) & 1;
            cp_async_wait<0>();
            __syncthreads();  // tile t landed for everyone; everyone is done with tile t - 1 (stage st ^ 1)
            if (t + 1 < t_end) {
                load_tile(t + 1, st ^ 1);
                cp_async_commit();
            }
            const bf16_t* k_tile = kv + st * (2 * C::TK * C::KROW);
            const bf16_t* v_tile = k_tile + C::TK * C::KROW;
            const int r = warp * KW + qk_r;  // QK key row of the tile
            const int kb = t * C::TK;

            float s[Q];
#pragma unroll
            for (int i = 0; i < Q; i++) s[i] = 0.f;
#pragma unroll
            for (int j = 0; j < C::DC / C::DSP; j++) {
                const int c = part + C::DSP * j;
                float kf[8];
                bf16x8_to_f32(*(const uint4*)(k_tile + r * C::KROW + c * 8), kf);
#pragma unroll
                for (int i = 0; i < Q; i++) {
                    const float4 qa = *(const float4*)(qs + i * C::QROW + c * 8);
                    const float4 qb = *(const float4*)(qs + i * C::QROW + c * 8 + 4);
                    float a = s[i];
                    a = fmaf(qa.x, kf[0], a);
                    a = fmaf(qa.y, kf[1], a);
                    a = fmaf(qa.z, kf[2], a);
                    a = fmaf(qa.w, kf[3], a);
                    a = fmaf(qb.x, kf[4], a);
                    a = fmaf(qb.y, kf[5], a);
                    a = fmaf(qb.z, kf[6], a);
                    a = fmaf(qb.w, kf[7], a);
                    s[i] = a;
                }
            }
            // sum the dim shares (lanes r, r + KW, ...), mask, then the warp's online softmax per query
            float al[Q];
            bool rescale = false;
#pragma unroll
            for (int i = 0; i < Q; i++) {
#pragma unroll
                for (int o = KW; o < 32; o <<= 1) s[i] += __shfl_xor_sync(0xffffffffu, s[i], o);
                float x = (kb + r <= pos_s[i]) ? s[i] : -INFINITY;
                float mx = x;
#pragma unroll
                for (int o = 1; o < KW; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
                const float m_new = fmaxf(m_w[i], mx);
                const float m_safe = m_new == -INFINITY ? 0.f : m_new;
                const float p = exp2f(x - m_safe);
                float sum = p;
#pragma unroll
                for (int o = 1; o < KW; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
                al[i] = exp2f(m_w[i] - m_safe);
                rescale |= al[i] != 1.f;
                l_w[i] = l_w[i] * al[i] + sum;
                m_w[i] = m_new;
                s[i] = p;
            }
            if (part == 0) {
                if (Q % 4 == 0) {
#pragma unroll
                    for (int i = 0; i < Q; i += 4)
                        *(float4*)(pw + qk_r * C::QP + i) = make_float4(s[i], s[i + 1], s[i + 2], s[i + 3]);
                } else {
#pragma unroll
                    for (int i = 0; i < Q; i++) pw[qk_r * C::QP + i] = s[i];
                }
            }
            __syncwarp();
            if (rescale) {  // warp-uniform
#pragma unroll
                for (int i = 0; i < Q; i++)
#pragma unroll
                    for (int c = 0; c < 8; c++) acc[i][c] *= al[i];
            }
#pragma unroll
            for (int j = 0; j < KPL; j++) {
                const int lr = ksub + KSUB * j;  // key within the warp
                float vf[8];
                bf16x8_to_f32(*(const uint4*)(v_tile + (warp * KW + lr) * C::KROW + dg * 8), vf);
                float p[Q];
                if (Q % 4 == 0) {
#pragma unroll
                    for (int i = 0; i < Q; i += 4) {
                        float4 x = *(const float4*)(pw + lr * C::QP + i);
                        p[i] = x.x;
                        p[i + 1] = x.y;
                        p[i + 2] = x.z;
                        p[i + 3] = x.w;
                    }
                } else {
#pragma unroll
                    for (int i = 0; i < Q; i++) p[i] = pw[lr * C::QP + i];
                }
#pragma unroll
                for (int i = 0; i < Q; i++)
#pragma unroll
                    for (int c = 0; c < 8; c++) acc[i][c] = fmaf(p[i], vf[c], acc[i][c]);
            }
        }
        // merge: key subsets of a warp by shuffles, then the 4 warps through shared memory
#pragma unroll
        for (int i = 0; i < Q; i++)
#pragma unroll
            for (int c = 0; c < 8; c++)
#pragma unroll
                for (int o = C::DC; o < 32; o <<= 1) acc[i][c] += __shfl_xor_sync(0xffffffffu, acc[i][c], o);
        __syncthreads();  // every warp is done with the K/V tiles (the merge area overlaps them)
        float* mw_s = red + 4 * Q * D;  // [4][Q]
        float* lw_s = mw_s + 4 * Q;     // [4][Q]
        if (ksub == 0) {
#pragma unroll
            for (int i = 0; i < Q; i++) {
                float* dst = red + (warp * Q + i) * D + dg * 8;
                *(float4*)dst = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
                *(float4*)(dst + 4) = make_float4(acc[i][4], acc[i][5], acc[i][6], acc[i][7]);
            }
        }
        if (lane == 0) {
#pragma unroll
            for (int i = 0; i < Q; i++) {
                mw_s[warp * Q + i] = m_w[i];
                lw_s[warp * Q + i] = l_w[i];
            }
        }
        __syncthreads();
        for (int i = tid; i < Q * d; i += C::NT) {
            const int qi = i / d, c = i % d;
            const long u = u0 + qi;
            if (u >= n_u) continue;
            float mx = -INFINITY;
#pragma unroll
            for (int w = 0; w < 4; w++) mx = fmaxf(mx, mw_s[w * Q + qi]);
            const float m_safe = mx == -INFINITY ? 0.f : mx;
            float l = 0.f, o = 0.f;
#pragma unroll
            for (int w = 0; w < 4; w++) {
                const float e = exp2f(mw_s[w * Q + qi] - m_safe);
                l = fmaf(e, lw_s[w * Q + qi], l);
                o = fmaf(e, red[(w * Q + qi) * D + c], o);
            }
            const long row = u / G, h = (long)g * G + u % G;
            const long pidx = row * heads + h;
            if (nsplit == 1) {
                out[pidx * d + c] = l > 0.f ? o / l : 0.f;
            } else {
                const long slot = pidx * nsplit + split;
                if (l > 0.f) part_acc[slot * d + c] = o;
                if (c == 0) {
                    part_ml[slot * 2] = mx;
                    part_ml[slot * 2 + 1] = l;
                }
            }
        }
    } else {
    // PV ownership
    const int dg = tid % C::DG;
    const int qg = (tid / C::DG) % C::QG;
    const int ks = tid / (C::DG * C::QG);
    const int q0 = qg * C::QPT;
    float acc[C::QPT][8];
#pragma unroll
    for (int i = 0; i < C::QPT; i++)
#pragma unroll
        for (int c = 0; c < 8; c++) acc[i][c] = 0.f;

    // QK ownership
    const int kt = tid % C::KT;
    const int qgk = tid / C::KT;

    load_tile(t_begin, 0);
    cp_async_commit();
    for (int t = t_begin; t < t_end; t++) {
        const int st = attn_next_tile(t, t_begin, t_end, load_tile);
        const bf16_t* ks_tile = kv + st * (2 * C::TK * C::KROW);
        const bf16_t* vs_tile = ks_tile + C::TK * C::KROW;
        const int kb = t * C::TK;

        // scores S[key][query] = q . k (already scaled to log2 units), masked past each query's position
        {
            float s[C::QPTK][C::KPT];
#pragma unroll
            for (int i = 0; i < C::QPTK; i++)
#pragma unroll
                for (int j = 0; j < C::KPT; j++) s[i][j] = 0.f;
#pragma unroll 4
            for (int c = 0; c < C::DC; c++) {
                float kf[C::KPT][8];
#pragma unroll
                for (int j = 0; j < C::KPT; j++) {
                    uint4 w = *(const uint4*)(ks_tile + (kt + j * C::KT) * C::KROW + c * 8);
                    bf16x8_to_f32(w, kf[j]);
                }
#pragma unroll
                for (int i = 0; i < C::QPTK; i++) {
                    int qi = qgk + i * C::NQG;
                    if (C::QPTK * C::NQG > Q && qi >= Q) qi = Q - 1;  // clamp (result discarded)
                    const float4 qa = *(const float4*)(qs + qi * C::QROW + c * 8);
                    const float4 qb = *(const float4*)(qs + qi * C::QROW + c * 8 + 4);
#pragma unroll
                    for (int j = 0; j < C::KPT; j++) {
                        float a = s[i][j];
                        a = fmaf(qa.x, kf[j][0], a);
                        a = fmaf(qa.y, kf[j][1], a);
                        a = fmaf(qa.z, kf[j][2], a);
                        a = fmaf(qa.w, kf[j][3], a);
                        a = fmaf(qb.x, kf[j][4], a);
                        a = fmaf(qb.y, kf[j][5], a);
                        a = fmaf(qb.z, kf[j][6], a);
                        a = fmaf(qb.w, kf[j][7], a);
                        s[i][j] = a;
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < C::QPTK; i++) {
                int qi = qgk + i * C::NQG;
                if (qi < Q) {
                    int p = pos_s[qi];
#pragma unroll
                    for (int j = 0; j < C::KPT; j++) {
                        int r = kt + j * C::KT;
                        ps[r * C::QP + qi] = (kb + r <= p) ? s[i][j] : -INFINITY;
                    }
                }
            }
        }
        __syncthreads();

        // online softmax: a warp per query
        for (int qi = warp; qi < Q; qi += C::NT / 32) {
            float v[C::TK / 32];
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < C::TK / 32; j++) {
                v[j] = ps[(lane + 32 * j) * C::QP + qi];
                mx = fmaxf(mx, v[j]);
            }
            mx = warp_max(mx);
            float m_old = m_s[qi];
            float m_new = fmaxf(m_old, mx);
            float m_safe = m_new == -INFINITY ? 0.f : m_new;
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < C::TK / 32; j++) {
                float p = exp2f(v[j] - m_safe);
                ps[(lane + 32 * j) * C::QP + qi] = p;
                sum += p;
            }
            sum = warp_sum(sum);
            if (lane == 0) {
                float alpha = exp2f(m_old - m_safe);
                a_s[qi] = alpha;
                l_s[qi] = l_s[qi] * alpha + sum;
                m_s[qi] = m_new;
            }
        }
        __syncthreads();

        // acc = acc * alpha + P V
        {
            float al[C::QPT];
            bool rescale = false;
#pragma unroll
            for (int i = 0; i < C::QPT; i++) {
                al[i] = a_s[q0 + i];
                rescale |= al[i] != 1.f;
            }
            if (rescale) {
#pragma unroll
                for (int i = 0; i < C::QPT; i++)
#pragma unroll
                    for (int c = 0; c < 8; c++) acc[i][c] *= al[i];
            }
#pragma unroll 4
            for (int j = 0; j < (C::TK + C::KS - 1) / C::KS; j++) {
                const int r = ks + j * C::KS;
                if (C::TK % C::KS != 0 && r >= C::TK) break;
                uint4 w = *(const uint4*)(vs_tile + r * C::KROW + dg * 8);
                float vf[8];
                bf16x8_to_f32(w, vf);
                float p[C::QPT];
                if (C::QPT % 4 == 0) {
#pragma unroll
                    for (int i = 0; i < C::QPT; i += 4) {
                        float4 x = *(const float4*)(ps + r * C::QP + q0 + i);
                        p[i] = x.x;
                        p[i + 1] = x.y;
                        p[i + 2] = x.z;
                        p[i + 3] = x.w;
                    }
                } else {
#pragma unroll
                    for (int i = 0; i < C::QPT; i++) p[i] = ps[r * C::QP + q0 + i];
                }
#pragma unroll
                for (int i = 0; i < C::QPT; i++)
#pragma unroll
                    for (int c = 0; c < 8; c++) acc[i][c] = fmaf(p[i], vf[c], acc[i][c]);
            }
        }
        __syncthreads();  // the stage just read is refilled next iteration
    }

    // sum the KS key subsets: red[ks][q][dim]
#pragma unroll
    for (int i = 0; i < C::QPT; i++) {
        float* dst = red + ((long)ks * Q + q0 + i) * D + dg * 8;
        *(float4*)dst = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
        *(float4*)(dst + 4) = make_float4(acc[i][4], acc[i][5], acc[i][6], acc[i][7]);
    }
    __syncthreads();
    for (int i = tid; i < Q * d; i += C::NT) {
        int qi = i / d, c = i % d;
        long u = u0 + qi;
        if (u >= n_u) continue;
        float o = 0.f;
#pragma unroll 4
        for (int k2 = 0; k2 < C::KS; k2++) o += red[((long)k2 * Q + qi) * D + c];
        long row = u / G, h = (long)g * G + u % G;
        long pidx = row * heads + h;
        float l = l_s[qi];
        if (nsplit == 1) {
            out[pidx * d + c] = l > 0.f ? o / l : 0.f;
        } else {
            long slot = pidx * nsplit + split;
            if (l > 0.f) part_acc[slot * d + c] = o;
            if (c == 0) {
                part_ml[slot * 2] = m_s[qi];
                part_ml[slot * 2 + 1] = l;
            }
        }
    }
    }
}

#define ATTN_KERNEL(D, Q, MINB)                                                                                      \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS, MINB)                                                 \
        attn_d##D##_q##Q(const float* __restrict__ q, const bf16_t* __restrict__ kc, const bf16_t* __restrict__ vc, \
                         const int* __restrict__ positions, float* __restrict__ out, float* __restrict__ part_acc, \
                         float* __restrict__ part_ml, int m, int heads, int kvh, int d, int cap, float scale_log2,  \
                         int aligned, int row_tiles) { FB_PROLOGUE();                                            \
        attn_body<D, Q, false>(q, kc, vc, positions, out, part_acc, part_ml, m, heads, kvh, d, cap, scale_log2,    \
                               aligned, row_tiles, nullptr, nullptr, 0, 0);                                         \
    }
// the same over a paged cache (rows one at a time)
#define ATTN_KERNEL_PG(D, Q, MINB)                                                                                   \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS, MINB)                                                 \
        attn_d##D##_q##Q##_pg(const float* __restrict__ q, const bf16_t* __restrict__ kc,                            \
                              const bf16_t* __restrict__ vc, const int* __restrict__ positions,                      \
                              float* __restrict__ out, float* __restrict__ part_acc, float* __restrict__ part_ml,    \
                              int m, int heads, int kvh, int d, int cap, float scale_log2, int aligned,             \
                              int row_tiles, const int* __restrict__ tables, const int* __restrict__ seqs,          \
                              int width, int shift) { FB_PROLOGUE();                                               \
        attn_body<D, Q, true>(q, kc, vc, positions, out, part_acc, part_ml, m, heads, kvh, d, cap, scale_log2,     \
                              aligned, row_tiles, tables, seqs, width, shift);                                      \
    }

// decode kernels: 4 blocks per SM (3 where 128 registers would spill); their paged twins one step lower at q8
#define ATTN_DECODE(D, B) ATTN_KERNEL(D, 1, B) ATTN_KERNEL(D, 2, B) ATTN_KERNEL(D, 4, B) ATTN_KERNEL(D, 8, 3)  \
    ATTN_KERNEL_PG(D, 1, B) ATTN_KERNEL_PG(D, 2, B) ATTN_KERNEL_PG(D, 4, B) ATTN_KERNEL_PG(D, 8, 2)
ATTN_DECODE(8, 4)
ATTN_DECODE(16, 4)
ATTN_DECODE(32, 4)
ATTN_DECODE(64, 4)
ATTN_DECODE(128, 4)
ATTN_DECODE(256, 3)
ATTN_KERNEL(8, 64, 2)
ATTN_KERNEL(16, 64, 2)
ATTN_KERNEL(32, 64, 2)
ATTN_KERNEL(64, 64, 2)
ATTN_KERNEL(128, 64, 2)
ATTN_KERNEL(256, 32, 2)

// Merge split partials: out[p, :] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over splits with l_s > 0
// (zeros when none). A block (32 to 512 threads, a multiple of 32) per (row, head) p; warp w takes splits w,
// w + NW, ... (four loads in flight), lanes 4 dims each. nsplit <= 256, d <= 256, d % 4 == 0.
#define COMBINE_THREADS 512
extern "C" __global__ void __launch_bounds__(COMBINE_THREADS) attn_combine(const float* __restrict__ part_acc,
                                                                          const float* __restrict__ part_ml,
                                                                          float* __restrict__ out, int nsplit, int d) {
    FB_PROLOGUE();
    const int NW = blockDim.x >> 5;
    __shared__ float w_s[256];
    __shared__ __attribute__((aligned(16))) float red[COMBINE_THREADS / 32][256];
    __shared__ float scratch[32];
    const long p = blockIdx.x;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const float* ml = part_ml + p * nsplit * 2;
    float mx = -INFINITY;
    for (int s = tid; s < nsplit; s += blockDim.x)
        if (ml[2 * s + 1] > 0.f) mx = fmaxf(mx, ml[2 * s]);
    mx = block_max(mx, scratch);
    float l = 0.f;
    for (int s = tid; s < nsplit; s += blockDim.x) {
        float ls = ml[2 * s + 1];
        float w = ls > 0.f ? exp2f(ml[2 * s] - mx) : 0.f;
        w_s[s] = w;
        l += w * ls;
    }
    l = block_sum(l, scratch);  // (its barriers also publish w_s)
    const float* acc = part_acc + p * nsplit * (long)d;
    const int d4 = d >> 2;
    for (int c4 = lane; c4 < d4; c4 += 32) {
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        int s = warp;
        for (; s + 3 * NW < nsplit; s += 4 * NW) {
            float w[4];
            float4 a[4];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                w[k] = w_s[s + k * NW];
                a[k] = w[k] != 0.f ? ((const float4*)(acc + (long)(s + k * NW) * d))[c4]
                                   : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
            for (int k = 0; k < 4; k++) {
                x.x = fmaf(w[k], a[k].x, x.x);
                x.y = fmaf(w[k], a[k].y, x.y);
                x.z = fmaf(w[k], a[k].z, x.z);
                x.w = fmaf(w[k], a[k].w, x.w);
            }
        }
        for (; s < nsplit; s += NW) {
            float w = w_s[s];
            if (w != 0.f) {
                float4 a = ((const float4*)(acc + (long)s * d))[c4];
                x.x = fmaf(w, a.x, x.x);
                x.y = fmaf(w, a.y, x.y);
                x.z = fmaf(w, a.z, x.z);
                x.w = fmaf(w, a.w, x.w);
            }
        }
        *(float4*)&red[warp][4 * c4] = x;
    }
    __syncthreads();
    float inv = l > 0.f ? 1.0f / l : 0.f;
    for (int c = tid; c < d; c += blockDim.x) {
        float o = 0.f;
        for (int w = 0; w < NW; w++) o += red[w][c];
        out[p * d + c] = o * inv;
    }
}

// ---------------------------------------------------------------------------
// The f32 cache (`FUSEBOX_KV_DTYPE=f32`, "exact" precision): a plain kernel,
// one block per (query row, head), for parity with the CPU's f32 path. It
// favours simplicity over speed; the bf16 kernels above are the fast path.

extern "C" __global__ void kv_write_f32(const float* __restrict__ k, const float* __restrict__ v,
                                        const int* __restrict__ positions, float* __restrict__ kc,
                                        float* __restrict__ vc, int row, int cap) {
    FB_PROLOGUE();
    int i = blockIdx.x;
    int p = positions[i];
    if (p < 0 || p >= cap) return;
    const float* src = (blockIdx.y == 0 ? k : v) + (long)i * row;
    float* dst = (blockIdx.y == 0 ? kc : vc) + (long)p * row;
    for (int j = threadIdx.x; j < row; j += blockDim.x) dst[j] = src[j];
}

// q, out f32 [m, heads, d]; kc, vc f32 [cap, kvh, d]; 128 threads; d <= 256.
// Each warp walks a strided subset of keys with its own online softmax; the
// four warps merge at the end (fixed order: deterministic).
extern "C" __global__ void __launch_bounds__(128) attn_f32cache(const float* __restrict__ q, const float* __restrict__ kc,
                                                              const float* __restrict__ vc, const int* __restrict__ positions,
                                                              float* __restrict__ out, int heads, int kvh, int d, int cap,
                                                              float scale) {
    FB_PROLOGUE();
    __shared__ float qs[256];
    __shared__ float wm[4], wl[4];
    __shared__ float wacc[4][256];
    int row = blockIdx.x / heads, h = blockIdx.x % heads;
    int g = h / (heads / kvh);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float* qr = q + ((long)row * heads + h) * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) qs[j] = qr[j];
    __syncthreads();
    int p = positions[row];
    float* o = out + ((long)row * heads + h) * d;
    if (p < 0 || p >= cap) {
        for (int j = threadIdx.x; j < d; j += blockDim.x) o[j] = 0.f;
        return;
    }
    int len = p + 1;
    // per lane: up to 8 output dims (d <= 256)
    float acc[8];
#pragma unroll
    for (int c = 0; c < 8; c++) acc[c] = 0.f;
    float mx = -INFINITY, l = 0.f;
    long stride = (long)kvh * d;
    for (int key = warp; key < len; key += 4) {
        const float* kr = kc + key * stride + (long)g * d;
        float s = 0.f;
        for (int j = lane; j < d; j += 32) s += qs[j] * kr[j];
        s = warp_sum(s) * scale;
        float nm = fmaxf(mx, s);
        float corr = expf(mx - nm), e = expf(s - nm);
        l = l * corr + e;
        const float* vr = vc + key * stride + (long)g * d;
#pragma unroll
        for (int c = 0; c < 8; c++) {
            int j = lane + 32 * c;
            acc[c] = acc[c] * corr + (j < d ? e * vr[j] : 0.f);
        }
        mx = nm;
    }
    if (lane == 0) {
        wm[warp] = mx;
        wl[warp] = l;
    }
#pragma unroll
    for (int c = 0; c < 8; c++) {
        int j = lane + 32 * c;
        if (j < d) wacc[warp][j] = acc[c];
    }
    __syncthreads();
    float M = fmaxf(fmaxf(wm[0], wm[1]), fmaxf(wm[2], wm[3]));
    float L = 0.f, f[4];
#pragma unroll
    for (int w = 0; w < 4; w++) {
        f[w] = wm[w] == -INFINITY ? 0.f : expf(wm[w] - M);
        L += wl[w] * f[w];
    }
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float a = 0.f;
#pragma unroll
        for (int w = 0; w < 4; w++) a += wacc[w][j] * f[w];
        o[j] = a / L;
    }
}
