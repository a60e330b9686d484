//! The compute devices ggml's backend registry offers: the CPU always, GPUs where this build has a
//! GPU backend (the `vulkan` feature) and the machine has a device it accepts.

use std::ffi::CStr;
use std::os::raw::c_char;

use ggml_sys as sys;

/// What kind of device ggml reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// The CPU, using system memory.
    Cpu,
    /// A GPU with memory of its own.
    Gpu,
    /// A GPU sharing the host's memory.
    IntegratedGpu,
    /// An accelerator beside the CPU (ggml's BLAS and AMX-style backends).
    Accelerator,
}

impl DeviceKind {
    /// The kind's name as `ccsm-infer system` prints it.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Gpu => "gpu",
            DeviceKind::IntegratedGpu => "integrated gpu",
            DeviceKind::Accelerator => "accelerator",
        }
    }
}

/// One device of ggml's registry.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// ggml's name for it (`CPU`, `Vulkan0`, …).
    pub name: String,
    /// The driver's description (the GPU's or CPU's model).
    pub description: String,
    /// What kind of device it is.
    pub kind: DeviceKind,
    /// Memory it reports free and in all, in bytes (for the CPU: the host's).
    pub free_bytes: usize,
    /// See `free_bytes`.
    pub total_bytes: usize,
}

/// The GPU backends compiled into this build (empty for the default CPU-only build).
pub fn gpu_backends() -> Vec<&'static str> {
    let mut backends = Vec::new();
    if cfg!(feature = "vulkan") {
        backends.push("vulkan");
    }
    backends
}

/// Every device ggml's registry has, in its order (a Vulkan device appears as `VulkanN` where the
/// build has the backend; ggml skips CPU-type Vulkan devices such as Mesa's lavapipe unless
/// `GGML_VK_VISIBLE_DEVICES` names them).
pub fn devices() -> Vec<DeviceInfo> {
    crate::init();
    let text = |p: *const c_char| -> String {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: ggml's device names and descriptions are NUL-terminated strings that live as
            // long as the registry (the whole process).
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    // SAFETY: the registry is initialised (crate::init); indices below the count are valid devices,
    // whose getters return static strings and fill the two sizes.
    unsafe {
        (0..sys::ggml_backend_dev_count())
            .map(|i| {
                let dev = sys::ggml_backend_dev_get(i);
                let (mut free, mut total) = (0usize, 0usize);
                sys::ggml_backend_dev_memory(dev, &mut free, &mut total);
                let kind = match sys::ggml_backend_dev_type(dev) {
                    sys::GGML_BACKEND_DEVICE_TYPE_CPU => DeviceKind::Cpu,
                    sys::GGML_BACKEND_DEVICE_TYPE_GPU => DeviceKind::Gpu,
                    sys::GGML_BACKEND_DEVICE_TYPE_IGPU => DeviceKind::IntegratedGpu,
                    _ => DeviceKind::Accelerator,
                };
                DeviceInfo {
                    name: text(sys::ggml_backend_dev_name(dev)),
                    description: text(sys::ggml_backend_dev_description(dev)),
                    kind,
                    free_bytes: free,
                    total_bytes: total,
                }
            })
            .collect()
    }
}
