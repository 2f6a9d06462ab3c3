// norm_rope.cu: RMSNorm (whole rows and per-head QK-norm) and rotary embedding.
#include "common.cuh"

// One warp per row, for short rows (per-head QK-norm: head_dim <= 256).
extern "C" __global__ void rms_norm_warp(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ out,
                                         int rows, int n, float eps) {
    FB_PROLOGUE();
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* xr = x + (long)row * n;
    float ss = 0.f;
    for (int i = lane; i < n; i += 32) ss += xr[i] * xr[i];
    ss = warp_sum(ss);
    float inv = 1.0f / sqrtf(ss / n + eps);
    float* o = out + (long)row * n;
    for (int i = lane; i < n; i += 32) o[i] = w[i] * (xr[i] * inv);
}

// One block per row (hidden-size rows).
extern "C" __global__ void rms_norm_block(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ out,
                                          int n, float eps) {
    FB_PROLOGUE();
    __shared__ float scratch[32];
    const float* xr = x + (long)blockIdx.x * n;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    float inv = 1.0f / sqrtf(ss / n + eps);
    float* o = out + (long)blockIdx.x * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = w[i] * (xr[i] * inv);
}

// Fused residual add + RMSNorm (site add_rms_norm): x += y, then
// out = w * x / rms(x), one block per row, x read and written once.
extern "C" __global__ void add_rms_norm_block(float* __restrict__ x, const float* __restrict__ y,
                                              const float* __restrict__ w, float* __restrict__ out, int n, float eps) {
    FB_PROLOGUE();
    __shared__ float scratch[32];
    float* xr = x + (long)blockIdx.x * n;
    const float* yr = y + (long)blockIdx.x * n;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i] + yr[i];
        xr[i] = v;
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    float inv = 1.0f / sqrtf(ss / n + eps);
    float* o = out + (long)blockIdx.x * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = w[i] * (xr[i] * inv);
}

// Rotary embedding in place on x[m, heads, d]; one thread per rotated pair.
// style 0: pairs (i, i + d/2) (HF "rotate_half"); style 1: pairs (2i, 2i+1).
extern "C" __global__ void rope_f32(float* __restrict__ x, const int* __restrict__ positions, const float* __restrict__ inv_freq,
                                    int m, int heads, int d, int style) {
    FB_PROLOGUE();
    int half = d >> 1;
    long total = (long)m * heads * half;
    for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < total; t += (long)gridDim.x * blockDim.x) {
        int i = (int)(t % half);
        long rh = t / half;  // row * heads + head
        int row = (int)(rh / heads);
        float a = (float)positions[row] * inv_freq[i];
        float s, c;
        sincosf(a, &s, &c);
        float* h = x + rh * d;
        int ia = style == 0 ? i : 2 * i, ib = style == 0 ? i + half : 2 * i + 1;
        float x0 = h[ia], x1 = h[ib];
        h[ia] = x0 * c - x1 * s;
        h[ib] = x1 * c + x0 * s;
    }
}
