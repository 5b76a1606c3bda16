//! What a config's sizes cost in memory, checked before anything is allocated from them.
//!
//! `config.json` is data anyone can write: a random config with `n_positions: 1e15` must fail
//! with the field named rather than abort on a 32 PB rotary table, and `n_layer: 1e12` must fail
//! before a trillion parameter names are listed. Every size is bounded by the machine's physical
//! memory, with checked arithmetic so that no product of sizes can overflow on the way.

use indicatif::DecimalBytes;

use super::Config;

/// The least a parameter can cost: 4 bits (QLoRA's NF4, the narrowest weights are stored in).
/// Weights pass through memory as they load (to a GPU too, and quantised), so a model whose
/// parameters cannot fit even so was never meant for this machine; a wider bound would refuse
/// a 6B model on a 16 GB machine that can fine-tune it in 4 bits.
fn min_bytes(parameters: u64) -> u64 {
    parameters.div_ceil(2)
}

/// The rotary tables are fp32: the angles, then their sine and cosine, all alive at once.
const ROTARY_BYTES_PER_ENTRY: u64 = 3 * 4;

/// Bytes of physical memory on this machine; `u64::MAX` where the OS does not say, so that only
/// overflow bounds the sizes there.
pub fn physical_memory() -> u64 {
    #[cfg(unix)]
    {
        // SAFETY: sysconf reads system constants and has no preconditions.
        let (pages, page_size) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if pages > 0 && page_size > 0 {
            return (pages as u64).saturating_mul(page_size as u64);
        }
    }
    u64::MAX
}

/// Checks that a model of `config`'s sizes fits in `memory` bytes: each size field on its own,
/// the rotary table its positions need, and all its parameters at 4 bits each. The error
/// names the field and what it would cost.
pub fn check_fits(config: &Config, memory: u64) -> Result<(), String> {
    let machine = || format!("this machine has {} of memory", DecimalBytes(memory));
    // No single size can exceed the parameters it sizes; bounding each first also keeps the
    // family code's own arithmetic on them (`4 * n_embd`, `3 * hidden_size`) from overflowing.
    for (field, value) in sized_fields(config) {
        let bytes = Some(min_bytes(value as u64));
        if bytes.is_none_or(|b| b > memory) {
            return Err(format!(
                "{field} {value} alone implies at least {value} parameters ({} at 4 bits \
                 each); {}",
                describe_bytes(bytes),
                machine()
            ));
        }
    }
    if let Some((field, positions, rotary_dim)) = rotary_table(config) {
        let bytes = (positions as u64)
            .checked_mul((rotary_dim / 2) as u64)
            .and_then(|entries| entries.checked_mul(ROTARY_BYTES_PER_ENTRY));
        if bytes.is_none_or(|b| b > memory) {
            return Err(format!(
                "{field} {positions} needs a {} rotary table ({field} × rotary_dim/2 {} × \
                 3 fp32 tables); {}",
                describe_bytes(bytes),
                rotary_dim / 2,
                machine()
            ));
        }
    }
    let (layers_field, layers) = layer_count(config);
    let one_layer = parameter_count(&with_layers(config, 1));
    let two_layers = parameter_count(&with_layers(config, 2));
    let (Some(one_layer), Some(two_layers)) = (one_layer, two_layers) else {
        return Err(format!(
            "the sizes of one layer overflow a 64-bit count of parameters; {}",
            machine()
        ));
    };
    let per_layer = two_layers - one_layer;
    let outside_layers = one_layer - per_layer;
    let total = per_layer
        .checked_mul(layers as u64)
        .and_then(|in_layers| in_layers.checked_add(outside_layers));
    let bytes = total.map(min_bytes);
    if bytes.is_none_or(|b| b > memory) {
        let count = total.map_or_else(|| "more than 2^64".to_string(), |t| t.to_string());
        return Err(format!(
            "the config describes {count} parameters ({layers_field} {layers} layers of \
             {per_layer} each, plus {outside_layers} outside the layers): {} at 4 bits each; \
             {}",
            describe_bytes(bytes),
            machine()
        ));
    }
    Ok(())
}

fn describe_bytes(bytes: Option<u64>) -> String {
    bytes.map_or_else(
        || "more than 18 EB".to_string(),
        |b| DecimalBytes(b).to_string(),
    )
}

/// Every field whose value is a dimension of some parameter tensor (the rotary families' positions
/// size a table instead, checked on its own).
fn sized_fields(config: &Config) -> Vec<(&'static str, usize)> {
    let mut fields = match config {
        Config::GptJ(c) => vec![
            ("vocab_size", c.vocab_size),
            ("n_embd", c.n_embd),
            ("n_layer", c.n_layer),
        ],
        Config::Gpt2(c) => vec![
            ("vocab_size", c.vocab_size),
            ("n_positions", c.n_positions),
            ("n_embd", c.n_embd),
            ("n_layer", c.n_layer),
        ],
        Config::GptNeo(c) => vec![
            ("vocab_size", c.vocab_size),
            ("max_position_embeddings", c.max_position_embeddings),
            ("hidden_size", c.hidden_size),
            ("num_layers", c.num_layers),
        ],
        Config::GptNeoX(c) => vec![
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("intermediate_size", c.intermediate_size),
        ],
    };
    let inner = match config {
        Config::GptJ(c) => c.n_inner.map(|n| ("n_inner", n)),
        Config::Gpt2(c) => c.n_inner.map(|n| ("n_inner", n)),
        Config::GptNeo(c) => c.intermediate_size.map(|n| ("intermediate_size", n)),
        Config::GptNeoX(_) => None,
    };
    fields.extend(inner);
    fields
}

