//! Hardware profiles: the engine's defaults for the device it runs on — how many sequences a step
//! holds, how many tokens it computes, the KV block size, and how the bins share steps. A flag or
//! the pool spec overrides each. Pure: from what the device says of itself.

use super::DeviceSpec;

/// What a GPU says of itself, as far as defaults go.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuFacts {
    pub name: String,
    pub total_memory: usize,
}

/// The defaults for one kind of device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HardwareProfile {
    /// The profile's name (`cpu`, `h100`, `a100-40gb`, …).
    pub name: &'static str,
    pub max_num_seqs: usize,
    pub max_batched_tokens: usize,
    pub block_size: usize,
    /// Step weights of the bins ([`crate::engine::scheduling::admission::QueuePolicy::step_weights`]):
    /// on a CPU a step's time grows with its rows, so slower bins sit steps out; on a GPU a decode
    /// step costs about the same for one row or a hundred, so every running sequence runs in
    /// every step.
    pub step_weights: [u32; 3],
    /// The most prompt tokens a medium or slow request prefills in a step.
    pub slow_prefill_chunk: usize,
}

const GIB: usize = 1 << 30;

/// The CPU engine's defaults.
pub const CPU: HardwareProfile = HardwareProfile {
    name: "cpu",
    max_num_seqs: 64,
    max_batched_tokens: 512,
    block_size: 16,
    step_weights: [12, 4, 1],
    slow_prefill_chunk: 16,
};

const fn gpu(
    name: &'static str,
    max_num_seqs: usize,
    max_batched_tokens: usize,
) -> HardwareProfile {
    HardwareProfile {
        name,
        max_num_seqs,
        max_batched_tokens,
        block_size: 16,
        step_weights: [1, 1, 1],
        slow_prefill_chunk: max_batched_tokens,
    }
}

/// The profile of `device`: by the GPU's name where it is known, else by its memory.
pub fn profile(device: DeviceSpec, gpu_facts: Option<&GpuFacts>) -> HardwareProfile {
    let Some(facts) = gpu_facts.filter(|_| device != DeviceSpec::Cpu) else {
        return CPU;
    };
    let name = facts.name.to_ascii_uppercase();
    let memory = facts.total_memory;
    let has = |model: &str| name.contains(model);
    if has("H200") || has("B200") || has("GH200") {
        gpu("h200", 512, 16384)
    } else if has("H100") || has("H800") {
        gpu("h100", 256, 8192)
    } else if has("A100") && memory > 60 * GIB {
        gpu("a100-80gb", 256, 8192)
    } else if has("A100") {
        gpu("a100-40gb", 256, 4096)
    } else if has("L40S") || has("L40") {
        gpu("l40s", 256, 4096)
    } else if has("4090") {
        gpu("rtx-4090", 128, 2048)
    } else if has("L4") {
        gpu("l4", 128, 2048)
    } else if has("V100") {
        gpu("v100", 128, 2048)
    } else if memory > 100 * GIB {
        gpu("gpu-over-100gb", 512, 16384)
    } else if memory > 60 * GIB {
        gpu("gpu-over-60gb", 256, 8192)
    } else if memory > 30 * GIB {
        gpu("gpu-over-30gb", 256, 4096)
    } else {
        gpu("gpu", 128, 2048)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(name: &str, gib: usize) -> HardwareProfile {
        let facts = GpuFacts {
            name: name.into(),
            total_memory: gib * GIB,
        };
        profile(DeviceSpec::Cuda(0), Some(&facts))
    }

    #[test]
    fn profiles_follow_the_card_and_its_memory() {
        assert_eq!(profile(DeviceSpec::Cpu, None), CPU);
        assert_eq!(on("NVIDIA H200", 141).name, "h200");
        assert_eq!(on("NVIDIA H100 80GB HBM3", 80).name, "h100");
        assert_eq!(on("NVIDIA A100-SXM4-80GB", 80).name, "a100-80gb");
        assert_eq!(on("NVIDIA A100-SXM4-40GB", 40).name, "a100-40gb");
        assert_eq!(on("NVIDIA L40S", 46).name, "l40s");
        assert_eq!(on("NVIDIA L4", 22).name, "l4");
        assert_eq!(on("NVIDIA GeForce RTX 4090", 24).name, "rtx-4090");
        assert_eq!(on("Tesla V100-SXM2-32GB", 32).name, "v100");
        assert_eq!(on("Some Future GPU", 192).name, "gpu-over-100gb");
        assert_eq!(on("Some Small GPU", 16).name, "gpu");
        // Every GPU runs every sequence in every step and prefills slow prompts whole.
        let h100 = on("NVIDIA H100", 80);
        assert_eq!(
            (h100.step_weights, h100.slow_prefill_chunk),
            ([1, 1, 1], 8192)
        );
        assert_eq!(CPU.step_weights, [12, 4, 1]);
    }
}
