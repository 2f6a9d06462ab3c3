//! Inner loops of the CPU backend.
//!
//! Each kernel is written once as a generic `#[inline(always)]` body with many
//! independent accumulators, which LLVM turns into SIMD. A copy compiled with
//! AVX2+FMA enabled is picked at run time when the processor has them, so the
//! same binary is fast here and still runs on an older x86-64 or on ARM.

use crate::dtype::bf16_to_f32;

const LANES: usize = 16;

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, acc: f32) -> f32 {
    if FMA {
        a.mul_add(b, acc)
    } else {
        a * b + acc
    }
}

#[inline(always)]
fn reduce(acc: [f32; LANES]) -> f32 {
    // pairwise, so the result does not depend on LANES-sized chunking order
    let mut a = acc;
    let mut w = LANES / 2;
    while w > 0 {
        for j in 0..w {
            a[j] += a[j + w];
        }
        w /= 2;
    }
    a[0]
}

#[inline(always)]
fn dot_f32_impl<const FMA: bool>(x: &[f32], w: &[f32]) -> f32 {
    let n = x.len().min(w.len());
    let body = n / LANES * LANES;
    let mut acc = [0f32; LANES];
    for (xc, wc) in x[..body].chunks_exact(LANES).zip(w[..body].chunks_exact(LANES)) {
        for j in 0..LANES {
            acc[j] = madd::<FMA>(xc[j], wc[j], acc[j]);
        }
    }
    let mut s = reduce(acc);
    for i in body..n {
        s = madd::<FMA>(x[i], w[i], s);
    }
    s
}

#[inline(always)]
fn dot_bf16_impl<const FMA: bool>(x: &[f32], w: &[u16]) -> f32 {
    let n = x.len().min(w.len());
    let body = n / LANES * LANES;
    let mut acc = [0f32; LANES];
    for (xc, wc) in x[..body].chunks_exact(LANES).zip(w[..body].chunks_exact(LANES)) {
        for j in 0..LANES {
            acc[j] = madd::<FMA>(xc[j], bf16_to_f32(wc[j]), acc[j]);
        }
    }
    let mut s = reduce(acc);
    for i in body..n {
        s = madd::<FMA>(x[i], bf16_to_f32(w[i]), s);
    }
    s
}

#[inline(always)]
fn axpy_impl<const FMA: bool>(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = madd::<FMA>(a, *xi, *yi);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(x: &[f32], w: &[f32]) -> f32 {
        super::dot_f32_impl::<true>(x, w)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_bf16(x: &[f32], w: &[u16]) -> f32 {
        super::dot_bf16_impl::<true>(x, w)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        super::axpy_impl::<true>(a, x, y)
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    })
}

/// `sum(x[i] * w[i])` in f32.
#[inline]
pub fn dot_f32(x: &[f32], w: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the processor supports the features the function was compiled for.
        return unsafe { x86::dot_f32(x, w) };
    }
    dot_f32_impl::<false>(x, w)
}

/// `sum(x[i] * bf16(w[i]))` in f32.
#[inline]
pub fn dot_bf16(x: &[f32], w: &[u16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the processor supports the features the function was compiled for.
        return unsafe { x86::dot_bf16(x, w) };
    }
    dot_bf16_impl::<false>(x, w)
}

/// `sum(x[i] * f16(w[i]))` in f32, converting through a small stack buffer.
#[inline]
pub fn dot_f16(x: &[f32], w: &[u16]) -> f32 {
    use half::slice::HalfFloatSliceExt;
    const C: usize = 256;
    let mut buf = [0f32; C];
    let mut s = 0f32;
    for (xc, wc) in x.chunks(C).zip(w.chunks(C)) {
        let b = &mut buf[..wc.len()];
        let h: &[half::f16] = bytemuck::cast_slice(wc);
        h.convert_to_f32_slice(b);
        s += dot_f32(xc, b);
    }
    s
}

/// `y += a * x`.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the processor supports the features the function was compiled for.
        return unsafe { x86::axpy(a, x, y) };
    }
    axpy_impl::<false>(a, x, y)
}
