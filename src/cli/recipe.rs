//! `kiln recipe check`: a recipe fully resolved, or what is wrong and where.

use super::*;

#[derive(Debug, Subcommand)]
pub enum RecipeCommand {
    /// Validate a recipe against its data and print it with every default and derived value,
    /// and the run's memory estimate (in bytes under `derived.memory_estimate`, and as a table
    /// in YAML comments).
    Check(RecipeArgs),
}

pub(super) fn recipe_check(args: RecipeArgs) -> Result<()> {
    let mut resolved = crate::data::check(&args.recipe, &args.set)?;
    let recipe = &resolved.recipe;
    let dir = crate::recipe::recipe_dir(&args.recipe);
    let estimate = crate::train::launch::model_config(recipe, &dir).and_then(|config| {
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("model config: {e}"))?;
        if let Some(lora) = &recipe.lora {
            crate::model::lora::select_layers(&config, &lora.targets(&config))?;
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(crate::train::memory::MemoryEstimate::new(
            recipe, &config, threads,
        ))
    });
    match &estimate {
        Ok(estimate) => resolved.derived.memory_estimate = Some(estimate.terms()),
        Err(e) if recipe.lora.is_some() && e.to_string().starts_with("lora.") => {
            return Err(anyhow::anyhow!("{}: {e:#}", args.recipe.display()))
        }
        Err(e) => resolved
            .derived
            .notes
            .push(format!("memory estimate unavailable: {e:#}")),
    }
    print!("{}", serde_norway::to_string(&resolved)?);
    if let Ok(estimate) = estimate {
        for line in estimate.table().lines() {
            println!("# {line}");
        }
    }
    Ok(())
}
