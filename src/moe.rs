//! `Moe`: one MoE layer on one backend, the safe entry point under the C surface.

use std::ffi::c_void;

use crate::backend::{self, cpu::CpuBackend, Backend, MemoryRequirements};
use crate::config::{FdmoeBackendKind, MoeConfig};
#[cfg(not(feature = "cuda"))]
use crate::error::FdmoeStatus;
use crate::error::{Error, Result};
use crate::forward::ForwardArgs;
use crate::weights::WeightSource;

/// A MoE layer: config, weights and workspace on one backend.
#[derive(Debug)]
pub struct Moe {
    backend: Box<dyn Backend>,
}

impl Moe {
    /// Validates `cfg` and allocates everything forward will need.
    pub fn new(cfg: &MoeConfig) -> Result<Self> {
        cfg.validate()?;
        let backend: Box<dyn Backend> = match cfg.backend {
            FdmoeBackendKind::Cpu => Box::new(CpuBackend::new(cfg)?),
            #[cfg(feature = "cuda")]
            FdmoeBackendKind::Cuda => Box::new(backend::cuda::CudaBackend::new(cfg)?),
            #[cfg(not(feature = "cuda"))]
            FdmoeBackendKind::Cuda => return Err(no_cuda_build()),
        };
        Ok(Moe { backend })
    }

    /// What `Moe::new(cfg)` would allocate.
    pub fn memory_requirements(cfg: &MoeConfig) -> Result<MemoryRequirements> {
        cfg.validate()?;
        match cfg.backend {
            FdmoeBackendKind::Cpu => backend::cpu::memory_requirements(cfg),
            #[cfg(feature = "cuda")]
            FdmoeBackendKind::Cuda => backend::cuda::memory_requirements(cfg),
            #[cfg(not(feature = "cuda"))]
            FdmoeBackendKind::Cuda => Err(no_cuda_build()),
        }
    }

    pub fn config(&self) -> &MoeConfig {
        self.backend.config()
    }

    pub fn backend_kind(&self) -> FdmoeBackendKind {
        self.backend.kind()
    }

    /// Loads the weights; a second call replaces the first set.
    pub fn load_weights(&mut self, src: &WeightSource) -> Result<()> {
        self.backend.load_weights(src)
    }

    /// One forward.
    ///
    /// # Safety
    /// Every non-NULL pointer in `args` covers the extent documented on `ForwardArgs`, in the
    /// memory the backend reads (host for cpu, device for cuda).
    pub unsafe fn forward(&mut self, args: &ForwardArgs) -> Result<()> {
        if !self.backend.has_weights() {
            return Err(Error::state(
                "forward before load_weights: no weights are loaded",
            ));
        }
        match args.validate(self.backend.config(), self.backend.has_gate())? {
            None => Ok(()),
            Some(source) => self.backend.forward(args, source),
        }
    }

    /// Captures CUDA graphs for the given token buckets (cuda backend only).
    pub fn capture_graphs(&mut self, token_counts: &[usize], stream: *mut c_void) -> Result<()> {
        self.backend.capture_graphs(token_counts, stream)
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda_build() -> Error {
    Error::new(
        FdmoeStatus::Unsupported,
        "backend cuda is not in this build (built without the cuda feature)",
    )
}
