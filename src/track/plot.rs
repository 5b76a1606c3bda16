//! Training curves of several runs on one chart (`kiln runs plot`, and `curves.svg` in every run
//! directory at the end of training).
//!
//! One panel per metric, stacked, sharing one legend of run names (a run keeps its colour in
//! every panel). With smoothing, only the smoothed line is drawn: over many runs, faint raw
//! points behind every line make the comparison harder to read, not easier. Non-finite values
//! (a diverged loss) are left out of the line.
//!
//! SVG text is left to the viewer's fonts, so an SVG never needs a font file; plotters' own
//! legend and caption measure text with a font, which is why both are drawn here instead. PNG
//! text is rasterised with a TrueType font found on the system at run time.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::runs::Run;

const WIDTH: u32 = 960;
const PANEL_HEIGHT: u32 = 320;
const FONT_FAMILY: &str = "sans-serif";
const LEGEND_FONT_PX: u32 = 15;
const LEGEND_ROW_PX: u32 = 22;
const LEGEND_SWATCH_PX: u32 = 28;

/// Matplotlib's `tab10`: ten colours that stay apart for most eyes; more runs reuse them.
pub const SERIES_COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageFormat {
    Svg,
    Png,
}

fn image_format(out: &Path) -> Result<ImageFormat> {
    let extension = out
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match extension.as_deref() {
        Some("svg") => Ok(ImageFormat::Svg),
        Some("png") => Ok(ImageFormat::Png),
        _ => bail!(
            "{}: cannot tell the image format; expected a file name ending in .svg or .png",
            out.display()
        ),
    }
}

/// TensorBoard's smoothing: an exponential moving average debiased for its zero start, so the
/// first points are not pulled towards zero. `weight` 0 leaves the values as they are.
pub fn smooth(values: &[f64], weight: f64) -> Vec<f64> {
    let mut average = 0.0;
    let mut debias = 1.0;
    values
        .iter()
        .map(|&v| {
            average = average * weight + (1.0 - weight) * v;
            debias *= weight;
            if weight == 0.0 {
                v
            } else {
                average / (1.0 - debias)
            }
        })
        .collect()
}

/// One line of one panel.
struct Curve {
    colour: RGBColor,
    points: Vec<(f64, f64)>,
}

/// Draws `metrics` of `runs` (one panel per metric) to `out` (.svg or .png). Returns notes for
/// the user: the runs that lack a metric another run has.
pub fn plot_runs(
    runs: &[Run],
    metrics: &[String],
    smoothing: f64,
    out: &Path,
) -> Result<Vec<String>> {
    let format = image_format(out)?;
    if !(0.0..1.0).contains(&smoothing) {
        bail!("--smooth {smoothing}: expected a weight from 0 (none) up to but not including 1");
    }
    if metrics.is_empty() {
        bail!("no metric to plot (name one with --metric, e.g. --metric train/loss)");
    }
    let mut notes = Vec::new();
    let mut panels = Vec::with_capacity(metrics.len());
    for metric in metrics {
        let mut curves = Vec::new();
        for (index, run) in runs.iter().enumerate() {
            let series = run.series(metric);
            if series.is_empty() {
                notes.push(format!("run {} has no finite {metric} values", run.name));
                continue;
            }
            let (steps, values): (Vec<u64>, Vec<f64>) = series.into_iter().unzip();
            let values = smooth(&values, smoothing);
            curves.push(Curve {
                colour: SERIES_COLOURS[index % SERIES_COLOURS.len()],
                points: steps.iter().map(|&s| s as f64).zip(values).collect(),
            });
        }
        if curves.is_empty() {
            let mut tags = std::collections::BTreeSet::new();
            for run in runs {
                tags.extend(run.tags());
            }
            bail!(
                "no run has values of {metric} (metrics present: {})",
                if tags.is_empty() {
                    "none".to_string()
                } else {
                    tags.into_iter().collect::<Vec<_>>().join(", ")
                }
            );
        }
        panels.push((metric.as_str(), curves));
    }
    let legend: Vec<(&str, RGBColor)> = runs
        .iter()
        .enumerate()
        .map(|(i, run)| (run.name.as_str(), SERIES_COLOURS[i % SERIES_COLOURS.len()]))
        .collect();
    let legend_height = legend_rows(&legend) * LEGEND_ROW_PX + 12;
    let size = (WIDTH, legend_height + PANEL_HEIGHT * panels.len() as u32);
    let title = smoothing_note(smoothing);

    let bytes = match format {
        ImageFormat::Svg => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
                draw(&root, legend_height, &legend, &panels, title.as_deref())?;
                root.present().map_err(plotters_error)?;
            }
            svg.into_bytes()
        }
        ImageFormat::Png => {
            register_system_font()?;
            let mut rgb = vec![0u8; size.0 as usize * size.1 as usize * 3];
            {
                let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
                draw(&root, legend_height, &legend, &panels, title.as_deref())?;
                root.present().map_err(plotters_error)?;
            }
            encode_png(&rgb, size)?
        }
    };
    crate::atomic_file::write(out, &bytes)?;
    Ok(notes)
}

