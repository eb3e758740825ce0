//! encoder-svc: serves the DenseBert4Ret model over gRPC with dynamic
//! batching. Request handlers take queue slots, preprocess on a thread pool
//! and queue model inputs. Model worker threads, each owning a copy of the
//! model, run them in batches.

pub mod batcher;
pub mod error;
pub mod metrics;
pub mod preprocess;
pub mod service;
pub mod settings;

pub use batcher::{Batcher, LoadedModel, Precision, WorkerOptions};
pub use service::EncoderService;
pub use settings::EncoderSettings;

use densebert4ret_model::Device;

/// Parses a device name from the configuration: `cpu`, `cuda`, `cuda:N` or
/// `auto`.
pub fn parse_device(name: &str) -> anyhow::Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    let device = match name.as_str() {
        "cpu" => Device::Cpu,
        "auto" => Device::cuda_if_available(),
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) => Device::Cuda(index),
            _ => anyhow::bail!("invalid device {name:?}; use cpu, cuda, cuda:N or auto"),
        },
    };
    if let Device::Cuda(index) = device {
        let available = tch::Cuda::device_count() as usize;
        if index >= available {
            anyhow::bail!(
                "device {name:?} requested but this machine has {available} CUDA device(s); use device = \"cpu\" or a valid index"
            );
        }
    }
    Ok(device)
}
