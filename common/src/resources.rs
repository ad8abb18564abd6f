//! Resources one replica needs, and the bounds a request must stay within.

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// The most GPUs one replica may ask for (the largest single machines have 16).
pub const MAX_GPUS: u32 = 16;
/// The most GPU memory one replica may ask for on each of its GPUs: 256 GiB.
pub const MAX_GPU_MEMORY_MIB: u64 = 256 * 1024;
/// A whole GPU's compute, in thousandths.
pub const WHOLE_GPU_MILLI: u32 = 1000;
/// The most CPU one replica may ask for: 1024 cores.
pub const MAX_CPU_MILLI: u32 = 1024 * 1000;
/// The most memory one replica may ask for: 16 TiB.
pub const MAX_MEMORY_MIB: u64 = 16 * 1024 * 1024;

/// What one replica needs. GPU memory and compute share are per GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in millicores.
    pub cpu_milli: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Whole GPUs on one node (0 for a CPU-only replica).
    pub gpus: u32,
    /// GPU memory per GPU, in MiB (0 = the whole memory of each GPU).
    pub gpu_memory_mib: u64,
    /// Compute share per GPU in thousandths; 1000 is a whole GPU.
    pub gpu_milli: u32,
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            cpu_milli: 1000,
            memory_mib: 1024,
            gpus: 0,
            gpu_memory_mib: 0,
            gpu_milli: 0,
        }
    }
}

impl Resources {
    /// Checks the documented bounds and that the GPU fields agree with each other.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.cpu_milli > MAX_CPU_MILLI {
            return Err(ValidationError::new(
                "cpu_milli",
                self.cpu_milli,
                format!("must be at most {MAX_CPU_MILLI} (1024 cores)"),
            ));
        }
        if self.memory_mib > MAX_MEMORY_MIB {
            return Err(ValidationError::new(
                "memory_mib",
                self.memory_mib,
                format!("must be at most {MAX_MEMORY_MIB} (16TiB)"),
            ));
        }
        if self.gpus > MAX_GPUS {
            return Err(ValidationError::new(
                "gpus",
                self.gpus,
                format!("must be between 0 and {MAX_GPUS}"),
            ));
        }
        if self.gpus == 0 {
            if self.gpu_memory_mib != 0 {
                return Err(ValidationError::new(
                    "gpu_memory_mib",
                    self.gpu_memory_mib,
                    "needs gpus of at least 1; set gpus or drop the GPU memory",
                ));
            }
            if self.gpu_milli != 0 {
                return Err(ValidationError::new(
                    "gpu_milli",
                    self.gpu_milli,
                    "needs gpus of at least 1; set gpus or drop the GPU share",
                ));
            }
            return Ok(());
        }
        if self.gpu_memory_mib > MAX_GPU_MEMORY_MIB {
            return Err(ValidationError::new(
                "gpu_memory_mib",
                self.gpu_memory_mib,
                format!("must be at most {MAX_GPU_MEMORY_MIB} (256GiB per GPU)"),
            ));
        }
        if self.gpu_milli == 0 || self.gpu_milli > WHOLE_GPU_MILLI {
            return Err(ValidationError::new(
                "gpu_milli",
                self.gpu_milli,
                "must be between 1 and 1000 (thousandths of one GPU) when gpus is set",
            ));
        }
        if self.gpus > 1 && self.gpu_milli != WHOLE_GPU_MILLI {
            return Err(ValidationError::new(
                "gpu_milli",
                self.gpu_milli,
                "only a single-GPU replica may share a GPU; use gpus 1 or a share of 1000",
            ));
        }
        Ok(())
    }
}

/// Resource fields a deployment sets; the others come from its model version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceOverrides {
    /// CPU in millicores.
    pub cpu_milli: Option<u32>,
    /// Memory in MiB.
    pub memory_mib: Option<u64>,
    /// Whole GPUs on one node.
    pub gpus: Option<u32>,
    /// GPU memory per GPU, MiB (0 = the whole GPU).
    pub gpu_memory_mib: Option<u64>,
    /// Compute share per GPU, thousandths.
    pub gpu_milli: Option<u32>,
}

impl ResourceOverrides {
    /// `base` with these fields set. Asking for GPUs without a share gets
    /// whole GPUs; asking for none drops the base's GPU memory and share.
    pub fn over(&self, base: Resources) -> Resources {
        let mut r = base;
        if let Some(v) = self.cpu_milli {
            r.cpu_milli = v;
        }
        if let Some(v) = self.memory_mib {
            r.memory_mib = v;
        }
        if let Some(v) = self.gpus {
            r.gpus = v;
        }
        if let Some(v) = self.gpu_memory_mib {
            r.gpu_memory_mib = v;
        }
        if let Some(v) = self.gpu_milli {
            r.gpu_milli = v;
        }
        if r.gpus == 0 {
            r.gpu_memory_mib = 0;
            r.gpu_milli = 0;
        } else if r.gpu_milli == 0 || (r.gpus > 1 && self.gpu_milli.is_none()) {
            r.gpu_milli = WHOLE_GPU_MILLI;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(gpus: u32, mem: u64, milli: u32) -> Resources {
        Resources {
            gpus,
            gpu_memory_mib: mem,
            gpu_milli: milli,
            ..Resources::default()
        }
    }

    #[test]
    fn bounds() {
        assert!(Resources::default().validate().is_ok());
        assert!(gpu(1, 20 * 1024, 500).validate().is_ok());
        assert!(gpu(8, 80 * 1024, 1000).validate().is_ok());
        assert_eq!(gpu(17, 0, 1000).validate().unwrap_err().field, "gpus");
        assert_eq!(
            gpu(0, 10, 0).validate().unwrap_err().field,
            "gpu_memory_mib"
        );
        assert_eq!(gpu(1, 0, 0).validate().unwrap_err().field, "gpu_milli");
        assert_eq!(gpu(2, 0, 500).validate().unwrap_err().field, "gpu_milli");
        assert_eq!(
            gpu(1, MAX_GPU_MEMORY_MIB + 1, 1000)
                .validate()
                .unwrap_err()
                .field,
            "gpu_memory_mib"
        );
        let base = gpu(1, 20 * 1024, 500);
        let none = ResourceOverrides::default();
        assert_eq!(none.over(base), base);
        let cpu_only = ResourceOverrides {
            gpus: Some(0),
            ..none
        };
        assert_eq!(cpu_only.over(base), Resources::default());
        let two = ResourceOverrides {
            gpus: Some(2),
            ..none
        };
        assert_eq!(
            two.over(base).gpu_milli,
            WHOLE_GPU_MILLI,
            "2 GPUs are whole GPUs"
        );
        let from_cpu = ResourceOverrides {
            gpus: Some(1),
            ..none
        };
        assert_eq!(
            from_cpu.over(Resources::default()).gpu_milli,
            WHOLE_GPU_MILLI
        );
        let big_cpu = Resources {
            cpu_milli: MAX_CPU_MILLI + 1,
            ..Resources::default()
        };
        assert_eq!(big_cpu.validate().unwrap_err().field, "cpu_milli");
    }
}
