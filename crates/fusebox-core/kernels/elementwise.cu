// elementwise.cu: residual add, SiLU-multiply, row copies, f32 -> bf16
// conversion (cuBLAS operands), and random fill (synthetic weights).
#include "common.cuh"

extern "C" __global__ void add_assign_f32(float* __restrict__ x, const float* __restrict__ y, long n) {
    FB_PROLOGUE();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) x[i] += y[i];
}

// out = silu(gate) * up, as on the CPU: g / (1 + exp(-g)) * u
extern "C" __global__ void silu_mul_f32(const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ out, long n) {
    FB_PROLOGUE();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = g[i];
        out[i] = v / (1.0f + expf(-v)) * u[i];
    }
}

// Copy n bytes (a multiple of 4) between device buffers.
extern "C" __global__ void copy_words(const u32* __restrict__ src, u32* __restrict__ dst, long words) {
    FB_PROLOGUE();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < words; i += (long)gridDim.x * blockDim.x) dst[i] = src[i];
}

// dst[r, col + j] = src[r, j] for src [m, n] into dst [m, wide] (one slot of a row-wise concat).
extern "C" __global__ void copy_cols_f32(const float* __restrict__ src, float* __restrict__ dst, long m, long n,
                                         long wide, long col) {
    FB_PROLOGUE();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < m * n; i += (long)gridDim.x * blockDim.x)
        dst[(i / n) * wide + col + i % n] = src[i];
}

extern "C" __global__ void f32_to_bf16_k(const float* __restrict__ x, bf16_t* __restrict__ y, long n) {
    FB_PROLOGUE();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) y[i] = f32_to_bf16(x[i]);
}

__device__ __forceinline__ u64 splitmix64(u64 x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// Fill with pseudo-random data: dtype 0/1/2 = f32/f16/bf16 uniform in
// [lo, hi); 3 = raw random 32-bit words (packed integers). n counts elements
// (words for dtype 3).
extern "C" __global__ void fill_random_k(void* p, long n, int dtype, u64 seed, float lo, float hi) {
    FB_PROLOGUE();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        u64 r = splitmix64(seed ^ splitmix64((u64)i));
        float u = (float)(r >> 40) * (1.0f / 16777216.0f);
        float v = __fadd_rn(lo, __fmul_rn(hi - lo, u));  // no FMA: the CPU computes the same bits
        if (dtype == 0) ((float*)p)[i] = v;
        else if (dtype == 1) ((f16_t*)p)[i] = f32_to_f16(v);
        else if (dtype == 2) ((bf16_t*)p)[i] = f32_to_bf16(v);
        else ((u32*)p)[i] = (u32)r;
    }
}