/// The field that sizes the rotary table, its value and the rotated dims per head; `None` for
/// the families with learned position embeddings (a parameter like any other).
fn rotary_table(config: &Config) -> Option<(&'static str, usize, usize)> {
    match config {
        Config::GptJ(c) => Some(("n_positions", c.n_positions, c.rotary_dim())),
        Config::GptNeoX(c) => Some((
            "max_position_embeddings",
            c.max_position_embeddings,
            c.rotary_dim(),
        )),
        Config::Gpt2(_) | Config::GptNeo(_) => None,
    }
}

fn layer_count(config: &Config) -> (&'static str, usize) {
    match config {
        Config::GptJ(c) => ("n_layer", c.n_layer),
        Config::Gpt2(c) => ("n_layer", c.n_layer),
        Config::GptNeo(c) => ("num_layers", c.num_layers),
        Config::GptNeoX(c) => ("num_hidden_layers", c.num_hidden_layers),
    }
}

/// `config` with `layers` layers: the parameters of a one- and a two-layer copy give the cost of
/// a layer without listing every layer of a config that may claim a trillion.
fn with_layers(config: &Config, layers: usize) -> Config {
    let mut copy = config.clone();
    match &mut copy {
        Config::GptJ(c) => c.n_layer = layers,
        Config::Gpt2(c) => c.n_layer = layers,
        Config::GptNeo(c) => c.num_layers = layers,
        Config::GptNeoX(c) => c.num_hidden_layers = layers,
    }
    copy
}

fn parameter_count(config: &Config) -> Option<u64> {
    config
        .parameter_shapes()
        .iter()
        .try_fold(0u64, |total, (_, shape)| {
            let elements = shape
                .iter()
                .try_fold(1u64, |n, &dim| n.checked_mul(dim as u64))?;
            total.checked_add(elements)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::Preset;

    const GB: u64 = 1_000_000_000;

    fn gptj_tiny() -> crate::model::gptj::Config {
        match Preset::Tiny.config() {
            Config::GptJ(c) => c,
            other => panic!("tiny is GPT-J, got {}", other.model_type()),
        }
    }

    #[test]
    fn the_published_shapes_fit_a_machine_of_their_size() {
        // GPT-J-6B: 6.05e9 parameters, 3.03 GB at 4 bits.
        check_fits(&Preset::Gptj6b.config(), 8 * GB).unwrap();
        let err = check_fits(&Preset::Gptj6b.config(), 2 * GB).unwrap_err();
        assert!(
            err.contains("n_layer 28 layers") && err.contains("2.00 GB"),
            "{err}"
        );
        for preset in [
            Preset::Tiny,
            Preset::Gpt2Tiny,
            Preset::NeoTiny,
            Preset::NeoxTiny,
        ] {
            check_fits(&preset.config(), GB).unwrap();
        }
    }

    #[test]
    fn a_rotary_table_larger_than_memory_names_n_positions() {
        let mut config = gptj_tiny();
        config.n_positions = 1_000_000_000_000_000;
        let err = check_fits(&Config::GptJ(config), 64 * GB).unwrap_err();
        assert!(
            err.contains("n_positions 1000000000000000 needs a 96.00 PB rotary table"),
            "{err}"
        );
        let Config::GptNeoX(mut neox) = Preset::NeoxTiny.config() else {
            unreachable!()
        };
        neox.max_position_embeddings = 1 << 40;
        let err = check_fits(&Config::GptNeoX(neox), 64 * GB).unwrap_err();
        assert!(
            err.starts_with("max_position_embeddings 1099511627776 needs"),
            "{err}"
        );
    }

    #[test]
    fn sizes_that_overflow_are_refused_without_overflowing() {
        let mut config = gptj_tiny();
        config.vocab_size = usize::MAX;
        let err = check_fits(&Config::GptJ(config.clone()), 64 * GB).unwrap_err();
        assert!(
            err.starts_with(&format!("vocab_size {} alone implies", usize::MAX))
                && err.contains("9.22 EB"),
            "{err}"
        );
        // Where the OS gives no memory size, the count of parameters overflowing still stops it.
        let err = check_fits(&Config::GptJ(config), u64::MAX).unwrap_err();
        assert!(
            err.starts_with("the sizes of one layer overflow a 64-bit count of parameters"),
            "{err}"
        );
        let mut config = gptj_tiny();
        config.n_layer = 1 << 30;
        let err = check_fits(&Config::GptJ(config), 64 * GB).unwrap_err();
        assert!(err.contains("n_layer 1073741824 layers of"), "{err}");
        let mut config = gptj_tiny();
        config.n_layer = 1 << 40;
        let err = check_fits(&Config::GptJ(config), 64 * GB).unwrap_err();
        assert!(
            err.starts_with("n_layer 1099511627776 alone implies"),
            "{err}"
        );
    }
}
