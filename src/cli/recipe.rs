//! `kiln recipe check`: a recipe fully resolved, or what is wrong and where.

use super::*;

#[derive(Debug, Subcommand)]
pub enum RecipeCommand {
    /// Validate a recipe against its data and print it with every default and derived value.
    Check(RecipeArgs),
}

pub(super) fn recipe_check(args: RecipeArgs) -> Result<()> {
    let resolved = crate::data::check(&args.recipe, &args.set)?;
    print!("{}", serde_norway::to_string(&resolved)?);
    Ok(())
}
