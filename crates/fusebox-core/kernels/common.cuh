// common.cuh: types and helpers shared by every fusebox kernel file.
// NVRTC compiles each .cu file with this header spliced in; no CUDA headers
// are needed, so the kernels build with nothing but libnvrtc.
typedef unsigned short bf16_t;   // raw bfloat16 bits
typedef unsigned short f16_t;    // raw IEEE half bits
typedef unsigned int u32;
typedef unsigned long long u64;
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// Programmatic dependent launch (Hopper): the backend launches every kernel
// with programmatic stream serialization, so a kernel may start before the
// previous one has finished. EVERY kernel must therefore begin with
// FB_PROLOGUE(): it waits until the previous grid's writes are visible, then
// lets the next kernel be scheduled. (tests/cuda_compile.rs checks this.)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FB_PROLOGUE()                                          \
    do {                                                       \
        asm volatile("griddepcontrol.wait;" ::: "memory");     \
        asm volatile("griddepcontrol.launch_dependents;" ::); \
    } while (0)
// FB_PROLOGUE_DEFERRED(): the first half only (the next kernel may be
// scheduled); the kernel must call fb_grid_wait() before it reads anything an
// earlier kernel wrote or writes anything an earlier kernel reads. For kernels
// that prefetch read-only data (weights) while the previous kernel finishes
// (the GEMV core in gemv.cuh).
#define FB_PROLOGUE_DEFERRED()                                 \
    do {                                                       \
        asm volatile("griddepcontrol.launch_dependents;" ::); \
    } while (0)
__device__ __forceinline__ void fb_grid_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
#else
#define FB_PROLOGUE() do { } while (0)
#define FB_PROLOGUE_DEFERRED() do { } while (0)
__device__ __forceinline__ void fb_grid_wait() {}
#endif

__device__ __forceinline__ float bf16_to_f32(bf16_t x) { return __uint_as_float(((u32)x) << 16); }
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                         // round to nearest even
    return (bf16_t)(u >> 16);
}
__device__ __forceinline__ float f16_to_f32(f16_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
}
__device__ __forceinline__ f16_t f32_to_f16(float f) {
    f16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Element-type tags for templates: 0 = f32, 1 = f16, 2 = bf16.
template <int T> struct Elem;
template <> struct Elem<0> { typedef float t; static __device__ __forceinline__ float load(const float* p, long i) { return p[i]; } };
template <> struct Elem<1> { typedef f16_t t; static __device__ __forceinline__ float load(const f16_t* p, long i) { return f16_to_f32(p[i]); } };
template <> struct Elem<2> { typedef bf16_t t; static __device__ __forceinline__ float load(const bf16_t* p, long i) { return bf16_to_f32(p[i]); } };

__device__ __forceinline__ float load_any(const void* p, int dtype, long i) {
    if (dtype == 0) return ((const float*)p)[i];
    if (dtype == 1) return f16_to_f32(((const f16_t*)p)[i]);
    return bf16_to_f32(((const bf16_t*)p)[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block whose size is a multiple of 32 (at most 1024). `scratch`
// holds 32 floats of shared memory. Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// d += A B on the tensor cores (sm_80+): A 16x16 bf16 (row-major fragments: a0 rows g, k 2t..2t+1; a1 rows
// g + 8; a2, a3 the same at k + 8), B 16x8 bf16 (b0 k 2t..2t+1 of column g; b1 k + 8), d 16x8 f32 (rows g,
// g + 8, columns 2t, 2t + 1), for lane = 4 g + t. Two bf16 share a register, the lower k in the low half.
__device__ __forceinline__ void mma_bf16(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
