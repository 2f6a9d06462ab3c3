// gemv.cuh: the decode GEMV core (gemv_impl), shared by gemv.cu (one
// product per launch) and fused.cu (products with fused epilogues). The
// design is described at the top of gemv.cu.

// FMT 0..9: the weight formats (gemv.cu); FMT + 16: the same weights through
// integer dot products (IntDot below: 4- and 8-bit affine only).
template <int FMT> struct Fmt {
    static constexpr int B = FMT % 16;  // the weight format
    static constexpr bool INT = FMT >= 16;
    static constexpr bool AFF = B >= 3;
    static constexpr bool G16 = B == 9;  // 6-bit in groups of 16 (GGUF Q6_K); other formats: groups >= 32
    static constexpr int BITS = B == 0 ? 32 : B <= 2 ? 16 : B == 8 ? 8 : B == 9 ? 6 : B - 1;
    static constexpr int LU = B == 0 ? 4 : B <= 2 ? 8 : B == 8 ? 16 : 32;  // values per lane unit
    static constexpr int WORDS = LU * BITS / 32;                                   // u32 words per lane unit
    // affine: f = A0 + q * 2^-P
    static constexpr int P = BITS == 4 ? 8 : BITS;
    static constexpr float A0 = BITS == 4 ? 0.5f : 1.0f;
};

// Rows per warp and ring stages; the Rust launcher mirrors them (`shape` in
// gemv.rs) to size the grid and the shared memory (the kernel checks it).
template <int FMT, int M> struct Cfg {
    typedef Fmt<FMT> F;
    static constexpr int D = 3;
    static constexpr int SBW = F::AFF ? (F::G16 ? 2 : 1) : 0;  // scale (and bias) words per lane and row
    static constexpr int WPL = F::WORDS + 2 * SBW;            // ring words per lane and row
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
    static constexpr int R4 = F::AFF ? 2 : 4;  // before Hopper, 4 affine rows spill at 128 registers
#else
    static constexpr int R4 = 4;
#endif
    // two or four input rows: half one row's (4 spill at 128 registers); eight:
    // 1 (affine) or 2. (Fewer rows a warp than one row's 4 leaves fewer weight
    // bytes in flight: two input rows in the 8-row kernel cost 3.5x one row,
    // docs/benchmark_results/h100-2026-12-07.md.)
    static constexpr int R = M == 1 ? (WPL > 6 ? 2 : R4) : M <= 4 ? R4 / 2 : (F::AFF ? 1 : 2);
    static constexpr int RING = 8 * D * R * 32 * WPL;          // ring words per block (8 warps)
    static constexpr int SUMG = F::G16 ? 16 : F::LU;           // values per staged x sum (one per unit)
};

// cp.async: global -> shared without passing through registers (16 bytes
// bypass the L1; 8 and 4 bytes go through it).
__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cp_async16(u32 s, const void* g) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(g) : "memory");
}
__device__ __forceinline__ void cp_async8(u32 s, const void* g) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(s), "l"(g) : "memory");
}
__device__ __forceinline__ void cp_async4(u32 s, const void* g) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(s), "l"(g) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Copy the WORDS words of one lane unit (16-byte aligned for 4 words, 8 for
// 2 and 6, 4 otherwise) to shared memory at s.
template <int WORDS> __device__ __forceinline__ void copy_unit(u32 s, const u32* g) {
    if constexpr (WORDS == 4) {
        cp_async16(s, g);
    } else if constexpr (WORDS == 2 || WORDS == 6) {
#pragma unroll
        for (int j = 0; j < WORDS; j += 2) cp_async8(s + 4 * j, g + j);
    } else {
#pragma unroll
        for (int j = 0; j < WORDS; j++) cp_async4(s + 4 * j, g + j);
    }
}

// A scale or bias (dtype tag sdt: 0 f32, 1 f16, 2 bf16) as f32: from raw
// bits (a 16-bit value in the low half), or element i of a tensor.
__device__ __forceinline__ float sb_f32(u32 raw, int sdt) {
    return sdt == 0 ? __uint_as_float(raw) : sdt == 2 ? __uint_as_float(raw << 16) : f16_to_f32((f16_t)raw);
}
__device__ __forceinline__ float ld_sb(const void* p, long long i, int sdt) {
    return sdt == 0 ? __ldg((const float*)p + i) : sb_f32(__ldg((const unsigned short*)p + i), sdt);
}

// (a & B) | c in one LOP3 (the compiler would otherwise spend one
// instruction per immediate).
template <u32 B> __device__ __forceinline__ u32 lop3_and_or(u32 a, u32 c) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(a), "n"(B), "r"(c));
    return r;
}
// A constant in a register the optimizer cannot fold into immediates.
template <u32 V> __device__ __forceinline__ u32 reg_const() {
    u32 r;
    asm volatile("mov.b32 %0, %1;" : "=r"(r) : "n"(V));
    return r;
}

