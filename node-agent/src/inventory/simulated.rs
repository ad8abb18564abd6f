//! Simulated GPUs (`--simulate-gpus 2xA100-80GB`): made-up devices for demos
//! and tests on machines without NVIDIA GPUs. They are marked simulated in
//! the inventory, the registration and every listing. Their memory in use is
//! what the replicas on them were given, so free memory moves like a real
//! node's would.

use berth_common::{GpuDevice, ValidationError};

/// The most simulated GPUs on one node.
const MAX_SIMULATED: u32 = 64;

/// Parses `COUNTxMODEL-MEMGB[,COUNTxMODEL-MEMGB..]`, e.g. `8xH100-80GB` or
/// `2xA100-80GB,1xL4-24GB`, into devices numbered from 0. `node` goes into
/// the uuids so they are unique in a cluster.
pub fn parse_spec(spec: &str, node: &str) -> Result<Vec<GpuDevice>, ValidationError> {
    let err = |rule: &str| {
        ValidationError::new(
            "simulate_gpus",
            spec,
            format!(
                "{rule}; the form is COUNTxMODEL-MEMORYGB, e.g. 2xA100-80GB or 8xH100-80GB,2xL4-24GB"
            ),
        )
    };
    let mut gpus = Vec::new();
    for group in spec.split(',').map(str::trim) {
        let (count, rest) = group
            .split_once(['x', 'X'])
            .ok_or_else(|| err(&format!("{group:?} has no COUNTx prefix")))?;
        let count: u32 = count
            .parse()
            .ok()
            .filter(|c| *c > 0)
            .ok_or_else(|| err(&format!("{count:?} is not a GPU count above 0")))?;
        let (model, memory) = rest
            .rsplit_once('-')
            .ok_or_else(|| err(&format!("{rest:?} has no -MEMORYGB suffix")))?;
        let gib: u64 = memory
            .strip_suffix("GiB")
            .or_else(|| memory.strip_suffix("GB"))
            .and_then(|n| n.parse().ok())
            .filter(|n| (1..=1024).contains(n))
            .ok_or_else(|| {
                err(&format!(
                    "{memory:?} is not a memory size such as 80GB (1-1024)"
                ))
            })?;
        if model.is_empty()
            || model.len() > 64
            || !model
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(err(&format!(
                "{model:?} is not a GPU model name (letters, digits, '-' and '_')"
            )));
        }
        if count > MAX_SIMULATED || gpus.len() as u32 + count > MAX_SIMULATED {
            return Err(err(&format!(
                "at most {MAX_SIMULATED} GPUs may be simulated"
            )));
        }
        // Two locality groups when there are four or more, like a
        // two-socket machine with half the GPUs on each NUMA node.
        let half = if count >= 4 { count.div_ceil(2) } else { count };
        for i in 0..count {
            let index = gpus.len() as u32;
            gpus.push(GpuDevice {
                index,
                uuid: format!("GPU-simulated-{node}-{index}"),
                model: format!("{model}-{gib}GB"),
                memory_mib: gib * 1024,
                pci_bus_id: String::new(),
                locality: Some(i / half),
                mig_enabled: false,
            });
        }
    }
    Ok(gpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let g = parse_spec("2xA100-80GB", "n1").unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g[1].index, 1);
        assert_eq!(g[1].memory_mib, 80 * 1024);
        assert_eq!(g[1].model, "A100-80GB");
        assert_eq!(g[1].uuid, "GPU-simulated-n1-1");
        let g = parse_spec("8xH100-80GB", "n1").unwrap();
        assert_eq!(
            g.iter().map(|g| g.locality.unwrap()).collect::<Vec<_>>(),
            [0, 0, 0, 0, 1, 1, 1, 1]
        );
        let g = parse_spec("2xA100-80GB, 1xRTX-4090-24GB", "n1").unwrap();
        assert_eq!(g.len(), 3);
        assert_eq!(g[2].model, "RTX-4090-24GB");
        assert_eq!(g[2].memory_mib, 24 * 1024);
        assert_eq!(g[2].index, 2);
    }

    #[test]
    fn bad_specs_say_the_form() {
        for bad in [
            "",
            "A100-80GB",
            "0xA100-80GB",
            "twoxA100-80GB",
            "2xA100",
            "2xA100-80",
            "2xA100-0GB",
            "2x-80GB",
            "2xA 100-80GB",
            "65xH100-80GB",
            "1xA-1GB,4294967295xA-1GB",
        ] {
            let e = parse_spec(bad, "n").unwrap_err();
            assert_eq!(e.field, "simulate_gpus", "{bad}");
            assert!(e.rule.contains("COUNTxMODEL-MEMORYGB"), "{bad}: {e}");
        }
    }
}
