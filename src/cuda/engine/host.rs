//! What the weight upload reads on the host: a whole model's [`ModelWeights`] or one rank's shard
//! of them ([`RankWeights`]), both seen as [`HostModel`]s whose tensors are [`HostTensor`]s
//! (`[rows, cols]` elements, or a quantized matrix's packed form), so one upload and one choice of
//! stack formats serve both.

use crate::dtype::WeightSlice;
use crate::packed::PackedMatrix;
use crate::shard::weights::Part;
use crate::shard::RankWeights;
use crate::weights::{ModelWeights, Weight};

/// One host tensor that goes up to the GPU.
pub trait HostTensor {
    /// The elements, row-major, in their stored precision (a packed matrix's dequantized).
    fn data(&self) -> WeightSlice<'_>;
    /// The packed form of a quantized matrix, else `None`.
    fn packed(&self) -> Option<&PackedMatrix>;
    /// The tensor's name, for messages.
    fn name(&self) -> &str;
}

impl HostTensor for Weight {
    fn data(&self) -> WeightSlice<'_> {
        Weight::data(self)
    }
    fn packed(&self) -> Option<&PackedMatrix> {
        self.tensor.packed().map(|p| &**p)
    }
    fn name(&self) -> &str {
        self.tensor.name()
    }
}

impl HostTensor for Part {
    fn data(&self) -> WeightSlice<'_> {
        Part::data(self)
    }
    fn packed(&self) -> Option<&PackedMatrix> {
        Part::packed(self)
    }
    fn name(&self) -> &str {
        Part::name(self)
    }
}

/// One decoder layer's host tensors.
pub struct HostLayer<'a, T> {
    /// RMSNorm weight before attention, `[hidden]`.
    pub attn_norm: &'a T,
    /// q, k and v, stored one after the other in one stack.
    pub qkv: [&'a T; 3],
    /// The attention output projection.
    pub o: &'a T,
    /// RMSNorm weight before the experts, `[hidden]`.
    pub ffn_norm: &'a T,
    /// The router's gate `[experts, hidden]` (`None` for a dense model).
    pub router: Option<&'a T>,
    /// `[w1, w3, w2]` of each expert held.
    pub experts: Vec<[&'a T; 3]>,
}

/// A model's host weights, as the upload reads them.
pub trait HostModel {
    /// Its tensors.
    type Tensor: HostTensor;
    /// The decoder layers.
    fn host_layers(&self) -> Vec<HostLayer<'_, Self::Tensor>>;
    /// The embedding, the final norm and the LM head (uploaded unless tied to the embedding).
    fn ends(&self) -> [&Self::Tensor; 3];
}

/// Implements [`HostModel`] for a weights type whose layers and experts have the same field names
/// as [`ModelWeights`]' (a rank's [`RankWeights`] mirror them).
macro_rules! host_model {
    ($weights:ty, $tensor:ty) => {
        impl HostModel for $weights {
            type Tensor = $tensor;
            fn host_layers(&self) -> Vec<HostLayer<'_, $tensor>> {
                self.layers
                    .iter()
                    .map(|l| HostLayer {
                        attn_norm: &l.attn_norm,
                        qkv: [&l.q_proj, &l.k_proj, &l.v_proj],
                        o: &l.o_proj,
                        ffn_norm: &l.ffn_norm,
                        router: l.router.as_ref(),
                        experts: l.experts.iter().map(|e| [&e.w1, &e.w3, &e.w2]).collect(),
                    })
                    .collect()
            }
            fn ends(&self) -> [&$tensor; 3] {
                [&self.embed, &self.final_norm, &self.lm_head]
            }
        }
    };
}

host_model!(ModelWeights, Weight);
host_model!(RankWeights, Part);

/// Bytes the upload of `t` moves: its packed codes, parameters and permutation, or its elements
/// as bf16 (an estimate for progress: a packed matrix in a bf16 stack moves its elements).
pub fn upload_bytes<T: HostTensor>(t: &T) -> u64 {
    match t.packed() {
        Some(p) => p.stored_bytes() as u64,
        None => 2 * t.data().len() as u64,
    }
}
