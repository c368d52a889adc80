//! The sampler's seeded pseudo-random generator: xoshiro256++ with its state filled from the seed by
//! splitmix64. Same seed, same stream, on every platform.

/// One splitmix64 step: advances `state` and returns the next output.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256++ generator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose whole stream is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut state = seed;
        let s = [
            splitmix64(&mut state),
            splitmix64(&mut state),
            splitmix64(&mut state),
            splitmix64(&mut state),
        ];
        // splitmix64 is a bijection of its counter, so four consecutive outputs are never all zero.
        Rng { s }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// The four state words, in the order `next_u64` uses them (what a device copy of this
    /// generator starts from; stepping that copy as `next_u64` does gives the same stream).
    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    /// A generator continuing from `state` (as [`Rng::state`] returned it, possibly advanced by a
    /// device copy of the same algorithm).
    pub fn from_state(state: [u64; 4]) -> Self {
        Rng { s: state }
    }

    /// A uniform value in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_seeds_differ() {
        let a: Vec<u64> = {
            let mut r = Rng::new(42);
            (0..8).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(42);
            (0..8).map(|_| r.next_u64()).collect()
        };
        let c: Vec<u64> = {
            let mut r = Rng::new(43);
            (0..8).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn state_words_follow_the_stream() {
        let mut r = Rng::new(9);
        let first = r.state();
        assert_eq!(first, Rng::new(9).state());
        r.next_u64();
        assert_ne!(r.state(), first);
        assert_ne!(first, Rng::new(10).state());
    }

    #[test]
    fn unit_interval_values_are_in_range_and_spread() {
        let mut r = Rng::new(7);
        let values: Vec<f64> = (0..10_000).map(|_| r.next_f64()).collect();
        assert!(values.iter().all(|&v| (0.0..1.0).contains(&v)));
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
        let low = values.iter().filter(|&&v| v < 0.1).count();
        assert!((800..1200).contains(&low), "{low} values below 0.1");
    }
}
