//! One captured CUDA graph per decode batch-size bucket: the whole forward pass of `bucket` tokens
//! plus the greedy argmax, recorded once from [`Plan::forward`] and replayed every decode step. Every
//! pointer in the graph is a plan buffer allocated at load, and everything that changes per token
//! (ids, positions, block-table rows, the block tables) lives in device memory the host updates
//! before the replay, so a replay needs no host work beyond its one launch. The engine owns the
//! graphs and the buffers together and drops the graphs first.

use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaStream};

use super::super::error::CudaError;
use super::super::module::Kernels;
use super::forward::Pass;
use super::plan::Plan;
use super::upload::GpuWeights;

/// A captured decode pass of `bucket` tokens.
pub struct DecodeGraph {
    /// Tokens the graph processes (real tokens plus padding).
    pub bucket: usize,
    graph: CudaGraph,
}

// SAFETY: a graph exec handle is not tied to the thread that made it; the engine that owns it
// replays it only through `&mut self`, so it is never used by two threads at once.
unsafe impl Send for DecodeGraph {}

impl std::fmt::Debug for DecodeGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeGraph")
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

impl DecodeGraph {
    /// Records the decode forward pass of `bucket` tokens (the caller ran it eagerly first, so every
    /// launch is known to be accepted).
    pub fn capture(
        plan: &mut Plan,
        kernels: &Kernels,
        stream: &Arc<CudaStream>,
        weights: &mut GpuWeights,
        bucket: usize,
    ) -> Result<DecodeGraph, CudaError> {
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(CudaError::driver(format!(
                "starting the capture of bucket {bucket}"
            )))?;
        let recorded = plan.forward(kernels, stream, weights, Pass::decode(bucket));
        // The capture must end whatever happened, or the stream stays in capture mode.
        let graph = stream.end_capture(CUgraphInstantiate_flags(0));
        recorded?;
        let graph = graph
            .map_err(CudaError::driver(format!(
                "capturing the decode graph of bucket {bucket}"
            )))?
            .ok_or_else(|| {
                CudaError::Dead(format!("the capture of bucket {bucket} recorded nothing"))
            })?;
        Ok(DecodeGraph { bucket, graph })
    }

    /// Replays the graph on the stream it was captured on.
    pub fn replay(&self) -> Result<(), CudaError> {
        self.graph.launch().map_err(CudaError::driver(format!(
            "replaying the decode graph of bucket {}",
            self.bucket
        )))
    }
}
