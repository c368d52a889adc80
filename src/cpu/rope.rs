//! Rotary position embedding, Hugging Face "rotate_half" convention: dimension `i` pairs with
//! `i + d/2`, `inv_freq[i] = theta^(-2i/d)` (f32), angle `pos * inv_freq[i]` in f32, and
//! `out[i] = x[i] cos - x[i + d/2] sin`, `out[i + d/2] = x[i + d/2] cos + x[i] sin`.
//! Applied in place to `[tokens, heads, head_dim]` at given absolute positions.

/// The frequency table of one head width and base.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    head_dim: usize,
    inv_freq: Vec<f32>,
}

impl Rope {
    /// The table for heads of `head_dim` (even, positive) dimensions and base `theta`.
    ///
    /// # Panics
    /// When `head_dim` is zero or odd.
    pub fn new(head_dim: usize, theta: f32) -> Self {
        assert!(
            head_dim > 0 && head_dim.is_multiple_of(2),
            "rope: head_dim {head_dim} must be even and positive"
        );
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Rope { head_dim, inv_freq }
    }

    /// Head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// `inv_freq[i] = theta^(-2i/d)`, `[head_dim / 2]`.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// `(cos, sin)` of the angles at position `pos`, each `[head_dim / 2]`.
    pub fn cos_sin(&self, pos: usize) -> (Vec<f32>, Vec<f32>) {
        let p = pos as f32;
        self.inv_freq
            .iter()
            .map(|&f| {
                let a = p * f;
                (a.cos(), a.sin())
            })
            .unzip()
    }

    /// Rotates `x: [tokens, heads, head_dim]` in place, token `t` at `positions[t]`.
    ///
    /// # Panics
    /// When `x.len() != positions.len() * heads * head_dim`.
    pub fn apply(&self, x: &mut [f32], heads: usize, positions: &[usize]) {
        let d = self.head_dim;
        assert_eq!(
            x.len(),
            positions.len() * heads * d,
            "rope: x is not [{}, {heads}, {d}]",
            positions.len()
        );
        if heads == 0 {
            return;
        }
        let half = d / 2;
        for (tok, &pos) in x.chunks_exact_mut(heads * d).zip(positions) {
            let (cos, sin) = self.cos_sin(pos);
            for head in tok.chunks_exact_mut(d) {
                let (lo, hi) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (lo[i], hi[i]);
                    lo[i] = x1 * cos[i] - x2 * sin[i];
                    hi[i] = x2 * cos[i] + x1 * sin[i];
                }
            }
        }
    }
}
