//! Library-owned CUDA graphs (SPEC §6): one graph per token bucket, captured over static
//! input/output buffers. A forward with T tokens replays the smallest bucket >= T: it sets the
//! true T in device memory (by value, so
//! no host buffer races the next call), copies the inputs in, replays and copies the outputs
//! out. Kernels read T from device memory, so padding rows cost no routing and write nothing,
//! and replay runs the same kernels with the same numerics as eager: bitwise equal.

use super::driver::{
    copy_device_async, set_words_async, DeviceBuffer, DevicePtr, GraphExec, Stream,
};
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

/// Static buffers the graphs read and write, sized by the largest bucket.
pub struct GraphBuffers {
    pub num_tokens: DeviceBuffer,
    pub x: DeviceBuffer,
    pub out: DeviceBuffer,
    pub logits: DeviceBuffer,
    pub topk_ids: DeviceBuffer,
    pub topk_weights: DeviceBuffer,
    pub record_ids: DeviceBuffer,
    pub record_weights: DeviceBuffer,
}

impl GraphBuffers {
    pub fn bytes(
        cfg: &MoeConfig,
        max_bucket: usize,
        source: Option<RoutingSource>,
    ) -> [(usize, &'static str); 8] {
        let el = cfg.act_dtype.dense_size().unwrap_or(2);
        let slots = max_bucket * cfg.top_k;
        let logits = matches!(source, None | Some(RoutingSource::Logits)) as usize;
        let given = matches!(source, None | Some(RoutingSource::Given)) as usize;
        [
            (4, "graph token count"),
            (max_bucket * cfg.hidden_size * el, "graph input"),
            (max_bucket * cfg.hidden_size * el, "graph output"),
            (
                logits * max_bucket * cfg.num_experts * 4,
                "graph router logits",
            ),
            (given * slots * 4, "graph given ids"),
            (given * slots * 4, "graph given weights"),
            (slots * 4, "graph routing record ids"),
            (slots * 4, "graph routing record weights"),
        ]
    }

    pub fn new(cfg: &MoeConfig, max_bucket: usize, source: RoutingSource) -> Result<Self> {
        let mut it = Self::bytes(cfg, max_bucket, Some(source))
            .into_iter()
            .map(|(b, w)| DeviceBuffer::alloc(b, w));
        let mut next = || it.next().expect("8 buffers");
        Ok(GraphBuffers {
            num_tokens: next()?,
            x: next()?,
            out: next()?,
            logits: next()?,
            topk_ids: next()?,
            topk_weights: next()?,
            record_ids: next()?,
            record_weights: next()?,
        })
    }

    /// The forward arguments a graph is captured with: every pointer static.
    pub fn capture_args(&self, bucket: usize, source: RoutingSource) -> ForwardArgs {
        let p = |b: &DeviceBuffer| b.ptr as *mut std::ffi::c_void;
        ForwardArgs {
            num_tokens: bucket,
            x: p(&self.x),
            out: p(&self.out),
            router_logits: if source == RoutingSource::Logits {
                p(&self.logits) as *const f32
            } else {
                std::ptr::null()
            },
            topk_ids: if source == RoutingSource::Given {
                p(&self.topk_ids) as *const i32
            } else {
                std::ptr::null()
            },
            topk_weights: if source == RoutingSource::Given {
                p(&self.topk_weights) as *const f32
            } else {
                std::ptr::null()
            },
            topk_ids_out: p(&self.record_ids) as *mut i32,
            topk_weights_out: p(&self.record_weights) as *mut f32,
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

    /// Replays `graph` for the call's `t` tokens on `stream`.
    ///
    /// # Safety
    /// The pointers of `args` cover their extents in device memory; `stream` is live.
    pub unsafe fn replay(
        &self,
        cfg: &MoeConfig,
        graph: &GraphExec,
        args: &ForwardArgs,
        stream: Stream,
    ) -> Result<()> {
        let t = args.num_tokens;
        let el = cfg.act_dtype.dense_size().unwrap_or(2);
        let slots = t * cfg.top_k;
        let b = &self.buffers;
        set_words_async(b.num_tokens.ptr, t as u32, 1, stream)?;
        copy_device_async(
            b.x.ptr,
            args.x as DevicePtr,
            t * cfg.hidden_size * el,
            stream,
        )?;
        match self.source {
            RoutingSource::Logits => copy_device_async(
                b.logits.ptr,
                args.router_logits as DevicePtr,
                t * cfg.num_experts * 4,
                stream,
            )?,
            RoutingSource::Given => {
                copy_device_async(
                    b.topk_ids.ptr,
                    args.topk_ids as DevicePtr,
                    slots * 4,
                    stream,
                )?;
                copy_device_async(
                    b.topk_weights.ptr,
                    args.topk_weights as DevicePtr,
                    slots * 4,
                    stream,
                )?;
            }
            RoutingSource::GateWeight => {}
        }
        graph.launch(stream)?;
        copy_device_async(
            args.out as DevicePtr,
            b.out.ptr,
            t * cfg.hidden_size * el,
            stream,
        )?;
        if !args.topk_ids_out.is_null() {
            copy_device_async(
                args.topk_ids_out as DevicePtr,
                b.record_ids.ptr,
                slots * 4,
                stream,
            )?;
        }
        if !args.topk_weights_out.is_null() {
            copy_device_async(
                args.topk_weights_out as DevicePtr,
                b.record_weights.ptr,
                slots * 4,
                stream,
            )?;
        }
        Ok(())
    }
}
