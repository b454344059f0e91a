//! `Moe`: one MoE layer on one backend, the safe entry point under the C surface.

use std::ffi::c_void;

use crate::backend::{self, cpu::CpuBackend, Backend, MemoryRequirements};
use crate::config::{FdmoeBackendKind, MoeConfig};
use crate::error::{Error, FdmoeStatus, Result};
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
            FdmoeBackendKind::Cuda => {
                return Err(Error::new(
                    FdmoeStatus::Unsupported,
                    "the cuda backend is not part of this build yet (backend cuda)",
                ))
            }
        };
        Ok(Moe { backend })
    }

    /// What `Moe::new(cfg)` would allocate.
    pub fn memory_requirements(cfg: &MoeConfig) -> Result<MemoryRequirements> {
        cfg.validate()?;
        match cfg.backend {
            FdmoeBackendKind::Cpu => Ok(backend::cpu::memory_requirements(cfg)),
            FdmoeBackendKind::Cuda => Err(Error::new(
                FdmoeStatus::Unsupported,
                "the cuda backend is not part of this build yet (backend cuda)",
            )),
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
        if !self.backend.has_weights() {
            return Err(Error::state(
                "capture before load_weights: no weights are loaded",
            ));
        }
        self.backend.capture_graphs(token_counts, stream)
    }
}