// Value I of a lane unit as f32: the weight itself for dense formats, the
// biased f = A0 + q * 2^-P for affine ones.
template <int FMT, int I> __device__ __forceinline__ float unit_value(const u32 (&w)[Fmt<FMT>::WORDS]) {
    constexpr int B = Fmt<FMT>::B;
    if constexpr (B == 0) {
        return __uint_as_float(w[I]);
    } else if constexpr (B == 1) {
        return f16_to_f32((f16_t)((I & 1) ? (w[I / 2] >> 16) : (w[I / 2] & 0xffffu)));
    } else if constexpr (B == 2) {
        return __uint_as_float((I & 1) ? (w[I / 2] & 0xffff0000u) : (w[I / 2] << 16));
    } else if constexpr (Fmt<FMT>::BITS == 4) {
        // nibble I lives in byte (I % 8) / 2 of word I / 8, low half for even I;
        // its byte (0x0q) becomes bits 16..23 of 0x3f0q0000 = 0.5 + q / 256
        const u32 word = w[I / 8];
        const u32 nib = (I & 1) ? ((word >> 4) & 0x0f0f0f0fu) : (word & 0x0f0f0f0fu);
        constexpr u32 SEL = 0x7054u | ((u32)((I % 8) / 2) << 8);
        return __uint_as_float(__byte_perm(nib, reg_const<0x3f000000u>(), SEL));
    } else {
        constexpr int B = Fmt<FMT>::BITS;
        constexpr int P = I * B, WI = P / 32, O = P % 32, T = 23 - B;
        constexpr u32 MASK = ((1u << B) - 1u) << T;
        u32 v;
        if constexpr (O + B > 32) {
            v = __funnelshift_r(w[WI], w[WI + 1], O - T);
        } else if constexpr (O >= T) {
            v = w[WI] >> (O - T);
        } else {
            v = w[WI] << (T - O);
        }
        return __uint_as_float(lop3_and_or<MASK>(v, reg_const<0x3f800000u>()));
    }
}

// q[i] = value C * SUB + i of the unit (compile-time indices throughout).
template <int FMT, int SUB, int C> struct Chunk {
    template <int I> static __device__ __forceinline__ void fill(const u32 (&w)[Fmt<FMT>::WORDS], float (&q)[SUB]) {
        if constexpr (I < SUB) {
            q[I] = unit_value<FMT, C * SUB + I>(w);
            fill<I + 1>(w, q);
        }
    }
};

// SUB (4 or 8) values of x at p (16-byte aligned): shared memory when SX,
// else global memory through the read-only cache.
template <int SUB, bool SX> __device__ __forceinline__ void load_x(const float* p, float (&xv)[SUB]) {
    const float4* xp = (const float4*)p;
#pragma unroll
    for (int j = 0; j < SUB / 4; j++) {
        const float4 t = SX ? xp[j] : __ldg(xp + j);
        xv[4 * j] = t.x;
        xv[4 * j + 1] = t.y;
        xv[4 * j + 2] = t.z;
        xv[4 * j + 3] = t.w;
    }
}

