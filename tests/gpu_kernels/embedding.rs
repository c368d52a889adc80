//! `embedding` against `cpu::embedding::embed`: both output types, 1 token, odd widths; the rows
//! are copies, so the result must be bit-exact; an id outside the table gives a row of zeros.

use half::bf16;
use mixtral::cpu::embedding::embed;
use mixtral::cuda::args::{EmbeddingArgs, EmbeddingScalars};
use mixtral::cuda::memory::AnyViewMut;
use mixtral::cuda::ops::{embedding, embedding_emulated};
use mixtral::dtype::WeightSlice;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::common::{self, launch, random_values, to_bf16, to_f32, Guarded};

#[test]
fn embedding_copies_the_table_rows() {
    let gpu = common::target("embedding_copies_the_table_rows");
    let strategy = (
        1usize..12,
        prop::sample::select(vec![1usize, 7, 64, 257, 1000, 4096]),
        1usize..40,
        any::<u64>(),
        any::<bool>(),
        any::<bool>(),
    );
    let mut runner = TestRunner::new(Config::with_cases(gpu.cases(20, 6)));
    runner
        .run(
            &strategy,
            |(tokens, hidden, vocab, seed, out_f32, bad_id)| {
                let stream = gpu.stream();
                let table = to_bf16(&random_values(seed, vocab * hidden, 3.0));
                let mut ids: Vec<u32> = random_values(seed ^ 1, tokens, 1.0)
                    .iter()
                    .map(|&v| ((v + 1.0) * 0.5 * vocab as f32) as u32 % vocab as u32)
                    .collect();
                let mut reference = vec![0.0f32; tokens * hidden];
                embed(&ids, WeightSlice::BF16(&table), hidden, &mut reference);
                if bad_id {
                    // The last token gets an id past the table: the kernel writes zeros there.
                    ids[tokens - 1] = vocab as u32 + 5;
                    reference[(tokens - 1) * hidden..].fill(0.0);
                }
                let ids_d = Guarded::with(stream, &ids);
                let table_d = Guarded::with(stream, &table);
                let shape = EmbeddingScalars {
                    tokens: tokens as u32,
                    hidden: hidden as u32,
                    vocab: vocab as u32,
                };
                let out = if out_f32 {
                    let mut out = Guarded::<f32>::poisoned(stream, tokens * hidden);
                    let args = EmbeddingArgs {
                        ids: ids_d.dev(),
                        table: table_d.dev(),
                        out: AnyViewMut::F32(out.dev_mut()),
                    };
                    launch!(gpu.on(), embedding | embedding_emulated, &shape, args)
                        .expect("embedding");
                    out.read_written(stream, "out f32")
                } else {
                    let mut out = Guarded::<bf16>::poisoned(stream, tokens * hidden);
                    let args = EmbeddingArgs {
                        ids: ids_d.dev(),
                        table: table_d.dev(),
                        out: AnyViewMut::Bf16(out.dev_mut()),
                    };
                    launch!(gpu.on(), embedding | embedding_emulated, &shape, args)
                        .expect("embedding");
                    to_f32(&out.read_written(stream, "out bf16"))
                };
                for (n, (o, r)) in out.iter().zip(&reference).enumerate() {
                    prop_assert_eq!(
                        o.to_bits(),
                        r.to_bits(),
                        "element {} (token {})",
                        n,
                        n / hidden
                    );
                }
                Ok(())
            },
        )
        .unwrap();
}
