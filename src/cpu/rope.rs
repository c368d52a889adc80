//! Rotary position embedding, Hugging Face "rotate_half" convention: within a head of width `d`,
//! element `i < d/2` pairs with `i + d/2`, rotated by the angle `pos * inv_freq[i]` with
//! `inv_freq[i] = theta^(-2i/d)`; angles in f32 from absolute positions.
//! Applied in place to `[tokens, heads, d]`.

/// The per-frequency table of one model.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    head_dim: usize,
}

impl Rope {
    /// Table for heads of width `head_dim` (even) and base `theta`.
    pub fn new(head_dim: usize, theta: f32) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Rope { inv_freq, head_dim }
    }

    /// Rotates `x` (`[positions.len(), heads, head_dim]`) in place, token `t` at `positions[t]`.
    pub fn apply(&self, x: &mut [f32], positions: &[usize]) {
        let d = self.head_dim;
        let half = d / 2;
        assert!(
            !positions.is_empty() && x.len().is_multiple_of(positions.len() * d),
            "rope: shape mismatch"
        );
        let per_token = x.len() / positions.len();
        let mut cos = vec![0.0f32; half];
        let mut sin = vec![0.0f32; half];
        for (token, &pos) in x.chunks_mut(per_token).zip(positions) {
            for i in 0..half {
                let angle = pos as f32 * self.inv_freq[i];
                cos[i] = angle.cos();
                sin[i] = angle.sin();
            }
            for head in token.chunks_mut(d) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * cos[i] - b * sin[i];
                    head[i + half] = b * cos[i] + a * sin[i];
                }
            }
        }
    }
}