// Chunk C (values C*SUB .. C*SUB+SUB) of one lane unit of R rows against M
// input rows (row mm's values for the unit at xp + mm * xstride, mm < m),
// then the next chunk. Dense: acc += w x. Affine: A[half] += f x.
template <int FMT, int M, int R, bool SX, int C>
__device__ __forceinline__ void unit_chunks(const u32 (&wr)[R][Fmt<FMT>::WORDS], const float* xp, int xstride, int m,
                                            float (&A)[R][M][2], float (&acc)[R][M]) {
    typedef Fmt<FMT> F;
    constexpr int SUB = F::LU < 8 ? F::LU : 8;
    if constexpr (C * SUB < F::LU) {
        constexpr int H = F::G16 ? (C * SUB) / 16 : 0;  // which group of 16 (group size 16 only)
        if constexpr (M == 1) {
            // one input row: x once, then each weight row's values as they are used
            float xv[SUB];
            load_x<SUB, SX>(xp + C * SUB, xv);
#pragma unroll
            for (int r = 0; r < R; r++) {
                float q[SUB];
                Chunk<FMT, SUB, C>::template fill<0>(wr[r], q);
#pragma unroll
                for (int i = 0; i < SUB; i++) {
                    if constexpr (F::AFF) A[r][0][H] = fmaf(q[i], xv[i], A[r][0][H]);
                    else acc[r][0] = fmaf(q[i], xv[i], acc[r][0]);
                }
            }
        } else {
            // up to M input rows (m at run time): every weight row's values
            // first, then each x row once
            float q[R][SUB];
#pragma unroll
            for (int r = 0; r < R; r++) Chunk<FMT, SUB, C>::template fill<0>(wr[r], q[r]);
#pragma unroll
            for (int mm = 0; mm < M; mm++) {
                if (mm < m) {
                    float xv[SUB];
                    load_x<SUB, SX>(xp + mm * xstride + C * SUB, xv);
#pragma unroll
                    for (int r = 0; r < R; r++) {
#pragma unroll
                        for (int i = 0; i < SUB; i++) {
                            if constexpr (F::AFF) A[r][mm][H] = fmaf(q[r][i], xv[i], A[r][mm][H]);
                            else acc[r][mm] = fmaf(q[r][i], xv[i], acc[r][mm]);
                        }
                    }
                }
            }
        }
        unit_chunks<FMT, M, R, SX, C + 1>(wr, xp, xstride, m, A, acc);
    }
}

// One lane unit of R rows: dot products, then (affine) the group's scale s
// and bias b (sv, bv: [r][1] for the second half with group size 16) with the
// unit's x sums X.
template <int FMT, int M, int R, bool SX>
__device__ __forceinline__ void do_unit(const u32 (&wr)[R][Fmt<FMT>::WORDS], const float (&sv)[R][2],
                                        const float (&bv)[R][2], const float (&X)[M][2], const float* xp, int xstride,
                                        int m, float (&acc)[R][M]) {
    typedef Fmt<FMT> F;
    float A[R][M][2];
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int mm = 0; mm < M; mm++) A[r][mm][0] = A[r][mm][1] = 0.f;
    }
    unit_chunks<FMT, M, R, SX, 0>(wr, xp, xstride, m, A, acc);
    if constexpr (F::AFF) {
        constexpr float P2 = (float)(1 << F::P);
#pragma unroll
        for (int r = 0; r < R; r++) {
#pragma unroll
            for (int h = 0; h < (F::G16 ? 2 : 1); h++) {
                const float s = sv[r][h] * P2, c = fmaf(-F::A0, s, bv[r][h]);
#pragma unroll
                for (int mm = 0; mm < M; mm++) acc[r][mm] = fmaf(s, A[r][mm][h], fmaf(c, X[mm][h], acc[r][mm]));
            }
        }
    }
}

// Integer dot products (FMT + 16; 4- and 8-bit affine weights): each
// block quantizes its x window to int16 once per unit of LU values (scale
// amax / 32767, rounded to nearest), and a unit's dot product is exact int32
// arithmetic in dp2a (two int16 x values times two weight bytes a step), so a
// weight costs about one integer instruction instead of an unpack and an FMA.
// With X the unit's exact f32 sum of x and sx its scale:
//   sum (s q + b) x ~ (s sx) sum q xq + b X.
// Staged unit (UB bytes): LU int16 values (4-bit: each 8 ordered 0 2 4 6 1 3 5
// 7, to meet the low and high nibbles of a word), then sx and X (f32), 8
// bytes of padding (which also keeps lanes' 16-byte reads off shared banks).
template <int FMT> struct IntDot {
    typedef Fmt<FMT> F;
    static_assert(!F::INT || (F::B == 5 || F::B == 8), "integer dot products take 4- and 8-bit affine weights");
    static constexpr int UB = 2 * F::LU + 16;
};