fn smoothing_note(smoothing: f64) -> Option<String> {
    (smoothing > 0.0).then(|| format!("smoothed (EMA weight {smoothing})"))
}

/// Writes `<run_dir>/curves.svg`: train/loss and every eval/* metric the run logged, one panel
/// each. `None` when the run logged none of them.
pub fn write_curves(run_dir: &Path) -> Result<Option<PathBuf>> {
    let run = Run::load(run_dir)?;
    let tags = run.tags();
    let metrics: Vec<String> = tags
        .iter()
        .filter(|t| **t == "train/loss" || t.starts_with("eval/"))
        .filter(|t| !run.series(t).is_empty())
        .map(|t| t.to_string())
        .collect();
    if metrics.is_empty() {
        return Ok(None);
    }
    // train/loss first: the panel everyone looks at.
    let mut metrics = metrics;
    metrics.sort_by_key(|t| (t != "train/loss", t.clone()));
    let out = run_dir.join("curves.svg");
    plot_runs(std::slice::from_ref(&run), &metrics, 0.0, &out)?;
    Ok(Some(out))
}

fn plotters_error<E: std::error::Error + Send + Sync>(
    error: DrawingAreaErrorKind<E>,
) -> anyhow::Error {
    anyhow!("drawing the chart failed: {error}")
}

/// Text width from the character count: SVG text is measured by the viewer, so the layout can
/// only estimate (a sans-serif averages a bit over half an em per character).
fn estimated_text_width(text: &str, font_px: u32) -> u32 {
    (text.chars().count() as f64 * font_px as f64 * 0.6).ceil() as u32
}

fn legend_entry_width(name: &str) -> u32 {
    LEGEND_SWATCH_PX + 8 + estimated_text_width(name, LEGEND_FONT_PX) + 24
}

/// Legend entries flow left to right and wrap at the image width.
fn legend_layout(legend: &[(&str, RGBColor)]) -> Vec<(u32, u32)> {
    let (mut x, mut row) = (12u32, 0u32);
    legend
        .iter()
        .map(|(name, _)| {
            let width = legend_entry_width(name);
            if x > 12 && x + width > WIDTH - 12 {
                x = 12;
                row += 1;
            }
            let at = (x, row);
            x += width;
            at
        })
        .collect()
}

fn legend_rows(legend: &[(&str, RGBColor)]) -> u32 {
    legend_layout(legend).last().map_or(1, |&(_, row)| row + 1)
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    legend_height: u32,
    legend: &[(&str, RGBColor)],
    panels: &[(&str, Vec<Curve>)],
    note: Option<&str>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(plotters_error)?;
    let (legend_area, charts) = root.split_vertically(legend_height);
    let legend_text = TextStyle::from((FONT_FAMILY, LEGEND_FONT_PX).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    for ((name, colour), (x, row)) in legend.iter().zip(legend_layout(legend)) {
        let y = (8 + row * LEGEND_ROW_PX + LEGEND_ROW_PX / 2) as i32;
        let x = x as i32;
        legend_area
            .draw(&Rectangle::new(
                [(x, y - 2), (x + LEGEND_SWATCH_PX as i32, y + 2)],
                colour.filled(),
            ))
            .map_err(plotters_error)?;
        legend_area
            .draw(&Text::new(
                name.to_string(),
                (x + LEGEND_SWATCH_PX as i32 + 8, y),
                legend_text.clone(),
            ))
            .map_err(plotters_error)?;
    }
    let title_style = TextStyle::from((FONT_FAMILY, 17).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Top));
    let note_style = TextStyle::from((FONT_FAMILY, 13).into_font())
        .color(&RGBColor(90, 90, 90))
        .pos(Pos::new(HPos::Right, VPos::Top));
    for (area, (metric, curves)) in charts.split_evenly((panels.len(), 1)).iter().zip(panels) {
        draw_panel(area, metric, curves, &title_style)?;
        if let Some(note) = note {
            area.draw(&Text::new(
                note.to_string(),
                (WIDTH as i32 - 16, 10),
                note_style.clone(),
            ))
            .map_err(plotters_error)?;
        }
    }
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    metric: &str,
    curves: &[Curve],
    title_style: &TextStyle,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    area.draw(&Text::new(metric.to_string(), (70, 8), title_style.clone()))
        .map_err(plotters_error)?;
    let points = || curves.iter().flat_map(|c| c.points.iter());
    let (x_min, x_max) = span(points().map(|p| p.0));
    let (y_min, y_max) = span(points().map(|p| p.1));
    let (x_min, x_max) = widen(x_min, x_max, 0.0);
    let (y_min, y_max) = widen(y_min, y_max, 0.05);
    let mut chart = ChartBuilder::on(area)
        .margin_top(34)
        .margin_right(20)
        .margin_bottom(8)
        .margin_left(8)
        .x_label_area_size(36)
        .y_label_area_size(62)
        .build_cartesian_2d(x_min..x_max, y_min..y_max)
        .map_err(plotters_error)?;
    let label_style = (FONT_FAMILY, 13).into_font().color(&BLACK);
    chart
        .configure_mesh()
        .max_light_lines(2)
        .light_line_style(RGBColor(240, 240, 240))
        .bold_line_style(RGBColor(215, 215, 215))
        .x_labels(8)
        .y_labels(6)
        .x_label_style(label_style.clone())
        .y_label_style(label_style)
        .x_label_formatter(&|step| format!("{step:.0}"))
        .y_label_formatter(&|value| super::runs::format_metric(*value))
        .x_desc("step")
        .axis_desc_style((FONT_FAMILY, 13).into_font().color(&BLACK))
        .draw()
        .map_err(plotters_error)?;
    for curve in curves {
        let style = curve.colour.stroke_width(2);
        chart
            .draw_series(LineSeries::new(curve.points.iter().copied(), style))
            .map_err(plotters_error)?;
        if let [only] = curve.points.as_slice() {
            // A line through one point draws nothing: mark it.
            chart
                .draw_series(std::iter::once(Circle::new(
                    *only,
                    4,
                    curve.colour.filled(),
                )))
                .map_err(plotters_error)?;
        }
    }
    Ok(())
}

fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

/// Pads a value range by `fraction` of its length on each side; a single value gets a range
/// around it so the axis has something to show.
fn widen(lo: f64, hi: f64, fraction: f64) -> (f64, f64) {
    if hi > lo {
        let pad = (hi - lo) * fraction;
        (lo - pad, hi + pad)
    } else {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.05 };
        (lo - pad, hi + pad)
    }
}

fn encode_png(rgb: &[u8], (width, height): (u32, u32)) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().context("encoding the PNG")?;
    writer.write_image_data(rgb).context("encoding the PNG")?;
    writer.finish().context("encoding the PNG")?;
    Ok(bytes)
}

/// Where PNG text comes from when `fc-match` is not there to ask: the usual places of DejaVu
/// and Liberation on Debian/Ubuntu, Fedora and Arch, and of Arial on macOS.
const FONT_PATHS: [&str; 8] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// Makes a system font the one PNG text is drawn with (once per process): `KILN_FONT` if set,
/// else what fontconfig calls sans-serif, else the first of [`FONT_PATHS`] that is there.
fn register_system_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| load_system_font().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn load_system_font() -> Result<()> {
    let register = |path: &Path| -> Result<()> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("{}: cannot read the font", path.display()))?;
        // plotters keeps fonts for the life of the process; this runs once per process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, bytes).map_err(|_| {
            anyhow!(
                "{}: not a TrueType/OpenType font plotters can read",
                path.display()
            )
        })
    };
    if let Some(path) = std::env::var_os("KILN_FONT") {
        return register(Path::new(&path)).context("KILN_FONT names the font for PNG text");
    }
    let fontconfig_choice = std::process::Command::new("fc-match")
        .args(["--format=%{file}", "sans-serif"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let candidates = fontconfig_choice
        .into_iter()
        .chain(FONT_PATHS.iter().map(PathBuf::from));
    for path in candidates {
        if path.is_file() && register(&path).is_ok() {
            return Ok(());
        }
    }
    bail!(
        "a PNG needs a TrueType font for its text and none was found (asked fc-match for \
         sans-serif, then looked in {}); install one (Debian/Ubuntu: apt install \
         fonts-dejavu-core; Fedora: dnf install dejavu-sans-fonts), set KILN_FONT=/path/to/font.ttf, \
         or write an .svg, which needs no font",
        FONT_PATHS[..6].join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_matches_tensorboard() {
        // TensorBoard's debiased EMA by hand: a_i = w a_{i-1} + (1 - w) x_i, shown as
        // a_i / (1 - w^i).
        let smoothed = smooth(&[1.0, 2.0, 3.0], 0.5);
        let expected = [1.0, (0.25 + 1.0) / 0.75, (0.625 + 1.5) / 0.875];
        for (s, e) in smoothed.iter().zip(expected) {
            assert!((s - e).abs() < 1e-12, "{smoothed:?}");
        }
        assert_eq!(smooth(&[3.0, -1.0], 0.0), [3.0, -1.0]);
        // A constant stays constant: the debiasing removes the pull towards the zero start.
        assert!(smooth(&[5.0; 4], 0.9)
            .iter()
            .all(|v| (v - 5.0).abs() < 1e-12));
    }

    #[test]
    fn the_format_comes_from_the_extension() {
        assert_eq!(
            image_format(Path::new("a/b.SVG")).unwrap(),
            ImageFormat::Svg
        );
        assert_eq!(image_format(Path::new("b.png")).unwrap(), ImageFormat::Png);
        let error = image_format(Path::new("curves.jpg"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("curves.jpg") && error.contains(".svg or .png"),
            "{error}"
        );
    }
}
