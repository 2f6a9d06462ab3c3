// attn.cuh: pieces shared by the attention kernel files (attention.cu: the scalar kernels of every shape;
// attention_tc.cu: the tensor-core prefill kernels). Cache and block conventions: see attention.cu.

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ u32 dynamic_smem_size() {
    u32 r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

// The query vectors of a block: [u0, u0 + Q) of kv head blockIdx.y, those at or past n_u absent.
// row_tiles > 0 (rows taken one at a time): block z takes query tile z % row_tiles of row z / row_tiles only,
// so each row's blocks (key range, splits, tiles) are those of a one-row launch at its position; else the
// m * G query vectors are packed Q to a block. Latest (longest) query tiles first.
__device__ __forceinline__ void attn_vectors(int Q, int m, int G, int row_tiles, long& u0, long& n_u) {
    const int tile = gridDim.z - 1 - blockIdx.z;
    if (row_tiles > 0) {
        const long row = tile / row_tiles;
        u0 = row * G + (long)(tile % row_tiles) * Q;
        n_u = row * G + G;
    } else {
        u0 = (long)tile * Q;
        n_u = (long)m * G;
    }
}

// Query vector u's position: that of its row, -1 (no keys) when u >= n_u or the position is outside [0, cap).
__device__ __forceinline__ int attn_position(const int* __restrict__ positions, long u, long n_u, int G, int cap) {
    if (u >= n_u) return -1;
    const int p = positions[u / G];
    return p < 0 || p >= cap ? -1 : p;
}

// The key range of a block's Q query vectors (positions pos_s, -1 for none): len = 1 + the largest position,
// cut into tiles of TK keys, of which this split (blockIdx.x of gridDim.x) takes [t_begin, t_end).
__device__ __forceinline__ void attn_key_tiles(const int* pos_s, int Q, int TK, int& len, int& t_begin, int& t_end) {
    len = 0;
#pragma unroll 8
    for (int i = 0; i < Q; i++) len = max(len, pos_s[i] + 1);
    const int n_tiles = (len + TK - 1) / TK;
    const int per_split = (n_tiles + gridDim.x - 1) / gridDim.x;
    t_begin = blockIdx.x * per_split;
    t_end = min(t_begin + per_split, n_tiles);
}

// Every output of the block's Q query vectors without computing anything: `value` (NaN: launched with too
// little shared memory; 0: no keys), or with splits a partial of sum l_part (0: empty, read as absent by
// attn_combine; with max 0 and acc `value`).
__device__ __forceinline__ void attn_fill(int Q, long u0, long n_u, int G, int heads, int d, float value,
                                          float m_part, float l_part, float* __restrict__ out,
                                          float* __restrict__ part_acc, float* __restrict__ part_ml) {
    const int nsplit = gridDim.x, split = blockIdx.x, g = blockIdx.y;
    for (int i = threadIdx.x; i < Q * d; i += blockDim.x) {
        long u = u0 + i / d;
        if (u >= n_u) continue;
        long row = u / G, h = (long)g * G + u % G;
        long pidx = row * heads + h;
        long slot = pidx * nsplit + split;
        if (nsplit == 1) out[pidx * d + i % d] = value;
        else {
            if (l_part > 0.f) part_acc[slot * d + i % d] = value;
            if (i % d == 0) {
                part_ml[slot * 2] = m_part;
                part_ml[slot * 2 + 1] = l_part;
            }
        }
    }
}

// A block launched with less dynamic shared memory than `need` bytes writes NaN to every output (a loud
// failure instead of corruption) and returns true; the caller returns.
__device__ __forceinline__ bool attn_smem_short(u32 need, int Q, long u0, long n_u, int G, int heads, int d,
                                                float* __restrict__ out, float* __restrict__ part_acc,
                                                float* __restrict__ part_ml) {
    if (dynamic_smem_size() >= need) return false;
    attn_fill(Q, u0, n_u, G, heads, d, __int_as_float(0x7fc00000), 0.f, 1.f, out, part_acc, part_ml);
    return true;
}

// Elements from a kv head's first cache row to key `key`'s: key * kv_row in a contiguous cache; in a paged
// one (tab: the sequence's block table, blocks of 1 << shift rows) row key % bs of block tab[key / bs].
__device__ __forceinline__ long attn_row_off(int key, long kv_row, const int* __restrict__ tab, int shift) {
    if (tab == nullptr) return (long)key * kv_row;
    const int slot = (__ldg(tab + (key >> shift)) << shift) | (key & ((1 << shift) - 1));
    return (long)slot * kv_row;
}

// Queue the cp.async loads of the key tile starting at key kb into `kd` ([K; V] rows of KROW bf16, TK each);
// rows at or past len and dims past d are zero. Thread tid of NT copies the 16-byte chunk tid % DC of rows
// tid / DC, + NT / DC, ... aligned = 0: cache pointers not 16-byte aligned (synchronous 2-byte copies).
// tab, shift: a paged cache's block table for the sequence (attn_row_off); nullptr: contiguous.
template <int TK, int KROW, int DC, int NT>
__device__ __forceinline__ void attn_load_tile(bf16_t* kd, const bf16_t* kbase, const bf16_t* vbase, long kv_row,
                                               int kb, int len, int d, int aligned,
                                               const int* __restrict__ tab = nullptr, int shift = 0) {
    constexpr int RPS = NT / DC;
    constexpr bool EXACT = RPS <= TK && TK % RPS == 0;  // then row s * RPS + lr0 is K or V by s alone
    const int tid = threadIdx.x;
    const int lc = tid % DC, lr0 = tid / DC;
    const bool lc_ok = lc * 8 < d;
    if (aligned && kb + TK <= len && lc_ok) {
        // a whole tile: no bounds
        const bf16_t* kt0 = kbase + lc * 8;
        const bf16_t* vt0 = vbase + lc * 8;
#pragma unroll
        for (int s = 0; s < (2 * TK + RPS - 1) / RPS; s++) {
            const int rr = lr0 + s * RPS;  // row of [K; V]
            if ((2 * TK) % RPS != 0 && rr >= 2 * TK) break;
            const bool is_v = EXACT ? s * RPS >= TK : rr >= TK;
            const int r = is_v ? rr - TK : rr;
            cp_async16(kd + rr * KROW + lc * 8, (is_v ? vt0 : kt0) + attn_row_off(kb + r, kv_row, tab, shift), 16);
        }
    } else if (aligned) {
#pragma unroll
        for (int s = 0; s < (2 * TK + RPS - 1) / RPS; s++) {
            const int rr = lr0 + s * RPS;  // row of [K; V]
            if ((2 * TK) % RPS != 0 && rr >= 2 * TK) break;
            const bool is_v = rr >= TK;
            const int key = kb + (is_v ? rr - TK : rr);
            const bool ok = key < len && lc_ok;
            const bf16_t* src = (is_v ? vbase : kbase) + (ok ? attn_row_off(key, kv_row, tab, shift) + lc * 8 : 0);
            cp_async16(kd + rr * KROW + lc * 8, src, ok ? 16 : 0);
        }
    } else {
        for (int s = 0; s < (2 * TK + RPS - 1) / RPS; s++) {
            const int rr = lr0 + s * RPS;
            if (rr >= 2 * TK) break;
            const bool is_v = rr >= TK;
            const int key = kb + (is_v ? rr - TK : rr);
            const bool ok = key < len && lc_ok;
            const bf16_t* src = (is_v ? vbase : kbase) + (ok ? attn_row_off(key, kv_row, tab, shift) + lc * 8 : 0);
            bf16_t* dst = kd + rr * KROW + lc * 8;
#pragma unroll
            for (int e = 0; e < 8; e++) dst[e] = ok ? src[e] : (bf16_t)0;
        }
    }
}

// The two-stage tile pipeline of a block's key range [t_begin, t_end): before computing tile t, queue tile t + 1
// (load_tile(t + 1, stage)) and wait until tile t has landed for every thread. Returns tile t's stage.
template <class Load>
__device__ __forceinline__ int attn_next_tile(int t, int t_begin, int t_end, Load& load_tile) {
    const int st = (t - t_begin) & 1;
    if (t + 1 < t_end) {
        load_tile(t + 1, st ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
    } else {
        cp_async_wait<0>();
    }
    __syncthreads();
    return st;
}