__device__ __forceinline__ int dp2a_lo(u32 a, u32 b, int c) {
    int d;
    asm("dp2a.lo.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
__device__ __forceinline__ int dp2a_hi(u32 a, u32 b, int c) {
    int d;
    asm("dp2a.hi.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// The LU values of x at xg (16-byte aligned, global) quantized to int16 as
// the int_dot kernels take them: q[i] = round(v[i] * 32767 / amax), with the
// unit's scale amax / 32767 and its sum (gemv_tc.cu quantizes the same way,
// so its rows equal these bitwise).
template <int LU>
__device__ __forceinline__ void quant_x_unit(const float* xg, int (&q)[LU], float& scale, float& sum) {
    float v[LU];
#pragma unroll
    for (int j = 0; j < LU / 4; j++) {
        const float4 t = __ldg((const float4*)xg + j);
        v[4 * j] = t.x;
        v[4 * j + 1] = t.y;
        v[4 * j + 2] = t.z;
        v[4 * j + 3] = t.w;
    }
    float amax = 0.f;
    sum = 0.f;
#pragma unroll
    for (int i = 0; i < LU; i++) {
        amax = fmaxf(amax, fabsf(v[i]));
        sum += v[i];
    }
    const float inv = amax > 0.f ? 32767.f / amax : 0.f;
#pragma unroll
    for (int i = 0; i < LU; i++) q[i] = __float2int_rn(v[i] * inv);
    scale = amax * (1.f / 32767.f);
}

// Quantize the LU values of x at xg (16-byte aligned, global) into the staged
// unit at dst (shared, 16-byte aligned).
template <int FMT> __device__ __forceinline__ void stage_x_int(const float* xg, char* dst) {
    constexpr int LU = Fmt<FMT>::LU;
    int q[LU];
    float scale, sum;
    quant_x_unit<LU>(xg, q, scale, sum);
    u32 h[LU / 2];
#pragma unroll
    for (int i = 0; i < LU / 2; i++) {
        // pair i holds values a (low half) and b; 4-bit: per 8, pairs (0,2) (4,6) (1,3) (5,7)
        const int o = (i / 4) * 8, t = i % 4;
        const int a = Fmt<FMT>::BITS == 4 ? o + (t & 1) * 4 + (t >> 1) : 2 * i;
        const int b = Fmt<FMT>::BITS == 4 ? a + 2 : 2 * i + 1;
        const u32 qa = (u32)q[a] & 0xffffu, qb = (u32)q[b];
        h[i] = qa | (qb << 16);
    }
    uint4* d4 = (uint4*)dst;
#pragma unroll
    for (int j = 0; j < LU / 8; j++) d4[j] = make_uint4(h[4 * j], h[4 * j + 1], h[4 * j + 2], h[4 * j + 3]);
    *(float2*)(dst + 2 * LU) = make_float2(scale, sum);
}

// One lane unit of R rows against up to M staged x rows (row mm's unit at
// xu + mm * xstride bytes): acc += (s sx) dot + b X.
template <int FMT, int M, int R>
__device__ __forceinline__ void do_unit_int(const u32 (&wr)[R][Fmt<FMT>::WORDS], const float (&sv)[R][2],
                                            const float (&bv)[R][2], const char* xu, int xstride, int m,
                                            float (&acc)[R][M]) {
    typedef Fmt<FMT> F;
    constexpr int WORDS = F::WORDS, LU = F::LU;
    // 4-bit: each word's even values (low nibbles) and odd ones as bytes;
    // 8-bit words are bytes already (dp2a reads them as they are)
    constexpr int NW = F::BITS == 4 ? WORDS : 1;
    u32 lo[R][NW], hi[R][NW];
    if constexpr (F::BITS == 4) {
#pragma unroll
        for (int r = 0; r < R; r++) {
#pragma unroll
            for (int j = 0; j < WORDS; j++) {
                lo[r][j] = wr[r][j] & 0x0f0f0f0fu;
                hi[r][j] = (wr[r][j] >> 4) & 0x0f0f0f0fu;
            }
        }
    }
#pragma unroll
    for (int mm = 0; mm < M; mm++) {
        if (mm < m) {
            const char* xm = xu + mm * xstride;
            int d[R];
#pragma unroll
            for (int r = 0; r < R; r++) d[r] = 0;
#pragma unroll
            for (int j = 0; j < WORDS; j++) {
                if constexpr (F::BITS == 4) {
                    // word j: values 8j..8j+7
                    const uint4 a = ((const uint4*)xm)[j];
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        d[r] = dp2a_lo(a.x, lo[r][j], d[r]);
                        d[r] = dp2a_hi(a.y, lo[r][j], d[r]);
                        d[r] = dp2a_lo(a.z, hi[r][j], d[r]);
                        d[r] = dp2a_hi(a.w, hi[r][j], d[r]);
                    }
                } else if (j % 2 == 0) {
                    // words j, j + 1: values 4j..4j+7
                    const uint4 a = ((const uint4*)xm)[j / 2];
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        d[r] = dp2a_lo(a.x, wr[r][j], d[r]);
                        d[r] = dp2a_hi(a.y, wr[r][j], d[r]);
                        d[r] = dp2a_lo(a.z, wr[r][j + 1], d[r]);
                        d[r] = dp2a_hi(a.w, wr[r][j + 1], d[r]);
                    }
                }
            }
            const float2 sxX = *(const float2*)(xm + 2 * LU);
#pragma unroll
            for (int r = 0; r < R; r++)
                acc[r][mm] = fmaf(sv[r][0] * sxX.x, (float)d[r], fmaf(bv[r][0], sxX.y, acc[r][mm]));
        }
    }
}

// Sum V values (a power of two, <= 32) over the warp with 5 + V - 1 shuffles
// instead of 5 V: at each of the first log2 V levels a lane keeps half of its
// values (the upper half when its lane bit is set) and receives the partner's
// copy of that half. Lane l ends with the total of value reduced_index<V>(l)
// (each value's total is held by 32 / V consecutive lanes).
template <int V, int O = 16>
__device__ __forceinline__ void warp_sum_multi(float (&v)[V], int lane) {
    if constexpr (V > 1) {
        const bool up = (lane & O) != 0;
#pragma unroll
        for (int j = 0; j < V / 2; j++) {
            const float send = up ? v[j] : v[j + V / 2], keep = up ? v[j + V / 2] : v[j];
            v[j] = keep + __shfl_xor_sync(0xffffffffu, send, O);
        }
        float (&h)[V / 2] = *reinterpret_cast<float (*)[V / 2]>(&v[0]);
        warp_sum_multi<V / 2, O / 2>(h, lane);
    } else {
#pragma unroll
        for (int o = O; o > 0; o >>= 1) v[0] += __shfl_xor_sync(0xffffffffu, v[0], o);
    }
}
template <int V> __device__ __forceinline__ int reduced_index(int lane) { return V > 1 ? lane / (32 / V) : 0; }

// The plain output: row `row` of output vector q (a (pair, input row)
// index) at out[q * n + row]. Fused kernels pass their own `store`.
struct RowsOut {
    float* __restrict__ out;
    int n;
    __device__ __forceinline__ void store(int q, int row, float v) const { out[(long long)q * n + row] = v; }
};

// Pairs p < pairs (grid.y): expert ids[p] (0 without ids; an id outside
// [0, experts) writes zeros), input rows from (p / x_div) * k, output rows
// from p * n; m input rows (m <= M) when pairs == 1. Each warp owns row
// groups rg0 .. rg0 + gw - 1; x is staged kw values at a time (kw == k
// unless gw == 1; ksplit > 1 only with gw == 1). smem: the dynamic shared
// bytes the launch provided. bx: the block's index among the blocks of this
// product (blockIdx.x, or less for a fused kernel that runs several products
// side by side). Results go through out.store(pair + input row, row, value).
template <int FMT, int M, class O>
__device__ __forceinline__ void gemv_impl(const char* __restrict__ w, const void* __restrict__ sc,
                                          const void* __restrict__ bi, const float* __restrict__ x, const O& out,
                                          const int* __restrict__ ids, int n, int k, int m, int gs, int sdt,
                                          int ksplit, int x_div, int pairs, int experts, long long w_estride,
                                          long long sb_estride, int kw, int gw, int smem, int bx) {
    typedef Fmt<FMT> F;
    typedef Cfg<FMT, M> CF;
    constexpr int R = CF::R, D = CF::D, WORDS = F::WORDS, LU = F::LU, SBW = CF::SBW, WPL = CF::WPL;
    constexpr bool SX = F::AFF;
    __shared__ float red[8][R * M];
    extern __shared__ float4 dsm4[];
    u32* ring = (u32*)dsm4;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (!SX) kw = k;
    const int mr = min(m, M);
    const int xs = kw + kw / 8;       // padded shared floats per input row
    const int nsum = kw / CF::SUMG;  // x sums per input row
    float* xsm = (float*)(ring + CF::RING);
    float* xsum = xsm + mr * xs;
    {
        // a launch with too little shared memory is a bug in the launcher: make it loud
        const long long need = 4ll * CF::RING + (SX ? 4ll * mr * (xs + nsum) : 0);
        if (blockDim.x != 256 || need > smem) {
            fb_grid_wait();
            for (int i = bx * blockDim.x + threadIdx.x; i < n * mr; i += gridDim.x * blockDim.x)
                out.store(i / n, i % n, __int_as_float(0x7fc00000));
            return;
        }
    }
    u32* wring = ring + warp * (D * R * 32 * WPL);  // this warp's stages
    const int gpb = 8 / ksplit;                      // row-group slots per block
    const int kp = warp % ksplit, gib = warp / ksplit;
    const int ngroups = (n + R - 1) / R;
    const int rg0 = (bx * gpb + gib) * gw;
    const int ngw = max(0, min(gw, ngroups - rg0));  // row groups of this warp
    const int nunits = k / LU;
    const long long rowbytes = (long long)k * F::BITS / 8;
    const int gpr = F::AFF ? k / gs : 0;
    const int lgs = __ffs(gs) - 1;  // group sizes are powers of two
    // Kernels calling this start with FB_PROLOGUE_DEFERRED(): the previous grid is
    // waited for below, once the first weight stages are in flight; expert ids
    // come from an earlier kernel, so with ids it is waited for first.
#ifdef FB_GEMV_NO_PREFETCH
    fb_grid_wait();  // FUSEBOX_GEMV_PREFETCH=0: wait before any load
#else
    if (ids) fb_grid_wait();
#endif
    for (int p = blockIdx.y; p < pairs; p += gridDim.y) {
        const int e = ids ? __ldg(ids + p) : 0;
        if (e < 0 || e >= experts) {
            // an invalid expert id: zeros (uniform across the block)
            if (kp == 0) {
                for (int i = lane; i < ngw * R * M; i += 32) {
                    const int g = i / (R * M), r = (i / M) % R, mm = i % M;
                    const int row = (rg0 + g) * R + r;
                    if (row < n && mm < m) out.store(p + mm, row, 0.f);
                }
            }
            continue;
        }
        const char* we = w + (long long)e * w_estride;
        const int sbe = (int)(e * sb_estride);  // scale indices fit 31 bits (checked by the launcher)
        const float* xb = x + (long long)(p / x_div) * k;
        float acc[R][M];
#pragma unroll
        for (int r = 0; r < R; r++) {
#pragma unroll
            for (int mm = 0; mm < M; mm++) acc[r][mm] = 0.f;
        }
        for (int w0 = 0; w0 < k; w0 += kw) {
            // this window's steps; this warp's tasks are (row group g, step s)
            // for g < ngw and s = sfirst, sfirst + ksplit, ... < sw1
            const int sw0 = w0 / (32 * LU), sw1 = (min(w0 + kw, k) / LU + 31) >> 5;
            const int sfirst = sw0 + kp;
            const int per_g = sfirst < sw1 ? (sw1 - sfirst + ksplit - 1) / ksplit : 0;
            const int ntasks = ngw * per_g;
            // copy the next task (ig, is) into the next stage and advance; always one
            // commit group. iw / isb: the issuing row group's rows and first scales.
            int it = 0, ig = 0, is = sfirst;
            const char* iw[R];
            int isb[R];
            auto issue_rows = [&]() {
#pragma unroll
                for (int r = 0; r < R; r++) {
                    const int row = min((rg0 + ig) * R + r, n - 1);
                    iw[r] = we + (long long)row * rowbytes;
                    isb[r] = sbe + row * gpr;
                }
            };
            issue_rows();
            const int hs = sdt != 0;  // 16-bit scales: copy the aligned word that holds one
            int ist = 0;              // the issuing stage
            auto issue = [&]() {
                if (it < ntasks) {
                    const int u = is * 32 + lane;
                    if (u < nunits) {
                        u32* st = wring + ist * (R * 32 * WPL);
                        const int gu = F::G16 ? 2 * u : (u * LU) >> lgs;
#pragma unroll
                        for (int r = 0; r < R; r++) {
                            u32* sr = st + r * 32 * WPL;
                            copy_unit<WORDS>(smem_addr(sr + lane * WORDS), (const u32*)iw[r] + u * WORDS);
                            if constexpr (F::AFF) {
                                // per lane: [scale, bias] words, or [s0, s1, b0, b1] for group 16
                                const int gi = isb[r] + gu;
                                const u32 ss = smem_addr(sr + 32 * WORDS + lane * 2 * SBW);
                                if constexpr (SBW == 2) {
                                    if (hs) {
                                        cp_async4(ss, (const u32*)sc + (gi >> 1));
                                        cp_async4(ss + 8, (const u32*)bi + (gi >> 1));
                                    } else {
                                        cp_async8(ss, (const u32*)sc + gi);
                                        cp_async8(ss + 8, (const u32*)bi + gi);
                                    }
                                } else {
                                    cp_async4(ss, (const u32*)sc + (gi >> hs));
                                    cp_async4(ss + 4, (const u32*)bi + (gi >> hs));
                                }
                            }
                        }
                    }
                    ist = ist + 1 == D ? 0 : ist + 1;
                    it++;
                    is += ksplit;
                    if (is >= sw1) {
                        ig++;
                        is = sfirst;
                        if (ig < ngw) issue_rows();
                    }
                }
                cp_async_commit();
            };
            // the first stages of weights are read-only: copy them before waiting for
            // the previous kernel (programmatic dependent launch), so their latency
            // overlaps its tail; x and everything written comes after the wait
#pragma unroll
            for (int t = 0; t < D - 1; t++) issue();
            fb_grid_wait();  // (returns at once after the first time)
            if constexpr (Fmt<FMT>::INT) {
                __syncthreads();  // the previous window's readers are done
                const int nu = min(kw, k - w0) / LU;
                for (int i = threadIdx.x; i < mr * nu; i += blockDim.x) {
                    const int mm = i / nu, j = i - mm * nu;
                    stage_x_int<FMT>(xb + (long long)mm * k + w0 + j * LU,
                                     (char*)xsm + (mm * (kw / LU) + j) * IntDot<FMT>::UB);
                }
                __syncthreads();
            } else if constexpr (SX) {
                __syncthreads();  // the previous window's readers are done
                const int nx = min(kw, k - w0);
                for (int mm = 0; mm < mr; mm++) {
                    for (int c = threadIdx.x * 4; c < nx; c += blockDim.x * 4)
                        cp_async16(smem_addr(xsm + mm * xs + c + ((c >> 5) << 2)), xb + (long long)mm * k + w0 + c);
                }
                cp_async_commit();
                // x (the newest group) has landed: publish it, then the sums
                cp_async_wait<0>();
                __syncthreads();
                for (int i = threadIdx.x; i < mr * nsum; i += blockDim.x) {
                    const int mm = i / nsum, c = (i - mm * nsum) * CF::SUMG;
                    float t = 0.f;
                    if (c < nx) {
                        const float* xp = xsm + mm * xs + c + ((c >> 5) << 2);
#pragma unroll
                        for (int j = 0; j < CF::SUMG; j++) t += xp[j];
                    }
                    xsum[i] = t;
                }
                __syncthreads();
            }
            int g = 0, s = sfirst;
            // bit r: the parity of row r's first scale index (which half of a word holds a 16-bit scale)
            auto parities = [&](int gg) {
                int bits = 0;
#pragma unroll
                for (int r = 0; r < R; r++) bits |= ((sbe + min((rg0 + gg) * R + r, n - 1) * gpr) & 1) << r;
                return bits;
            };
            int par = parities(0);
            int cst = 0;  // the computing stage
            for (int t = 0; t < ntasks; t++) {
                issue();
                cp_async_wait<D - 1>();  // task t's copies (this lane's own) have landed
                const int u = s * 32 + lane;
                if (u < nunits) {
                    const u32* st = wring + cst * (R * 32 * WPL);
                    u32 wr[R][WORDS];
                    float sv[R][2], bv[R][2];
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        const u32* sr = st + r * 32 * WPL;
                        if constexpr (WORDS == 4) {
                            const uint4 v = *(const uint4*)(sr + lane * 4);
                            wr[r][0] = v.x;
                            wr[r][1] = v.y;
                            wr[r][2] = v.z;
                            wr[r][3] = v.w;
                        } else {
#pragma unroll
                            for (int j = 0; j < WORDS; j++) wr[r][j] = sr[lane * WORDS + j];
                        }
                        sv[r][0] = sv[r][1] = bv[r][0] = bv[r][1] = 0.f;
                        if constexpr (SBW == 2) {
                            const uint4 v = *(const uint4*)(sr + 32 * WORDS + lane * 4);
                            sv[r][0] = sb_f32(v.x, sdt);
                            sv[r][1] = sb_f32(hs ? v.x >> 16 : v.y, sdt);
                            bv[r][0] = sb_f32(v.z, sdt);
                            bv[r][1] = sb_f32(hs ? v.z >> 16 : v.w, sdt);
                        } else if constexpr (SBW == 1) {
                            // a 16-bit value sits in the upper half when its index is odd
                            const uint2 v = *(const uint2*)(sr + 32 * WORDS + lane * 2);
                            const int sh = hs ? (((par >> r) ^ ((u * LU) >> lgs)) & 1) << 4 : 0;
                            sv[r][0] = sb_f32(v.x >> sh, sdt);
                            bv[r][0] = sb_f32(v.y >> sh, sdt);
                        }
                    }
                    if constexpr (Fmt<FMT>::INT) {
                        const int c = u * LU - w0;
                        do_unit_int<FMT, M, R>(wr, sv, bv, (const char*)xsm + (c / LU) * IntDot<FMT>::UB,
                                               (kw / LU) * IntDot<FMT>::UB, m, acc);
                    } else if constexpr (SX) {
                        const int c = u * LU - w0;
                        float X[M][2];
#pragma unroll
                        for (int mm = 0; mm < M; mm++) {
                            const int i = (mm < mr ? mm : 0) * nsum + c / CF::SUMG;
                            X[mm][0] = xsum[i];
                            X[mm][1] = F::G16 ? xsum[i + 1] : 0.f;
                        }
                        do_unit<FMT, M, R, true>(wr, sv, bv, X, xsm + c + ((c >> 5) << 2), xs, m, acc);
                    } else {
                        float X[M][2];
                        do_unit<FMT, M, R, false>(wr, sv, bv, X, xb + (long long)u * LU, k, m, acc);
                    }
                }
                // the next task; a finished row group (only with ksplit == 1) is written
                cst = cst + 1 == D ? 0 : cst + 1;
                const int gt = g;
                s += ksplit;
                if (s >= sw1) {
                    g++;
                    s = sfirst;
                    if (F::AFF && g < ngw) par = parities(g);
                }
                if (ksplit == 1 && w0 + kw >= k && (t + 1 == ntasks || g != gt)) {
                    float v[R * M];
#pragma unroll
                    for (int r = 0; r < R; r++) {
#pragma unroll
                        for (int mm = 0; mm < M; mm++) {
                            v[r * M + mm] = acc[r][mm];
                            acc[r][mm] = 0.f;
                        }
                    }
                    warp_sum_multi<R * M>(v, lane);
                    const int i = reduced_index<R * M>(lane), r = i / M, mm = i % M;
                    const int row = (rg0 + gt) * R + r;
                    if ((lane & (32 / (R * M) - 1)) == 0 && row < n && mm < m) out.store(p + mm, row, v[0]);
                }
            }
            cp_async_wait<0>();
        }
        if (ksplit > 1) {
            // sum the k slices of the block's row groups
            float v[R * M];
#pragma unroll
            for (int r = 0; r < R; r++) {
#pragma unroll
                for (int mm = 0; mm < M; mm++) v[r * M + mm] = acc[r][mm];
            }
            warp_sum_multi<R * M>(v, lane);
            if ((lane & (32 / (R * M) - 1)) == 0) red[warp][reduced_index<R * M>(lane)] = v[0];
            __syncthreads();
            if (kp == 0 && ngw > 0 && lane < R * M) {
                const int r = lane / M, mm = lane % M;
                float v = 0.f;
                for (int j = 0; j < ksplit; j++) v += red[warp + j][lane];
                const int row = rg0 * R + r;
                if (row < n && mm < m) out.store(p + mm, row, v);
            }
            __syncthreads();
        }
    }
}

