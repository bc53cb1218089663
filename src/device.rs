//! Where each model runs, and why: one decision shared by the classifier
//! (candle) and the generator (mistral.rs), each of which only supplies the
//! probe ("is there a CUDA device?") and the loading.
//!
//! kefu logs the outcome of every decision at start, so an operator sees at
//! once whether a model landed on the CPU because of configuration, because
//! the binary was built without CUDA, because no GPU was found, or because
//! loading on the GPU failed (out of memory).

use clap::ValueEnum;

/// What the operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Want {
    /// The GPU when this binary has CUDA and finds a device, else the CPU.
    #[default]
    Auto,
    /// Always the CPU.
    Cpu,
    /// The GPU; what happens without one is --gpu-fallback's choice.
    Cuda,
}

/// What to do when the GPU was asked for (or chosen) and cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum OnGpuFailure {
    /// Run on the CPU and say so in the log.
    #[default]
    Cpu,
    /// Stop with an error: a service sized for a GPU should not quietly
    /// serve at CPU speed.
    Refuse,
}

/// The configuration of one model's placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    pub want: Want,
    pub on_failure: OnGpuFailure,
}

/// The outcome: the GPU handle when the model goes there, and the reason in
/// words for the start-up log.
#[derive(Debug, Clone)]
pub struct Placement<T> {
    pub gpu: Option<T>,
    pub reason: String,
}

impl<T> Placement<T> {
    fn cpu(reason: impl Into<String>) -> Self {
        Self {
            gpu: None,
            reason: reason.into(),
        }
    }

    /// `cuda:0` or `cpu`.
    pub fn label(&self) -> &'static str {
        if self.gpu.is_some() {
            "cuda:0"
        } else {
            "cpu"
        }
    }
}

/// The first line of an error: candle's CUDA errors carry a backtrace
/// after it when RUST_BACKTRACE is set, which does not belong in a reason.
pub fn first_line(error: &str) -> String {
    error.lines().next().unwrap_or_default().trim().to_string()
}

/// Whether this binary was built with `--features cuda`.
pub const BUILT_WITH_CUDA: bool = cfg!(feature = "cuda");

/// Decides before loading. `probe` looks for CUDA device 0 and is only
/// called when the binary has CUDA and the GPU is wanted. An `Err` is the
/// refusal, worded for the operator.
pub fn decide<T>(
    policy: Policy,
    built_with_cuda: bool,
    probe: impl FnOnce() -> Result<T, String>,
) -> Result<Placement<T>, String> {
    let unusable = |why: String| match (policy.want, policy.on_failure) {
        (Want::Auto, _) => Ok(Placement::cpu(why)),
        (_, OnGpuFailure::Cpu) => Ok(Placement::cpu(format!(
            "{why}; on the CPU instead (--gpu-fallback cpu)"
        ))),
        (_, OnGpuFailure::Refuse) => Err(format!(
            "the GPU was asked for (--device cuda) but {why} (--gpu-fallback refuse)"
        )),
    };
    match policy.want {
        Want::Cpu => Ok(Placement::cpu("CPU chosen by configuration")),
        _ if !built_with_cuda => unusable(
            "this kefu was built without the cuda feature (`make build-cuda` builds one with it)"
                .into(),
        ),
        _ => match probe() {
            Ok(device) => Ok(Placement {
                gpu: Some(device),
                reason: "CUDA device 0 found".into(),
            }),
            Err(e) => unusable(format!("no usable CUDA device ({e})")),
        },
    }
}

/// Decides again after loading on the GPU failed (typically out of memory):
/// the CPU, or the refusal.
pub fn after_gpu_failure<T>(policy: Policy, error: &str) -> Result<Placement<T>, String> {
    match policy.on_failure {
        OnGpuFailure::Cpu => Ok(Placement::cpu(format!(
            "loading on the GPU failed ({error}); on the CPU instead (--gpu-fallback cpu)"
        ))),
        OnGpuFailure::Refuse => Err(format!(
            "loading on the GPU failed ({error}) and --gpu-fallback is refuse"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(want: Want, on_failure: OnGpuFailure) -> Policy {
        Policy { want, on_failure }
    }

    fn found() -> Result<u8, String> {
        Ok(0)
    }

    fn missing() -> Result<u8, String> {
        Err("CUDA_ERROR_NO_DEVICE".into())
    }

    #[test]
    fn cpu_by_configuration_never_probes() {
        let p = decide(
            policy(Want::Cpu, OnGpuFailure::Refuse),
            true,
            || -> Result<u8, String> { panic!("probed") },
        )
        .unwrap();
        assert_eq!(p.label(), "cpu");
        assert!(p.reason.contains("configuration"));
    }

    #[test]
    fn auto_uses_the_gpu_when_there_is_one_and_the_cpu_otherwise() {
        let on = decide(policy(Want::Auto, OnGpuFailure::Refuse), true, found).unwrap();
        assert_eq!(on.label(), "cuda:0");
        let off = decide(policy(Want::Auto, OnGpuFailure::Refuse), true, missing).unwrap();
        assert_eq!(off.label(), "cpu");
        assert!(
            off.reason.contains("CUDA_ERROR_NO_DEVICE"),
            "{}",
            off.reason
        );
        let cpu_build = decide(policy(Want::Auto, OnGpuFailure::Refuse), false, found).unwrap();
        assert_eq!(cpu_build.label(), "cpu");
        assert!(cpu_build.reason.contains("without the cuda feature"));
    }

    #[test]
    fn asking_for_cuda_without_one_falls_back_or_refuses_as_configured() {
        let fell = decide(policy(Want::Cuda, OnGpuFailure::Cpu), false, found).unwrap();
        assert_eq!(fell.label(), "cpu");
        assert!(
            fell.reason.contains("--gpu-fallback cpu"),
            "{}",
            fell.reason
        );
        let refused = decide(policy(Want::Cuda, OnGpuFailure::Refuse), true, missing).unwrap_err();
        assert!(refused.contains("CUDA_ERROR_NO_DEVICE"), "{refused}");
        assert!(refused.contains("--gpu-fallback refuse"), "{refused}");
        let refused = decide(policy(Want::Cuda, OnGpuFailure::Refuse), false, found).unwrap_err();
        assert!(refused.contains("make build-cuda"), "{refused}");
    }

    #[test]
    fn a_failed_gpu_load_falls_back_or_refuses() {
        let fell: Placement<u8> =
            after_gpu_failure(policy(Want::Auto, OnGpuFailure::Cpu), "out of memory").unwrap();
        assert_eq!(fell.label(), "cpu");
        assert!(fell.reason.contains("out of memory"));
        let refused = after_gpu_failure::<u8>(policy(Want::Cuda, OnGpuFailure::Refuse), "oom");
        assert!(refused.unwrap_err().contains("oom"));
    }
}
