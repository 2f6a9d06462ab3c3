//! OpenAI's frequency and presence penalties, applied on the host to the
//! logits of a step before the sampler sees them: a token generated `c`
//! times so far (in this completion, the prompt not counted) loses
//! `c * frequency + presence` (the presence part once `c > 0`).

use std::collections::HashMap;

/// The two penalties; both 0 is off.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Penalties {
    pub frequency: f32,
    pub presence: f32,
}

impl Penalties {
    /// The largest magnitude OpenAI accepts for either.
    pub const MAX: f32 = 2.0;

    pub fn is_off(&self) -> bool {
        self.frequency == 0.0 && self.presence == 0.0
    }
}

/// How often each token was generated, and the penalties to charge for it.
#[derive(Debug, Default)]
pub struct Counts {
    penalties: Penalties,
    seen: HashMap<u32, u32>,
}

impl Counts {
    pub fn new(penalties: Penalties) -> Counts {
        Counts { penalties, seen: HashMap::new() }
    }

    /// Count a generated token.
    pub fn add(&mut self, id: u32) {
        if !self.penalties.is_off() {
            *self.seen.entry(id).or_default() += 1;
        }
    }

    /// Charge every token generated so far in `logits`.
    pub fn apply(&self, logits: &mut [f32]) {
        let Penalties { frequency, presence } = self.penalties;
        for (&id, &c) in &self.seen {
            if let Some(l) = logits.get_mut(id as usize) {
                *l -= c as f32 * frequency + presence;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalties_charge_generated_tokens() {
        let mut c = Counts::new(Penalties { frequency: 0.5, presence: 1.0 });
        for id in [1, 1, 2, 9] {
            c.add(id);
        }
        let mut l = vec![0.0; 4];
        c.apply(&mut l);
        assert_eq!(l, [0.0, -2.0, -1.5, 0.0]);
        let mut off = Counts::new(Penalties::default());
        off.add(1);
        let mut l = vec![3.0; 2];
        off.apply(&mut l);
        assert_eq!(l, [3.0, 3.0]);
    }
}
