//! Library-owned CUDA graphs (SPEC §6): one graph per token bucket. A forward with T tokens
//! replays the smallest bucket >= T. Each graph starts with a one-thread kernel that writes the
//! true T and the call's pointers into an argument block in device memory; a replay sets that
//! node's arguments (cuGraphExecKernelNodeSetParams: kernel arguments travel by value, so
//! nothing races a replay still running) and launches the graph, one launch in all. The other
//! kernels read x, out, logits, given routing and the routing record through the block: no
//! input or output is copied. Kernels read T from device memory, so padding rows cost no
//! routing and write nothing, and replay runs the same kernels with the same numerics as
//! eager: bitwise equal.

use super::driver::{DeviceBuffer, DevicePtr, GraphExec, KernelNode, Stream};
use super::kernels::{ForwardArgValues, Kernels, ARG_SLOTS};
use crate::config::MoeConfig;
use crate::error::{ensure, Result};
use crate::forward::{ForwardArgs, RoutingSource};

/// SPEC §6 default buckets (capped by max_tokens).
pub const DEFAULT_BUCKETS: [usize; 14] = [
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192,
];

/// Buckets to capture: the given list (sorted, deduplicated) or the defaults capped by max_tokens.
pub fn buckets(cfg: &MoeConfig, requested: &[usize]) -> Result<Vec<usize>> {
    if requested.is_empty() {
        return Ok(DEFAULT_BUCKETS
            .iter()
            .copied()
            .filter(|&b| b <= cfg.max_tokens)
            .collect());
    }
    for &b in requested {
        ensure!(
            b >= 1,
            "token_counts contains 0; buckets must be at least 1"
        );
        ensure!(
            b <= cfg.max_tokens,
            "token_counts contains {b}, above config.max_tokens = {}",
            cfg.max_tokens
        );
    }
    let mut v = requested.to_vec();
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// What the graphs read per call: the true T and the call's pointers (the argument block).
pub struct GraphBuffers {
    pub num_tokens: DeviceBuffer,
    pub args_block: DeviceBuffer,
}

impl GraphBuffers {
    pub fn bytes() -> [(usize, &'static str); 2] {
        [
            (4, "graph token count"),
            (ARG_SLOTS * 8, "graph argument block"),
        ]
    }

    pub fn new() -> Result<Self> {
        let [(t, tw), (a, aw)] = Self::bytes();
        Ok(GraphBuffers {
            num_tokens: DeviceBuffer::alloc(t, tw)?,
            args_block: DeviceBuffer::alloc(a, aw)?,
        })
    }

    /// The forward arguments a graph is captured with: the caller's pointers are NULL, since
    /// the kernels read them from the argument block.
    pub fn capture_args(bucket: usize) -> ForwardArgs {
        ForwardArgs::new(bucket, std::ptr::null(), std::ptr::null_mut())
    }

    /// The argument-block writer's arguments for `args`.
    pub fn values(&self, args: &ForwardArgs) -> ForwardArgValues {
        ForwardArgValues {
            args_block: self.args_block.ptr,
            num_tokens_dev: self.num_tokens.ptr,
            pointers: [
                args.x as DevicePtr,
                args.out as DevicePtr,
                args.router_logits as DevicePtr,
                args.topk_ids as DevicePtr,
                args.topk_weights as DevicePtr,
                args.topk_ids_out as DevicePtr,
                args.topk_weights_out as DevicePtr,
            ],
            num_tokens: args.num_tokens as i32,
        }
    }
}

/// One bucket's graph and its argument-block writer node.
pub struct BucketGraph {
    pub bucket: usize,
    pub exec: GraphExec,
    pub writer: KernelNode,
}

/// The captured graphs of one backend and the routing source they were captured for.
pub struct Graphs {
    pub source: RoutingSource,
    pub graphs: Vec<BucketGraph>,
    pub buffers: GraphBuffers,
}

impl Graphs {
    /// Captures `enqueue` (the forward of `bucket` tokens reading the argument block) behind
    /// the argument-block writer, on `stream`.
    ///
    /// # Safety
    /// `stream` is a live, non-legacy stream; `enqueue` only enqueues on it.
    pub unsafe fn capture_bucket(
        buffers: &GraphBuffers,
        kernels: &Kernels,
        bucket: usize,
        stream: Stream,
        enqueue: impl FnOnce() -> Result<()>,
    ) -> Result<BucketGraph> {
        let mut values = buffers.values(&GraphBuffers::capture_args(bucket));
        let exec = unsafe {
            GraphExec::capture(stream, || {
                kernels.set_forward_args(&mut values, stream)?;
                enqueue()
            })?
        };
        let writer = exec.root_kernel()?;
        Ok(BucketGraph {
            bucket,
            exec,
            writer,
        })
    }

    /// The graph to replay for `t` tokens, if any.
    pub fn pick(&self, t: usize) -> Option<&BucketGraph> {
        self.graphs.iter().find(|g| g.bucket >= t)
    }

    /// Replays `graph` for the call's tokens on `stream`: its writer node gets T and the call's
    /// pointers, then the graph runs; nothing is copied.
    ///
    /// # Safety
    /// The pointers of `args` cover their extents in device memory; `stream` is live.
    pub unsafe fn replay(
        &self,
        graph: &BucketGraph,
        args: &ForwardArgs,
        stream: Stream,
    ) -> Result<()> {
        let mut values = self.buffers.values(args);
        unsafe {
            graph
                .exec
                .set_kernel_args(&graph.writer, &mut values.params())?;
            graph.exec.launch(stream)
        }
    }
}
