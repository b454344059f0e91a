//! Library-owned CUDA graphs (SPEC §6): one graph per token bucket. A forward with T tokens
//! replays the smallest bucket >= T: one small kernel writes the true T and the call's pointers
//! into an argument block in device memory (kernel parameters travel by value, so nothing races
//! the next call), then the graph runs, its kernels reading x, out, logits, given routing and
//! the routing record through the block: no input or output is copied. Kernels read T from
//! device memory, so padding rows cost no routing and write nothing, and replay runs the same
//! kernels with the same numerics as eager: bitwise equal.

use super::driver::{DeviceBuffer, DevicePtr, GraphExec, Stream};
use super::kernels::{Kernels, ARG_SLOTS};
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
        ForwardArgs {
            num_tokens: bucket,
            x: std::ptr::null(),
            out: std::ptr::null_mut(),
            router_logits: std::ptr::null(),
            topk_ids: std::ptr::null(),
            topk_weights: std::ptr::null(),
            topk_ids_out: std::ptr::null_mut(),
            topk_weights_out: std::ptr::null_mut(),
            stream: std::ptr::null_mut(),
            force_eager: false,
        }
    }
}

/// The captured graphs of one backend and the routing source they were captured for.
pub struct Graphs {
    pub source: RoutingSource,
    pub graphs: Vec<(usize, GraphExec)>,
    pub buffers: GraphBuffers,
}

impl Graphs {
    /// The graph to replay for `t` tokens, if any.
    pub fn pick(&self, t: usize) -> Option<&(usize, GraphExec)> {
        self.graphs.iter().find(|(b, _)| *b >= t)
    }

    /// Replays `graph` for the call's tokens on `stream`: one small launch writes T and the
    /// call's pointers, then the graph runs; nothing is copied.
    ///
    /// # Safety
    /// The pointers of `args` cover their extents in device memory; `stream` is live.
    pub unsafe fn replay(
        &self,
        kernels: &Kernels,
        graph: &GraphExec,
        args: &ForwardArgs,
        stream: Stream,
    ) -> Result<()> {
        let b = &self.buffers;
        let pointers = [
            args.x as DevicePtr,
            args.out as DevicePtr,
            args.router_logits as DevicePtr,
            args.topk_ids as DevicePtr,
            args.topk_weights as DevicePtr,
            args.topk_ids_out as DevicePtr,
            args.topk_weights_out as DevicePtr,
        ];
        kernels.set_forward_args(
            b.args_block.ptr,
            b.num_tokens.ptr,
            pointers,
            args.num_tokens,
            stream,
        )?;
        graph.launch(stream)
    }
}
