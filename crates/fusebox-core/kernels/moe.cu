// moe.cu: MoE routing (softmax + top-k + renormalise), combining the expert
// outputs, and row softmax.
#include "common.cuh"

// Routing, one warp per row of logits [m, E]; the row is staged in shared
// memory (blockDim/32 rows of E floats per block). Softmax in f32, then k
// rounds of a warp argmax (ties: lower expert id) over the experts not yet
// taken. NaN logits are read as -inf (they can never be chosen before a
// number); a taken expert is marked NaN.
extern "C" __global__ void topk_router_k(const float* __restrict__ logits, int* __restrict__ ids, float* __restrict__ weights,
                                         int m, int E, int k, int renorm) {
    FB_PROLOGUE();
    extern __shared__ float srow[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + warp;
    if (row >= m) return;  // only warp-level synchronisation below
    float* v = srow + (long)warp * E;
    const float* x = logits + (long)row * E;
    float mx = -INFINITY;
    for (int i = lane; i < E; i += 32) {
        float t = x[i];
        if (t != t) t = -INFINITY;
        v[i] = t;
        mx = fmaxf(mx, t);
    }
    mx = warp_max(mx);
    float sum = 0.f;
    for (int i = lane; i < E; i += 32) sum += expf(v[i] - mx);
    sum = warp_sum(sum);
    __syncwarp();
    int* io = ids + (long)row * k;
    float* wo = weights + (long)row * k;
    float tot = 0.f;
    for (int s = 0; s < k; s++) {
        float bv = -INFINITY;
        int bi = 0x7fffffff;
        for (int i = lane; i < E; i += 32) {
            float t = v[i];
            if (t == t && (t > bv || (t == bv && i < bi))) {
                bv = t;
                bi = i;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) {
                bv = ov;
                bi = oi;
            }
        }
        // k <= E, so an expert is always left (bi < E)
        float w = expf(bv - mx) / sum;
        tot += w;
        if (lane == 0) {
            io[s] = bi;
            wo[s] = w;
        }
        if (lane == (bi & 31)) v[bi] = __uint_as_float(0x7fc00000u);
        __syncwarp();
    }
    if (renorm && lane == 0) {
        for (int s = 0; s < k; s++) wo[s] = wo[s] / tot;
    }
}

// out[r, :] = sum_s w[r, s] * y[r, s, :], summed in slot order.
extern "C" __global__ void moe_combine_k(const float* __restrict__ y, const float* __restrict__ w, float* __restrict__ out,
                                         int m, int k, int d) {
    FB_PROLOGUE();
    long total = (long)m * d;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < total; idx += (long)gridDim.x * blockDim.x) {
        long r = idx / d;
        int j = (int)(idx - r * d);
        const float* yr = y + r * k * d + j;
        const float* wr = w + r * k;
        float acc = 0.f;
        for (int s = 0; s < k; s++) acc = fmaf(wr[s], yr[(long)s * d], acc);
        out[idx] = acc;
    }
}

// The same with 4 columns per thread (d % 4 == 0, 16-byte aligned buffers).
extern "C" __global__ void moe_combine_k4(const float4* __restrict__ y, const float* __restrict__ w, float4* __restrict__ out,
                                          int m, int k, int d4) {
    FB_PROLOGUE();
    long total = (long)m * d4;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < total; idx += (long)gridDim.x * blockDim.x) {
        long r = idx / d4;
        int j = (int)(idx - r * d4);
        const float4* yr = y + r * k * d4 + j;
        const float* wr = w + r * k;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int s = 0; s < k; s++) {
            float ws = wr[s];
            float4 t = yr[(long)s * d4];
            acc.x = fmaf(ws, t.x, acc.x);
            acc.y = fmaf(ws, t.y, acc.y);
            acc.z = fmaf(ws, t.z, acc.z);
            acc.w = fmaf(ws, t.w, acc.w);
        }
        out[idx] = acc;
    }
}

// Softmax over rows of n, as the CPU: e = exp(x - max), out = e * (1 / sum).
// Short rows: one warp per row (8 per block).
extern "C" __global__ void softmax_warp(const float* __restrict__ x, float* __restrict__ out, int rows, int n) {
    FB_PROLOGUE();
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* xr = x + (long)row * n;
    float* o = out + (long)row * n;
    float mx = -INFINITY;
    for (int i = lane; i < n; i += 32) mx = fmaxf(mx, xr[i]);
    mx = warp_max(mx);
    float sum = 0.f;
    for (int i = lane; i < n; i += 32) {
        float e = expf(xr[i] - mx);
        o[i] = e;
        sum += e;
    }
    sum = warp_sum(sum);
    float inv = 1.0f / sum;
    for (int i = lane; i < n; i += 32) o[i] *= inv;
}

// Long rows: one block per row.
extern "C" __global__ void softmax_block(const float* __restrict__ x, float* __restrict__ out, int n) {
    FB_PROLOGUE();
    __shared__ float scratch[32];
    const float* xr = x + (long)blockIdx.x * n;
    float* o = out + (long)blockIdx.x * n;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) mx = fmaxf(mx, xr[i]);
    mx = block_max(mx, scratch);
    float sum = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float e = expf(xr[i] - mx);
        o[i] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    float inv = 1.0f / sum;
    for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] *= inv;
}
