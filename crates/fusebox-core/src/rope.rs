//! Rotary position embeddings: styles and frequency tables.

/// How the two halves of each rotated pair are laid out in a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs are `(x[i], x[i + d/2])` (HF Llama/Qwen "rotate_half", MLX `traditional=False`).
    Half,
    /// Pairs are `(x[2i], x[2i+1])` (GPT-J, llama.cpp's native layout, MLX `traditional=True`).
    Interleaved,
}

/// `rope_scaling` / `rope_parameters` variants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The `head_dim / 2` inverse frequencies, as transformers computes them
/// (`1 / theta^(2i/d)`, then the scaling rule), rounded to f32.
pub fn inv_freq(head_dim: usize, theta: f64, scaling: RopeScaling) -> Vec<f32> {
    let half = head_dim / 2;
    let base: Vec<f64> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect();
    let out: Vec<f64> = match scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    };
    out.into_iter().map(|f| f as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_matches_formula() {
        let t = inv_freq(8, 10000.0, RopeScaling::None);
        assert_eq!(t.len(), 4);
        assert_eq!(t[0], 1.0);
        assert!((t[1] - 0.1).abs() < 1e-7);
    }

    #[test]
    fn linear_divides() {
        let a = inv_freq(16, 1e4, RopeScaling::None);
        let b = inv_freq(16, 1e4, RopeScaling::Linear { factor: 4.0 });
        for (x, y) in a.iter().zip(&b) {
            assert!((x / 4.0 - y).abs() <= 1e-7 * x.abs());
        }
    }

    #[test]
    fn llama3_keeps_high_and_scales_low_frequencies() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let a = inv_freq(128, 500000.0, RopeScaling::None);
        let b = inv_freq(128, 500000.0, s);
        assert_eq!(a[0], b[0]);
        assert!((a[63] / 8.0 - b[63]).abs() < 1e-12);
    }
}
