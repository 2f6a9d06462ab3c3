//! Sampling settings as every front end resolves them: the model's
//! generation_config.json first (its temperature, top-k/p and min-p only when
//! it sets `do_sample: true`; else greedy), then the caller's overrides, then
//! one range check of the merged result. The CLI and the server both use it,
//! naming the offending setting in their own words.

use fusebox_models::GenerationConfig;

use crate::SamplingParams;

/// The defaults a model's generation_config.json gives (greedy, no penalty
/// and seed 0 where it says nothing).
pub fn sampling_defaults(g: &GenerationConfig) -> SamplingParams {
    let mut p = SamplingParams::greedy();
    if g.do_sample == Some(true) {
        p.temperature = g.temperature.unwrap_or(1.0) as f32;
        p.top_k = g.top_k.unwrap_or(0);
        p.top_p = g.top_p.unwrap_or(1.0) as f32;
        p.min_p = g.min_p.unwrap_or(0.0) as f32;
    }
    p.repeat_penalty = g.repetition_penalty.unwrap_or(1.0) as f32;
    p
}

/// A sampling setting out of its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadSetting {
    Temperature,
    TopP,
    MinP,
    RepeatPenalty,
}

/// The first setting of `p` out of range, with what its range is.
pub fn check_sampling(p: &SamplingParams) -> Result<(), (BadSetting, String)> {
    if !(p.temperature >= 0.0 && p.temperature.is_finite()) {
        return Err((BadSetting::Temperature, format!("must be a number >= 0, got {}", p.temperature)));
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return Err((BadSetting::TopP, format!("must be in (0, 1], got {}", p.top_p)));
    }
    if !(0.0..=1.0).contains(&p.min_p) {
        return Err((BadSetting::MinP, format!("must be in [0, 1], got {}", p.min_p)));
    }
    if !(p.repeat_penalty > 0.0 && p.repeat_penalty.is_finite()) {
        return Err((BadSetting::RepeatPenalty, format!("must be > 0, got {}", p.repeat_penalty)));
    }
    Ok(())
}

/// A seed from the clock, for callers that were given none.
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_do_sample_and_the_check_names_the_setting() {
        let g = GenerationConfig {
            temperature: Some(0.6),
            top_p: Some(0.95),
            repetition_penalty: Some(1.1),
            ..Default::default()
        };
        let p = sampling_defaults(&g);
        assert_eq!((p.temperature, p.top_p, p.repeat_penalty), (0.0, 1.0, 1.1), "greedy without do_sample");
        let g = GenerationConfig { do_sample: Some(true), top_p: Some(0.0), ..Default::default() };
        let p = sampling_defaults(&g);
        assert_eq!(p.temperature, 1.0);
        assert_eq!(check_sampling(&p).unwrap_err().0, BadSetting::TopP, "a bad generation_config value is caught");
        assert!(check_sampling(&SamplingParams::greedy()).is_ok());
    }
}
